"""The ledger: one JSON line per event in a prompt's life, so anyone can account for every prompt.

Events: dispatched, reissued, screened, qualified, rejected, trained, dropped. Each line holds `prompt_id`,
`epoch`, `event`, the wall time `t`, and where it applies `sampler`, `version`, `pass_rate`, `step`, `lag`,
`reason`. A resumed run appends to the same file; lines written after the checkpoint it resumed from stay
in the file marked `"rolled_back": true` (see speed_async.learner.checkpoint), and `read_ledger` skips them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EVENTS = ("dispatched", "reissued", "screened", "qualified", "rejected", "trained", "dropped")


class Ledger:
    """Append-only JSONL writer (line-buffered, so a killed run keeps every complete line)."""

    def __init__(self, run_dir: str | Path, *, resume: bool = False) -> None:
        self.path = Path(run_dir) / "ledger.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a" if resume else "w", buffering=1)
        self._t0 = time.time()

    def write(self, event: str, prompt_id: int, epoch: int, **fields: Any) -> None:
        """Record one event of prompt (epoch, prompt_id)."""
        assert event in EVENTS, f"unknown ledger event {event!r}"
        record = {"event": event, "prompt_id": int(prompt_id), "epoch": int(epoch), "t": round(time.time(), 3)}
        record.update(fields)
        self._file.write(json.dumps(record) + "\n")

    def offset(self) -> int:
        """Bytes in the file so far, every complete line flushed (the checkpoint's resume point)."""
        self._file.flush()
        return os.fstat(self._file.fileno()).st_size

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def read_ledger(run_dir: str | Path, *, include_rolled_back: bool = False) -> Iterator[dict[str, Any]]:
    """The events of a run's ledger, in order: the effective history (events rolled back by a resume are
    skipped unless `include_rolled_back`; a torn last line from a killed run is skipped)."""
    path = Path(run_dir) / "ledger.jsonl"
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if include_rolled_back or not event.get("rolled_back"):
            yield event
