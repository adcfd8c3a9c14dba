"""Running `speed-async train` arms for the benchmarks and reading their accuracy curves.

An arm is a name plus config overrides; every arm of one comparison runs the same config file, model and data
on the same machine, one after another, each into its own run directory. Accuracy curves come from the
evaluation records of metrics.jsonl (`eval/<source>/acc` at `time/wall` seconds since the learner started).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 1800.0


def default_model() -> str:
    """The embedded tiny model's directory (built and cached on first use)."""
    from speed_async.tiny import ensure_tiny_model

    return str(ensure_tiny_model())


def run_train(config: str, model: str, run_dir: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """Run `speed-async train` as a subprocess into `run_dir`; return its wall seconds and the load around it.

    Raises RuntimeError naming the run directory and the output tail when the run fails.
    """
    argv = [
        sys.executable, "-m", "speed_async", "train", "--config", config, f"model.path={model}",
        f"trainer.run_dir={run_dir}", "logging.wandb_mode=disabled", "logging.progress=false", *overrides,
    ]  # fmt: skip
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).splitlines()[-30:])
        raise RuntimeError(f"speed-async train into {run_dir} exited with code {out.returncode}:\n{tail}")
    return {"run_s": seconds, "load_before": load_before, "load_after": os.getloadavg()[0]}


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The effective records of run_dir/metrics.jsonl (rolled-back lines left out)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a finished run directory")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if not r.get("rolled_back")]


@dataclass(frozen=True)
class Curve:
    """Held-out accuracy of one run: (seconds of training, RL steps, accuracy) at each evaluation, in order."""

    wall_s: tuple[float, ...]
    steps: tuple[int, ...]
    acc: tuple[float, ...]

    def time_to(self, target: float) -> float | None:
        """Wall seconds of the first evaluation at or above `target`; None if the run never got there."""
        for wall, acc in zip(self.wall_s, self.acc, strict=True):
            if acc >= target:
                return wall
        return None

    def steps_to(self, target: float) -> int | None:
        """RL steps at the first evaluation at or above `target`; None if never."""
        for step, acc in zip(self.steps, self.acc, strict=True):
            if acc >= target:
                return step
        return None


def eval_curve(run_dir: Path, source: str | None = None) -> Curve:
    """The accuracy curve of `source` (default: the first eval source found) from a finished run.

    Time is training time: the wall seconds from the start of the first RL step (engine start-up, the same for
    every arm, left out) to the end of the step that produced version v, less the time the samplers spent on
    evaluations within that span. An evaluation occupied the samplers for its `eval/seconds` up to the moment
    its record was written (the learner writes it after the step during which the last result came in). At
    k = 0 an evaluation stalls the whole pipeline, so this is exact; at k >= 1 the learner may train on
    buffered groups meanwhile, so part of an evaluation's time that did not delay training is left out too.
    Like wall time, training time never decreases from one evaluation to the next. Version 0 sits at 0.
    """
    records = read_records(run_dir)
    steps = {int(r["policy_version"]): r for r in records if "time/step" in r}  # by the version they produced
    origin = steps[min(steps)]["time/wall"] - steps[min(steps)]["time/step"] if steps else 0.0
    evals = [r for r in records if any(k.startswith("eval/") and k.endswith("/acc") for k in r)]
    if not evals:
        raise ValueError(f"{run_dir}/metrics.jsonl has no evaluation records (eval/<source>/acc)")
    if source is None:
        source = next(k for k in evals[0] if k.startswith("eval/") and k.endswith("/acc")).split("/")[1]
    busy = _union([(float(r["time/wall"]) - float(r.get("eval/seconds", 0.0)), float(r["time/wall"])) for r in evals])
    key = f"eval/{source}/acc"
    evals = sorted((r for r in evals if key in r), key=lambda r: r["step"])
    wall = []
    for r in evals:
        version = int(r["step"])
        end = float(steps[version]["time/wall"]) if version in steps else float(r["time/wall"])
        spent = sum(max(0.0, min(b, end) - max(a, origin)) for a, b in busy)
        wall.append(max(0.0, end - origin - spent) if version else 0.0)
    steps_done = tuple(int(r["step"]) for r in evals)
    return Curve(wall_s=tuple(wall), steps=steps_done, acc=tuple(float(r[key]) for r in evals))


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint, sorted intervals covering the same points as `intervals`."""
    merged: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def generation_budget(run_dir: Path) -> dict[str, float]:
    """Where a run's samples went, from its ledger and resolved config: groups trained, dropped as stale and
    dropped for zero reward variance (DAPO), prompts screened and qualified (SPEED), and the samples
    generated per trained group. Samples: SPEED screens n per prompt and continues qualified ones with
    n_continue more; the other modes generate whole groups of n (trained or dropped)."""
    config = json.loads((run_dir / "resolved_config.json").read_text())
    n, n_continue = config["rollout"]["n"], config["rollout"]["n_continue"]
    counts: dict[str, int] = {"trained": 0, "stale": 0, "zero_variance": 0, "screened": 0, "qualified": 0}
    for line in (run_dir / "ledger.jsonl").read_text().splitlines():
        event = json.loads(line) if line.strip() else {}
        if event.get("rolled_back") or not event:
            continue
        kind = event["event"]
        if kind == "dropped":
            counts["stale" if event["reason"] == "stale" else "zero_variance"] += 1
        elif kind in counts:
            counts[kind] += 1
    if config["curriculum"]["mode"] == "speed":
        samples = counts["screened"] * n + counts["qualified"] * n_continue
    else:
        samples = (counts["trained"] + counts["stale"] + counts["zero_variance"]) * n
    per_group = samples / counts["trained"] if counts["trained"] else float("nan")
    return {**{k: float(v) for k, v in counts.items()}, "samples": float(samples), "samples_per_trained": per_group}


def step_records(run_dir: Path) -> list[dict[str, Any]]:
    """The RL-step records (those with `time/step`), in step order."""
    return sorted((r for r in read_records(run_dir) if "time/step" in r), key=lambda r: r["step"])


def median_or_none(values: Sequence[float | None]) -> float | None:
    """Median of the values that are not None; None when there are none."""
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def fmt(value: float | None, digits: int = 0, missing: str = "-") -> str:
    """A number for a table, or `missing`."""
    return missing if value is None else f"{value:.{digits}f}"


@dataclass(frozen=True)
class Arm:
    """One configuration of a comparison: a name and its config overrides."""

    name: str
    overrides: tuple[str, ...]


def budget_overrides(budget_s: float, eval_every: int, eval_prompts: int, eval_n: int) -> list[str]:
    """Overrides every arm of a time-to-accuracy comparison shares: a wall-clock budget (the step count is
    left open, so the learning rate stays constant after warm-up) and the evaluation schedule; engine settings
    stay the config file's (start-up is not training time: `eval_curve`)."""
    return [
        f"trainer.time_budget_s={budget_s}", "trainer.total_steps=100000", "optim.lr_schedule=constant",
        f"trainer.eval_every={eval_every}",
        f"trainer.eval_max_prompts={eval_prompts}", f"trainer.eval_n={eval_n}",
    ]  # fmt: skip


def run_arms(
    arms: Sequence[Arm], seeds: Sequence[int], config: str, model: str, base: Path, common: Sequence[str]
) -> dict[tuple[str, int], Path]:
    """Run every arm with every seed (seed-major order, so a slow drift of the machine hits all arms alike);
    returns the run directory of each (arm, seed)."""
    dirs: dict[tuple[str, int], Path] = {}
    for seed in seeds:
        for arm in arms:
            run_dir = base / f"{arm.name}-s{seed}"
            info = run_train(config, model, run_dir, [*common, *arm.overrides, f"trainer.seed={seed}"])
            curve = eval_curve(run_dir)
            print(
                f"{arm.name} seed {seed}: {len(step_records(run_dir))} steps in {info['run_s']:.0f} s, accuracy "
                f"{curve.acc[0]:.3f} -> {curve.acc[-1]:.3f} (best {max(curve.acc):.3f}), load "
                f"{info['load_before']:.2f} -> {info['load_after']:.2f}  ({run_dir})",
                flush=True,
            )
            dirs[(arm.name, seed)] = run_dir
    return dirs


def plot_curves(curves: dict[str, list[Curve]], out: Path, title: str) -> None:
    """Accuracy against wall-clock minutes, every seed of an arm in the arm's colour (the paper's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, runs) in enumerate(curves.items()):
        color = f"C{i}"
        for j, curve in enumerate(runs):
            ax.plot(
                [w / 60 for w in curve.wall_s], curve.acc, color=color, alpha=0.8, marker=".",
                label=name if j == 0 else None, linestyle="-" if "k1" in name or "k=1" in name else "--",
            )  # fmt: skip
    ax.set_xlabel("training time (minutes; engine start-up and evaluations left out)")
    ax.set_ylabel("held-out accuracy (mean@k)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def add_arm_args(parser: argparse.ArgumentParser, seeds: str, reference: str) -> None:
    """The options every time-to-accuracy comparison takes (config, budget, evaluation, targets, outputs)."""
    parser.add_argument("--config", default="configs/tiny-cpu.toml", help="TOML config (relative to the repo root)")
    parser.add_argument("--model", default=None, help="HF model dir (default: the embedded tiny model)")
    parser.add_argument("--seeds", default=seeds, help="comma-separated seeds")
    parser.add_argument("--budget-s", type=float, default=150.0, help="wall-clock budget of every run")
    parser.add_argument("--eval-every", type=int, default=5, help="evaluate every this many RL steps")
    parser.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts per evaluation")
    parser.add_argument("--eval-n", type=int, default=4, help="samples per held-out prompt (mean@n)")
    parser.add_argument("--fractions", default="0.5,0.8", help=f"targets: acc0 + f * ({reference} - acc0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override, all arms")
    parser.add_argument("--keep-runs", action="store_true", help="keep the run directories (printed)")
    parser.add_argument("--out", type=Path, help="write a results markdown file here")
    parser.add_argument("--plot", type=Path, help="write accuracy against wall-clock here (PNG)")
