"""Staleness ablation: SPEED-RLOO with k in {1, 2, 4} under each off-policy correction (none, TIS, MIS,
IcePop), against the synchronous run (k = 0, no correction), on one wall-clock budget or one step count.

Per arm (medians over seeds): RL steps and seconds per step, time (or steps, with --steps) to target held-out
accuracy, final and best accuracy, the lag histogram of every trained group (ledger `trained` events), mean
staleness, the groups dropped for staleness, and the off-policy statistics of the steps (medians over steps of
the importance ratio pi_old / pi_behaviour's p1 and p99, the k3 KL estimate and the share of response tokens
the correction truncated or masked). Targets come from the synchronous run without correction (k = 0,
`none`): acc0 + f * (best - acc0) for f in --fractions. At k = 0 only `none` runs (the other corrections
would only see the engine/learner mismatch); pass --k0-all to run them there too.

    python benchmarks/staleness.py [--quick] [--ks 0,1,2,4] [--corrections none,tis,mis,icepop] [--seeds 0,1,2]
        [--budget-s 150 | --steps 40] [--out results.md]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import emit, machine, print_table  # noqa: E402
from benchmarks.runs import (  # noqa: E402
    Arm,
    add_arm_args,
    budget_overrides,
    default_model,
    eval_curve,
    fmt,
    median_or_none,
    plot_curves,
    run_arms,
    step_records,
)
from speed_async.algorithms.off_policy import CORRECTIONS  # noqa: E402


def lag_histogram(run_dir: Path) -> Counter[int]:
    """How many trained groups had each lag (effective ledger history)."""
    from speed_async.orchestrator.ledger import read_ledger

    return Counter(int(e["lag"]) for e in read_ledger(run_dir) if e["event"] == "trained" and not e.get("rolled_back"))


OFF_POLICY = ("ratio_p1", "ratio_p99", "kl_k3", "masked_frac")
"""Per-step off-policy statistics (train/offpolicy/<name>) summarised per arm."""


def off_policy_summary(steps: list[list[dict[str, Any]]]) -> dict[str, float | None]:
    """Median over the seeds of the median over steps of each OFF_POLICY statistic (None where not logged)."""
    out: dict[str, float | None] = {}
    for name in OFF_POLICY:
        key = f"train/offpolicy/{name}"
        per_run = [
            statistics.median(r[key] for r in s if r.get(key) is not None)
            for s in steps
            if any(r.get(key) is not None for r in s)
        ]
        out[name] = statistics.median(per_run) if per_run else None
    return out


def main() -> None:
    """Run the arms, print the table and the JSON line; write the results file and the plot when asked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="k in {0, 2}, none and IcePop, 1 seed, 45 s budget")
    parser.add_argument("--ks", default="0,1,2,4", help="comma-separated staleness bounds (must include 0)")
    parser.add_argument("--corrections", default="none,tis,mis,icepop", help=f"comma-separated of {CORRECTIONS}")
    parser.add_argument("--k0-all", action="store_true", help="run every correction at k = 0 too, not only none")
    parser.add_argument("--steps", type=int, default=0, help="run this many RL steps (no wall-clock budget)")
    add_arm_args(parser, seeds="0", reference="k=0 best")
    args = parser.parse_args()
    if args.quick:
        args.ks, args.corrections, args.seeds, args.budget_s, args.eval_every, args.eval_prompts = (
            "0,2", "none,icepop", "0", 45.0, 3, 100,
        )  # fmt: skip
    ks = [int(k) for k in args.ks.split(",")]
    corrections = args.corrections.split(",")
    if 0 not in ks or "none" not in corrections or set(corrections) - set(CORRECTIONS):
        raise SystemExit(f"--ks must include 0 and --corrections must include none (the reference), from {CORRECTIONS}")
    seeds = [int(s) for s in args.seeds.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    arms = [
        Arm(f"k{k}-{c}", (f"pipeline.max_staleness={k}", f"algorithm.off_policy_correction={c}"))
        for c in corrections
        for k in ks
        if k > 0 or c == "none" or args.k0_all
    ]
    model = args.model or default_model()
    common = [*budget_overrides(args.budget_s, args.eval_every, args.eval_prompts, args.eval_n), *args.set]
    if args.steps:  # a fixed number of steps: accuracy per step, whatever else runs on the machine
        common += ["trainer.time_budget_s=0", f"trainer.total_steps={args.steps}"]
    base = Path(tempfile.mkdtemp(prefix="bench-staleness-"))
    started = time.time()
    dirs = run_arms(arms, seeds, args.config, model, base, common)
    curves = {a.name: [eval_curve(dirs[(a.name, s)]) for s in seeds] for a in arms}
    reference = curves["k0-none"]
    acc0 = statistics.median(c.acc[0] for cs in curves.values() for c in cs)
    best = statistics.median(max(c.acc) for c in reference)
    targets = [acc0 + f * (best - acc0) for f in fractions if best > acc0]

    table_rows, per_arm = [], {}
    for arm in arms:
        runs = [dirs[(arm.name, s)] for s in seeds]
        steps = [step_records(d) for d in runs]
        lags: Counter[int] = Counter()
        for d in runs:
            lags.update(lag_histogram(d))
        if args.steps:
            times = {t: median_or_none([c.steps_to(t) for c in curves[arm.name]]) for t in targets}
        else:
            times = {t: median_or_none([c.time_to(t) for c in curves[arm.name]]) for t in targets}
        record = {
            "steps": statistics.median(len(s) for s in steps),
            "s_per_step": statistics.median(statistics.median(r["time/step"] for r in s[1:] or s) for s in steps),
            "acc_final": statistics.median(c.acc[-1] for c in curves[arm.name]),
            "acc_best": statistics.median(max(c.acc) for c in curves[arm.name]),
            "time_to_target_s": {f"{t:.4f}": v for t, v in times.items()},
            "lag_histogram": dict(sorted(lags.items())),
            "staleness_mean": statistics.median(statistics.mean(r["staleness/mean"] for r in s) for s in steps),
            "dropped_stale_groups": statistics.median(s[-1].get("dropped/stale_groups", 0.0) for s in steps),
            "off_policy": off_policy_summary(steps),
        }
        if args.steps:
            record["steps_to_target"] = record.pop("time_to_target_s")
        per_arm[arm.name] = record
        table_rows.append(
            [
                arm.name, f"{record['steps']:.0f}", f"{record['s_per_step']:.2f}",
                *(fmt(v if args.steps else v / 60 if v is not None else None, 0 if args.steps else 2)
                  for v in times.values()),
                f"{record['acc_final']:.3f}", f"{record['acc_best']:.3f}",
                " ".join(f"{lag}:{n}" for lag, n in sorted(lags.items())), f"{record['staleness_mean']:.2f}",
                f"{record['dropped_stale_groups']:.0f}",
                *(fmt(record["off_policy"][name], 4) for name in OFF_POLICY),
            ]
        )  # fmt: skip
    if args.plot:
        plot_curves(curves, args.plot, f"{args.config}: staleness bound k x off-policy correction, SPEED-RLOO")
    if not args.keep_runs:
        shutil.rmtree(base, ignore_errors=True)
    unit = "steps" if args.steps else "min"
    headers = ["arm", "RL steps", "s/step", *(f"{unit} to {t:.3f}" for t in targets), "acc final", "acc best"]
    headers += ["lag histogram", "staleness", "stale drops", "ratio p1", "ratio p99", "KL k3", "masked"]
    budget = f"{args.steps} steps" if args.steps else f"budget {args.budget_s:.0f} s"
    print(f"\nstaleness: {args.config}, {budget} per run, seeds {seeds}, acc0 {acc0:.3f}")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_table(headers, table_rows)
    print(buf.getvalue())
    result: dict[str, Any] = {"benchmark": "staleness", "targets": targets, "acc0": acc0, "arms": per_arm}
    result["curves"] = {n: [dict(wall_s=c.wall_s, steps=c.steps, acc=c.acc) for c in cs] for n, cs in curves.items()}
    result.update({"args": {**vars(args), "out": str(args.out), "plot": str(args.plot)}, "machine": machine()})
    result["elapsed_s"] = time.time() - started
    emit(result)
    if args.out:
        lines = ["# Staleness ablation", "", f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}", "", "## Machine", ""]
        lines += [f"- {k}: {v}" for k, v in result["machine"].items()]
        lines += ["", "## Command", "", "```", shlex.join(["python", *sys.argv]), "```", ""]
        lines += ["## Results", "", "```", buf.getvalue().rstrip(), "```", "", "## JSON", "", "```json"]
        lines += [json.dumps(result, sort_keys=True, default=str), "```", ""]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines))
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
