"""What a finished run prints: where its results are, accuracy before/after, and a plot."""

from __future__ import annotations

from pathlib import Path

from launcher.plot import plot_runs
from speed_async.metrics import read_metrics


def eval_history(run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """{data_source: [(step, wall seconds, accuracy), ...]} from metrics.jsonl."""
    history: dict[str, list[tuple[int, float, float]]] = {}
    for record in read_metrics(run_dir):
        for key, value in record.items():
            if key.startswith("eval/") and key.endswith("/acc") and value is not None:
                source = key[len("eval/") : -len("/acc")]
                history.setdefault(source, []).append((int(record["step"]), float(record["time/wall"]), value))
    return history


def final_report(run_dir: Path) -> str:
    """A few lines: accuracy first -> last per source, wall-clock, and the paths of results and plot."""
    lines = [f"run finished: {run_dir}"]
    records = [r for r in read_metrics(run_dir) if "time/step" in r]
    if records:
        lines.append(f"  RL steps: {len(records)} in {records[-1]['time/wall']:.0f} s")
    for source, points in eval_history(run_dir).items():
        points.sort()
        (s0, _, a0), (s1, _, a1) = points[0], points[-1]
        lines.append(f"  eval/{source}/acc: {a0:.3f} (step {s0}) -> {a1:.3f} (step {s1}), {a1 - a0:+.3f}")
    plot = run_dir / "accuracy.png"
    if plot_runs([run_dir], plot):
        lines.append(f"  plot: {plot}")
    lines.append(f"  metrics: {run_dir / 'metrics.jsonl'}  ledger: {run_dir / 'ledger.jsonl'}")
    lines.append(f"  final model (HF format): {run_dir / 'final_model'}")
    return "\n".join(lines)
