"""SPEED vs its base algorithm on the embedded task: wall-clock to target held-out accuracy (the paper's Table 1).

Arms (same config file, model, data, train_batch_size and mini-batch setting, same machine and wall-clock budget):
  rloo        plain groups of n + n_continue responses, RLOO advantages
  speed-rloo  SPEED: n screening samples, n_continue more for prompts with pass rate in (0, 1), RLOO
  dapo        groups of n + n_continue, zero-variance groups dropped (dynamic sampling), GRPO, clip-higher 0.28
  speed-dapo  SPEED screening instead of dynamic sampling, GRPO, clip-higher 0.28
each synchronous (k = 0) and asynchronous (k = 1), over several seeds. Every run stops at the same wall-clock
budget (`trainer.time_budget_s`) and is evaluated every `--eval-every` RL steps.

Targets, as the paper chose them from what the baseline reaches: for each pair, acc0 + f * (best - acc0) for
f in --fractions, where acc0 is the median step-0 accuracy and best the median over seeds of the synchronous
base's best accuracy. Time to target = training seconds (`runs.eval_curve`: from the start of the first RL
step, engine start-up and evaluation time left out) to the run's first evaluation at or above it. Speedup =
base time / SPEED time, paired by seed, for every target both reached after their start (a step-0 evaluation
that already meets a target is noise, not speed); `speedup_speed_over_base` is the median over pairs, seeds
and targets (k = 0 for both);
`speedup_speed_async_over_sync_rloo` compares SPEED-RLOO at k = 1 with RLOO at k = 0.

    python benchmarks/speedup.py [--quick] [--seeds 0,1,2] [--budget-s 150] [--out results.md] [--plot fig.png]
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import emit, machine, print_table  # noqa: E402
from benchmarks.runs import (  # noqa: E402
    Arm,
    Curve,
    add_arm_args,
    budget_overrides,
    default_model,
    eval_curve,
    fmt,
    generation_budget,
    median_or_none,
    plot_curves,
    run_arms,
    step_records,
)

DAPO = ("algorithm.advantage=grpo", "algorithm.clip_high=0.28")


def arms_for(n: int, n_continue: int) -> dict[str, Arm]:
    """The eight arms; the base algorithms sample groups of n + n_continue (SPEED's full group size)."""
    group = n + n_continue
    algos = {
        "rloo": (f"rollout.n={group}", "rollout.n_continue=0", "curriculum.mode=none", "algorithm.advantage=rloo"),
        "speed-rloo": ("curriculum.mode=speed", "algorithm.advantage=rloo"),
        "dapo": (f"rollout.n={group}", "rollout.n_continue=0", "curriculum.mode=dapo", *DAPO),
        "speed-dapo": ("curriculum.mode=speed", *DAPO),
    }
    return {
        f"{name}-k{k}": Arm(f"{name}-k{k}", (*overrides, f"pipeline.max_staleness={k}"))
        for name, overrides in algos.items()
        for k in (0, 1)
    }


PAIRS = [("rloo", "speed-rloo"), ("dapo", "speed-dapo")]


def targets_for(base: list[Curve], all_runs: list[Curve], fractions: list[float]) -> list[float]:
    """acc0 + f * (median best of the base - acc0), for the fractions that give a target above acc0."""
    acc0 = statistics.median(c.acc[0] for c in all_runs)
    best = statistics.median(max(c.acc) for c in base)
    return [acc0 + f * (best - acc0) for f in fractions if best > acc0]


def _ratios(base: list[float | None], other: list[float | None]) -> list[float]:
    """base / other time to a target, paired by seed, where both runs got there after their start: a run
    whose step-0 evaluation already meets the target (time 0, evaluation noise) says nothing about speed."""
    return [b / o for b, o in zip(base, other, strict=True) if b and o]


def compare(
    curves: dict[str, list[Curve]], seeds: list[int], fractions: list[float]
) -> tuple[list[list[Any]], dict[str, Any]]:
    """The paper-format rows and the summary numbers."""
    rows: list[list[Any]] = []
    speedups: list[float] = []
    async_speedups: list[float] = []
    per_pair: dict[str, Any] = {}
    for base, speed in PAIRS:
        b0, s0, s1 = f"{base}-k0", f"{speed}-k0", f"{speed}-k1"
        if b0 not in curves or s0 not in curves:
            continue
        pool = [c for name in (b0, f"{base}-k1", s0, s1) for c in curves.get(name, [])]
        targets = targets_for(curves[b0], pool, fractions)
        pair: dict[str, Any] = {"targets": targets, "rows": []}
        for target in targets:
            t_base = [c.time_to(target) for c in curves[b0]]
            t_speed = [c.time_to(target) for c in curves[s0]]
            t_async = [c.time_to(target) for c in curves.get(s1, [])]
            ratios = _ratios(t_base, t_speed)
            speedups += ratios
            a_ratios = []
            if base == "rloo" and t_async:
                a_ratios = _ratios(t_base, t_async)
                async_speedups += a_ratios
            row = {
                "target": target,
                "base_min": median_or_none([t / 60 if t is not None else None for t in t_base]),
                "speed_min": median_or_none([t / 60 if t is not None else None for t in t_speed]),
                "speed_async_min": median_or_none([t / 60 if t is not None else None for t in t_async]),
                "base_reached": sum(t is not None for t in t_base),
                "speed_reached": sum(t is not None for t in t_speed),
                "speed_async_reached": sum(t is not None for t in t_async),
                "speedup": median_or_none(ratios),
                "speedup_async": median_or_none(a_ratios),
            }
            pair["rows"].append(row)
            n = len(seeds)
            rows.append(
                [
                    f"{base} -> {speed}", f"{target:.3f}",
                    f"{fmt(row['base_min'], 2)} ({row['base_reached']}/{n})",
                    f"{fmt(row['speed_min'], 2)} ({row['speed_reached']}/{n})",
                    fmt(row["speedup"], 2),
                    f"{fmt(row['speed_async_min'], 2)} ({row['speed_async_reached']}/{n})",
                    fmt(row["speedup_async"], 2),
                ]
            )  # fmt: skip
        per_pair[f"{base}_vs_{speed}"] = pair
    summary = {
        "speedup_speed_over_base": median_or_none(speedups),
        "speedup_speed_async_over_sync_rloo": median_or_none(async_speedups),
        "speedup_pairs_counted": len(speedups),
        "pairs": per_pair,
    }
    return rows, summary


FINAL_HEADERS = [
    "arm", "acc step 0", "acc final", "acc best", "RL steps", "s/step", "stale drops", "zero-var drops",
    "samples/group",
]  # fmt: skip


def final_rows(curves: dict[str, list[Curve]], dirs: dict[tuple[str, int], Path]) -> list[list[Any]]:
    """Per arm, medians over seeds: step-0, final and best accuracy, RL steps, seconds per step, groups dropped
    as stale and for zero variance, and samples generated per trained group (`runs.generation_budget`)."""
    rows = []
    for name, runs in curves.items():
        arm_dirs = [d for (arm, _), d in dirs.items() if arm == name]
        steps = [step_records(d) for d in arm_dirs]
        budgets = [generation_budget(d) for d in arm_dirs]
        rows.append(
            [
                name,
                f"{statistics.median(c.acc[0] for c in runs):.3f}",
                f"{statistics.median(c.acc[-1] for c in runs):.3f}",
                f"{statistics.median(max(c.acc) for c in runs):.3f}",
                f"{statistics.median(len(s) for s in steps):.0f}",
                f"{statistics.median(statistics.median(r['time/step'] for r in s[1:] or s) for s in steps):.2f}",
                f"{statistics.median(b['stale'] for b in budgets):.0f}",
                f"{statistics.median(b['zero_variance'] for b in budgets):.0f}",
                f"{statistics.median(b['samples_per_trained'] for b in budgets):.1f}",
            ]
        )
    return rows


def window_rows(curves: dict[str, list[Curve]], budget_s: float, parts: int = 3) -> tuple[list[str], list[list[Any]]]:
    """Held-out accuracy by stretch of training time, a view that needs no target: the budget cut into
    `parts` equal windows; per seed the mean of its evaluations in a window (step 0 left out), then the mean
    and standard error over seeds. Returns the headers and one row per arm."""
    edges = [budget_s * i / parts for i in range(parts + 1)]
    headers = ["arm", *(f"acc {a / 60:.1f}-{b / 60:.1f} min" for a, b in itertools.pairwise(edges))]
    rows = []
    for name, runs in curves.items():
        row: list[Any] = [name]
        for i, (a, b) in enumerate(itertools.pairwise(edges)):
            last = i == parts - 1
            in_window = [
                [x for w, x, st in zip(c.wall_s, c.acc, c.steps, strict=True) if st > 0 and a <= w and (w < b or last)]
                for c in runs
            ]
            per_seed = [statistics.mean(accs) for accs in in_window if accs]
            if not per_seed:
                row.append("-")
                continue
            se = statistics.stdev(per_seed) / len(per_seed) ** 0.5 if len(per_seed) > 1 else float("nan")
            row.append(f"{statistics.mean(per_seed):.3f} +- {se:.3f}")
        rows.append(row)
    return headers, rows


def main() -> None:
    """Run the arms, print the tables and the JSON line; write the results file and the plot when asked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="rloo-k0 vs speed-rloo-k0, 1 seed, 45 s budget")
    parser.add_argument("--arms", default="all", help="comma-separated arm names, or all")
    parser.add_argument("--analyze", type=Path, help="no runs: read <arm>-s<seed>/ of a --keep-runs directory")
    add_arm_args(parser, seeds="0,1,2", reference="base best")
    args = parser.parse_args()
    if args.quick:
        args.arms, args.seeds, args.budget_s, args.eval_every, args.eval_prompts = (
            "rloo-k0,speed-rloo-k0", "0", 45.0, 3, 100,
        )  # fmt: skip
    from speed_async.config import load_config

    base_config = load_config(ROOT / args.config, args.set)
    all_arms = arms_for(base_config.rollout.n, base_config.rollout.n_continue)
    names = list(all_arms) if args.arms == "all" else args.arms.split(",")
    unknown = [n for n in names if n not in all_arms]
    if unknown:
        raise SystemExit(f"--arms {unknown} unknown; allowed: {list(all_arms)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    model = args.model or (default_model() if not args.analyze else "")
    common = [*budget_overrides(args.budget_s, args.eval_every, args.eval_prompts, args.eval_n), *args.set]
    started = time.time()
    if args.analyze:  # the kept run directories of an earlier invocation: tables and plot only
        base, args.keep_runs = args.analyze, True
        dirs = {(n, s): base / f"{n}-s{s}" for n in names for s in seeds}
    else:
        base = Path(tempfile.mkdtemp(prefix="bench-speedup-"))
        dirs = run_arms([all_arms[n] for n in names], seeds, args.config, model, base, common)
    curves = {name: [eval_curve(dirs[(name, s)]) for s in seeds] for name in names}
    if args.plot:
        plot_curves(curves, args.plot, f"{args.config}: held-out accuracy, {len(seeds)} seed(s)")

    print(f"\nspeedup: {args.config}, budget {args.budget_s:.0f} s per run, seeds {seeds}")
    finals = final_rows(curves, dirs)
    text = _table(FINAL_HEADERS, finals)
    rows, summary = compare(curves, seeds, fractions)
    headers2 = ["pair", "target", "base min (reached)", "SPEED min (reached)", "speedup", "SPEED k=1 min"]
    headers2.append("k=1 vs base")
    text += "\n" + _table(headers2, rows)
    headers3, rows3 = window_rows(curves, args.budget_s)
    text += "\n" + _table(headers3, rows3)
    result: dict[str, Any] = {"benchmark": "speedup", **summary}
    result["curves"] = {n: [dict(wall_s=c.wall_s, steps=c.steps, acc=c.acc) for c in cs] for n, cs in curves.items()}
    paths = {name: str(getattr(args, name)) for name in ("out", "plot", "analyze")}
    result.update({"args": {**vars(args), **paths}, "machine": machine()})
    result["elapsed_s"] = time.time() - started
    if not args.keep_runs:
        shutil.rmtree(base, ignore_errors=True)
    emit(result)
    if args.out:
        _write(args.out, text, result)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_table(headers, rows)
    print(buf.getvalue())
    return buf.getvalue()


def _write(path: Path, table: str, result: dict[str, Any]) -> None:
    import json

    info = result["machine"]
    lines = ["# SPEED vs base: wall-clock to target accuracy", "", f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}", ""]
    lines += ["## Machine", "", *[f"- {k}: {v}" for k, v in info.items()], ""]
    lines += ["## Command", "", "```", shlex.join(["python", *sys.argv]), "```", ""]
    lines += ["## Results", "", "```", table.rstrip(), "```", ""]
    lines += ["## JSON", "", "```json", json.dumps(result, sort_keys=True, default=str), "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
