"""Metric records: one JSON object per RL step in `metrics.jsonl`, mirrored to wandb when enabled."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Append-only JSONL sink plus an optional wandb run (offline unless configured online)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        wandb_mode: str = "disabled",
        project: str = "speed-async",
        name: str = "",
        config: Mapping[str, Any] | None = None,
        resume: bool = False,
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a" if resume else "w", buffering=1)
        self._wandb = None
        if wandb_mode != "disabled":
            import wandb

            if wandb_mode == "online" and not os.environ.get("WANDB_API_KEY"):
                raise ValueError("logging.wandb_mode = 'online' needs WANDB_API_KEY in the environment")
            self._wandb = wandb.init(
                project=project,
                name=name or None,
                dir=str(Path(run_dir)),
                mode=wandb_mode,
                config=dict(config or {}),
                resume="allow" if resume else None,
                id=None,
            )

    def log(self, record: Mapping[str, Any]) -> None:
        """Write one record (must hold `step`); non-finite floats become null in JSON."""
        assert "step" in record, "every metrics record carries its RL step"
        clean = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(clean, sort_keys=True) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if v is not None}, step=int(record["step"]))

    def close(self) -> None:
        """Flush and close the sinks."""
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(run_dir: str | Path, *, include_rolled_back: bool = False) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in order; records undone by a resume are left out unless asked.

    Safe while the run writes: the file is read in one go (a resume replaces it whole, never in place), and a
    last line without its newline is a record still being written, left for the next read. Any other line
    that is not a JSON object is a ValueError naming the file and the line.
    """
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_bytes().split(b"\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if number == len(lines):
                break  # no newline yet: being written
            raise ValueError(f"{path}, line {number}: not a JSON record ({err}); {_DAMAGED}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: not a JSON object; {_DAMAGED}")
        records.append(record)
    return records if include_rolled_back else [r for r in records if not r.get("rolled_back")]


_DAMAGED = (
    "the file is damaged (the learner only appends whole lines and rewrites it atomically): remove or repair that "
    "line to read the rest"
)
