"""Accuracy against wall-clock and against RL steps for several runs on one figure (the paper's style)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_runs(run_dirs: Sequence[Path], out: Path) -> bool:
    """Draw every eval source of every run; returns False when no run has an evaluation yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from launcher.report import eval_history

    histories = [(Path(d), eval_history(Path(d))) for d in run_dirs]
    if not any(h for _, h in histories):
        return False
    fig, (ax_time, ax_step) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir, history in histories:
        for source, points in sorted(history.items()):
            points = sorted(points)
            label = f"{run_dir.name}: {source}" if len(history) > 1 else run_dir.name
            ax_time.plot([p[1] / 60 for p in points], [p[2] for p in points], marker="o", label=label)
            ax_step.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=label)
    ax_time.set_xlabel("wall-clock (minutes)")
    ax_step.set_xlabel("RL step")
    for ax in (ax_time, ax_step):
        ax.set_ylabel("held-out accuracy (mean@k)")
        ax.grid(alpha=0.3)
    ax_step.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True
