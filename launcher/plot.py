"""Accuracy against wall-clock and against RL steps for several runs on one figure (the paper's style).

One colour per run, one line style per eval data source; the left panel's x axis is the run's wall-clock
(`time/wall` of each eval record, minutes), the right panel's is the RL step whose weights were measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v")


def check_run_dirs(run_dirs: Sequence[Path]) -> None:
    """Raise ValueError naming the first entry that is not a run directory with a metrics.jsonl."""
    if not run_dirs:
        raise ValueError("no run directory given")
    for run_dir in run_dirs:
        if not (Path(run_dir) / "metrics.jsonl").is_file():
            what = "no metrics.jsonl in it" if Path(run_dir).is_dir() else "not a directory"
            raise ValueError(f"{run_dir}: {what}; expected a run directory written by `speed-async train`")


def plot_runs(run_dirs: Sequence[Path], out: Path) -> bool:
    """Draw every eval source of every run into `out`; returns False (and writes nothing) when no run has an
    evaluation yet. Raises ValueError for an entry without metrics.jsonl."""
    check_run_dirs(run_dirs)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from launcher.report import eval_history

    histories = [(Path(d), eval_history(Path(d))) for d in run_dirs]
    if not any(h for _, h in histories):
        return False
    sources = sorted({source for _, history in histories for source in history})
    style = {source: (LINE_STYLES[i % len(LINE_STYLES)], MARKERS[i % len(MARKERS)]) for i, source in enumerate(sources)}
    labels = _run_labels([d for d, _ in histories])
    fig, (ax_time, ax_step) = plt.subplots(1, 2, figsize=(11, 4))
    for i, ((_, history), run_label) in enumerate(zip(histories, labels, strict=True)):
        colour = f"C{i % 10}"
        for source, points in sorted(history.items()):
            points = sorted(points)
            line, marker = style[source]
            label = f"{run_label}: {source}" if len(sources) > 1 else run_label
            accs = [p[2] for p in points]
            kwargs = {"color": colour, "linestyle": line, "marker": marker, "markersize": 4}
            ax_time.plot([p[1] / 60 for p in points], accs, label=label, **kwargs)
            ax_step.plot([p[0] for p in points], accs, label=label, **kwargs)
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


def _run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Each run's directory name, or its parent/name where two runs share a name."""
    names = [d.resolve().name for d in run_dirs]
    return [
        f"{d.resolve().parent.name}/{name}" if names.count(name) > 1 else name
        for d, name in zip(run_dirs, names, strict=True)
    ]
