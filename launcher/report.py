"""What the launcher prints about a run: a failed role's own error, and for a finished run where its results
are, accuracy before/after, and a plot."""

from __future__ import annotations

import contextlib
import re
import signal
from pathlib import Path

from launcher.plot import plot_runs
from speed_async.accounting import format_summary, summarize
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
    """A few lines: accuracy first -> last per source, wall-clock, where the step time went (learner parts and
    each sampler's activities, `speed_async.accounting`), and the paths of results and plot."""
    lines = [f"run finished: {run_dir}"]
    records = [r for r in read_metrics(run_dir) if "time/step" in r]
    if records:
        lines.append(f"  RL steps: {len(records)} in {records[-1]['time/wall']:.0f} s; where the step time went:")
        lines.extend("  " + line for line in format_summary(summarize(records)))
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


# ---- a failed role ------------------------------------------------------------------------------------------
_RANK_PREFIX = re.compile(r"^\[(?:rank|default)?\d+\]:")
"""torchrun's per-rank line prefix (`[rank0]:`), when it adds one."""
_NOT_A_CONTINUATION = re.compile(
    r"^(Traceback \(most recent call last\):|During handling of the above|The above exception was|"
    r"[EWIF]\d{4} \d\d:\d\d|\d{4}-\d\d-\d\d[ T]\d\d:\d\d|=+$|speed-async: )"
)
"""Lines that end an exception's message: a new traceback, a glog line (torchrun's), a logging record, a
banner, the launcher's own lines."""
_BANNER_ERRORS = ("ChildFailedError",)
"""Exceptions that only report another process's failure (torchrun's banner): never a role's own error."""
MAX_ERROR_LINES = 8


def _exceptions(lines: list[str]) -> list[list[str]]:
    """The exception line(s) that end each traceback in `lines` (a message may span several lines)."""
    found = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("Traceback (most recent call last):"):
            i += 1
            continue
        i += 1
        while i < len(lines) and (lines[i].startswith((" ", "\t")) or not lines[i].strip()):
            i += 1
        block = []
        while i < len(lines) and lines[i].strip() and len(block) < MAX_ERROR_LINES:
            if block and _NOT_A_CONTINUATION.match(lines[i]):
                break
            block.append(lines[i].rstrip())
            i += 1
        if block:
            found.append(block)
    return found


def role_errors(log_path: Path, offset: int = 0) -> list[str]:
    """A role's own account of why it failed, from its log after byte `offset` (where this process started
    writing): its logged ERROR records (the last three) and the exception of its last traceback, torchrun's
    ChildFailedError report left out. Empty when the log holds neither (e.g. the process was killed)."""
    try:
        with log_path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    lines = [_RANK_PREFIX.sub("", line, count=1).removeprefix(" ") for line in text.splitlines()]
    logged = [line.rstrip() for line in lines if " ERROR: " in line or " CRITICAL: " in line][-3:]
    raised = [block for block in _exceptions(lines) if not any(b in block[0] for b in _BANNER_ERRORS)]
    last = raised[-1] if raised else []
    if last and any(last[0].split(": ", 1)[-1][:80] in line for line in logged):
        last = []  # the role logged this error already
    return logged + last


def describe_exit(code: int) -> str:
    """`exited with code 1`, or `was killed by SIGKILL (exit code -9)`."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name} (exit code {code})"
    return f"exited with code {code}"


def failure_report(role: str, pid: int, code: int, log_path: Path, offset: int = 0) -> str:
    """What the launcher prints when a role's process fails: role, PID and exit code, the role's own error
    lines (or, without any, the last lines of its log), then the log's path."""
    errors = role_errors(log_path, offset)
    head = f"speed-async: {role} (pid {pid}) {describe_exit(code)}"
    if errors:
        body = "; its error:\n" + "\n".join(f"    {line}" for line in errors)
    else:
        try:
            tail = log_path.read_text(errors="replace").splitlines()[-5:]
        except OSError:
            tail = []
        body = "; no error in its log" + ("; its last lines:\n" + "\n".join(f"    {t}" for t in tail) if tail else "")
    return f"{head}{body}\n  log: {log_path}"
