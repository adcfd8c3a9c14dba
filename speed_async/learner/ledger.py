"""The ledger: one JSON line per event in a prompt's life, so anyone can account for every prompt.

Events: dispatched, reissued, screened, qualified, rejected, trained, dropped. Each line holds `prompt_id`,
`epoch`, `event`, the wall time `t`, and where it applies `sampler`, `version`, `pass_rate`, `step`, `lag`,
`reason`. A resumed run appends to the same file.
"""

from __future__ import annotations

import json
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

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def read_ledger(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Every event of a run's ledger, in order (a torn last line from a killed run is skipped)."""
    path = Path(run_dir) / "ledger.jsonl"
    for line in path.read_text().splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue
