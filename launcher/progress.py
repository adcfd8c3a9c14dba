"""A terminal progress bar fed by the run's metrics.jsonl (step, accuracy, throughput, ETA).

The learner appends to metrics.jsonl, and a resumed learner rewrites it once (the lines after its checkpoint
marked rolled back: a new file renamed over the old one). The bar reads what was appended since its last look
and starts over, from the first byte of the new file, whenever the file it reads is another one (another
inode) or shorter than what it has read; records marked rolled back are not counted. A line that does not
parse yet (being written) is read again next time; a complete line that does not parse is skipped and
counted in the bar (`unreadable`), never fatal: the bar is a view, the learner owns the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from speed_async.config import Config

ROLLED_BACK = "rolled_back"  # speed_async.learner.checkpoint.ROLLED_BACK (not imported: it pulls in torch)


class Progress:
    """Reads new lines of metrics.jsonl and advances a tqdm bar."""

    def __init__(self, run_dir: Path, config: Config) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.offset = 0
        self.identity: tuple[int, int] | None = None
        """(device, inode) of the file read so far."""
        self.bar = tqdm(total=config.trainer.total_steps, unit="step", desc="speed-async", dynamic_ncols=True)
        self._shown: dict[str, str] = {}
        self._reset()

    def _reset(self) -> None:
        self.offset = 0
        self.steps = 0
        self.unreadable = 0
        self.acc: dict[str, float] = {}
        self.tokens = 0.0
        self.wall = 0.0

    def update(self) -> None:
        """Consume the records written since the last call (all of them again after a rewrite)."""
        try:
            with self.path.open("rb") as f:
                st = os.fstat(f.fileno())
                identity = (st.st_dev, st.st_ino)
                if identity != self.identity or st.st_size < self.offset:
                    self.identity = identity
                    self._reset()
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return  # not written yet, or replaced between two calls: read again next time
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        for line in chunk[:end].split(b"\n"):
            if line.strip():
                self._consume(line)
        self._show()

    def _consume(self, line: bytes) -> None:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.unreadable += 1
            return
        if not isinstance(record, dict) or record.get(ROLLED_BACK):
            return
        for key, value in record.items():
            if key.startswith("eval/") and key.endswith("/acc") and isinstance(value, int | float):
                self.acc[key.split("/")[1]] = float(value)
        if "time/step" in record:
            self.steps += 1
            self.tokens += _number(record.get("train/response_tokens"))
            self.wall = _number(record.get("time/wall")) or self.wall

    def _show(self) -> None:
        """Redraw the bar only when something changed (redrawn every poll, a log file fills up)."""
        postfix = {k: f"{v:.3f}" for k, v in self.acc.items()}
        if self.wall:
            postfix["tok/s"] = f"{self.tokens / self.wall:.0f}"
        if self.unreadable:
            postfix["unreadable lines"] = str(self.unreadable)
        if self.steps == self.bar.n and postfix == self._shown:
            return
        self._shown = postfix
        self.bar.set_postfix(postfix, refresh=False)
        if self.steps > self.bar.n:
            self.bar.update(self.steps - self.bar.n)  # redraws
        else:  # the same count, or fewer after a rewrite started the count over
            self.bar.n = self.steps
            self.bar.refresh()

    def close(self) -> None:
        """Final update and close the bar."""
        self.update()
        self.bar.close()


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0
