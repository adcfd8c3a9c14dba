"""Weight-update modes: `rollout.weight_update_mode` keep vs wait vs abort, the measurement behind the default.

Each mode trains `--steps` RL steps of configs/tiny-cpu.toml (SPEED-RLOO, k = 1, evaluation off) per seed; the
modes run one after the other within a seed, in reverse order for odd seeds, so that a drift of the machine's
load hits every mode alike. Per mode (over seeds): median seconds per RL step (the steps after the first two),
groups dropped as stale, mean and max lag of the trained groups, responses whose tokens span two versions, and
prompts returned by an abort.

    python benchmarks/update_modes.py [--quick] [--steps 30] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import emit, machine, print_table  # noqa: E402
from benchmarks.runs import default_model, run_train, step_records  # noqa: E402

MODES = ("keep", "wait", "abort")


def run_stats(run_dir: Path) -> dict[str, float]:
    """Step time, stale drops, lags and returned prompts of one finished run."""
    from speed_async.orchestrator.ledger import read_ledger

    steps = step_records(run_dir)
    ledger = [e for e in read_ledger(run_dir) if not e.get("rolled_back")]
    lags = [int(e["lag"]) for e in ledger if e["event"] == "trained"]
    last = steps[-1]
    return {
        "step_s": statistics.median(r["time/step"] for r in steps[2:]),
        "stale_drops": float(sum(1 for e in ledger if e["event"] == "dropped" and e["reason"] == "stale")),
        "lag_mean": statistics.mean(lags),
        "lag_max": float(max(lags)),
        "spanning": float(last.get("rollout/responses_spanning_versions", 0)),
        "aborted": float(sum(1 for e in ledger if e["event"] == "reissued" and e.get("reason") == "aborted")),
        "stale_in_flight": float(
            sum(1 for e in ledger if e["event"] == "reissued" and e.get("reason") == "stale_in_flight")
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 steps, one seed")
    parser.add_argument("--config", default="configs/tiny-cpu.toml", help="TOML config (relative to the repo root)")
    parser.add_argument("--model", default=None, help="HF model dir (default: the embedded tiny model)")
    parser.add_argument("--steps", type=int, default=30, help="RL steps per run")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--keep-runs", action="store_true", help="keep the run directories (printed)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds = 10, "0"
    model = args.model or default_model()
    seeds = [int(s) for s in args.seeds.split(",")]
    base = Path(tempfile.mkdtemp(prefix="bench-update-modes-"))
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    common = [f"trainer.total_steps={args.steps}", "trainer.eval_every=0", "pipeline.max_staleness=1"]
    try:
        for i, seed in enumerate(seeds):
            for mode in MODES if i % 2 == 0 else tuple(reversed(MODES)):
                run_dir = base / f"{mode}-s{seed}"
                info = run_train(
                    str(ROOT / args.config), model, run_dir,
                    [*common, f"rollout.weight_update_mode={mode}", f"trainer.seed={seed}"],
                )  # fmt: skip
                stats = run_stats(run_dir)
                runs[mode].append(stats)
                print(
                    f"{mode} seed {seed}: {stats['step_s']:.2f} s/step, {stats['stale_drops']:.0f} stale drops, load "
                    f"{info['load_before']:.2f} -> {info['load_after']:.2f} ({run_dir})",
                    flush=True,
                )
    finally:
        if not args.keep_runs:
            shutil.rmtree(base, ignore_errors=True)
    summary: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        rs = runs[mode]
        summary[mode] = {
            "step_s_median": statistics.median(r["step_s"] for r in rs),
            "step_s_per_seed": [r["step_s"] for r in rs],
            **{k: sum(r[k] for r in rs) for k in ("stale_drops", "spanning", "aborted", "stale_in_flight")},
            "lag_mean": statistics.mean(r["lag_mean"] for r in rs),
            "lag_max": max(r["lag_max"] for r in rs),
        }
    print(f"\nweight-update modes: {args.config}, k = 1, {args.steps} steps x seeds {args.seeds}")
    print_table(
        ["mode", "s/step (median)", "per seed", "stale drops", "lag mean", "lag max", "spanning", "aborted",
         "stale in flight"],
        [[m, s["step_s_median"], " ".join(f"{x:.2f}" for x in s["step_s_per_seed"]), s["stale_drops"], s["lag_mean"],
          s["lag_max"], s["spanning"], s["aborted"], s["stale_in_flight"]] for m, s in summary.items()],
    )  # fmt: skip
    fastest = min(MODES, key=lambda m: summary[m]["step_s_median"])
    emit({"benchmark": "update_modes", "fastest": fastest, "modes": summary, "args": vars(args), "machine": machine()})


if __name__ == "__main__":
    main()
