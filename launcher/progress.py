"""A terminal progress bar fed by the run's metrics.jsonl (step, accuracy, throughput, ETA)."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from speed_async.config import Config


class Progress:
    """Reads new lines of metrics.jsonl and advances a tqdm bar."""

    def __init__(self, run_dir: Path, config: Config) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.offset = 0
        self.bar = tqdm(total=config.trainer.total_steps, unit="step", desc="speed-async", dynamic_ncols=True)
        self.acc: dict[str, float] = {}
        self.tokens = 0.0

    def update(self) -> None:
        """Consume the records written since the last call."""
        if not self.path.exists():
            return
        with self.path.open() as f:
            f.seek(self.offset)
            chunk = f.read()
        lines = chunk.split("\n")
        complete = lines[:-1]
        self.offset += sum(len(line) + 1 for line in complete)
        for line in complete:
            if not line.strip():
                continue
            record = json.loads(line)
            for key, value in record.items():
                if key.startswith("eval/") and key.endswith("/acc") and value is not None:
                    self.acc[key.split("/")[1]] = value
            if "time/step" in record:
                self.tokens += record.get("train/response_tokens") or 0.0
                self.bar.update(1)
                wall = record.get("time/wall") or 0.0
                postfix = {k: f"{v:.3f}" for k, v in self.acc.items()}
                if wall:
                    postfix["tok/s"] = f"{self.tokens / wall:.0f}"
                self.bar.set_postfix(postfix)

    def close(self) -> None:
        """Final update and close the bar."""
        self.update()
        self.bar.close()
