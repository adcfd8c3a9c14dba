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
    """The records of a run's metrics.jsonl, in order; records undone by a resume are left out unless asked."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records if include_rolled_back else [r for r in records if not r.get("rolled_back")]
