"""speed-async against TRL's synchronous GRPOTrainer, side by side on one machine: time to held-out gains.

Both systems train the same model on the same data with the same prompts per step, samples per prompt,
learning rate (and warm-up, weight decay, clip), response length and temperature; both are evaluated on the
same held-out prompts with the same evaluator settings (vLLM, mean@n at temperature 1), and evaluation time is
left out of both training clocks: speed-async's in-run evaluations (`runs.eval_curve`), TRL's snapshots
evaluated afterwards (`benchmarks/trl_peer.py`). speed-async runs its config file as shipped (SPEED-RLOO,
k = 1, the CPU plan of `launcher.roles.cpu_plan`); TRL runs as a user would run it on this machine: HF
`generate`, `use_cpu`, beta 0, one optimizer step per batch, in the learner's precision of the config
(`model.train_dtype`: with `auto`, bfloat16 autocast and eager attention on an AMX CPU, float32 elsewhere).
Tasks: the ladder (`configs/tiny-cpu.toml`) and the hard mix (`configs/tiny-cpu-hardmix.toml`).

Targets, per seed and task: gains of +2, +3, +4 points over each run's own step-0 accuracy (`--gains`), and
acc0 + f x TRL's final gain for f in `--fractions`. Per target, the training seconds each system needed (its
first evaluation at or above it) and the ratio TRL / speed-async; a target TRL never reached while speed-async
did counts TRL's whole training time (a lower bound, marked >). `speedup_vs_trl` is the median over seeds and
targets of the hard mix, `speedup_vs_trl_ladder` the same on the ladder. Also per step: the mean RL-step time
of both (`step_time_ratio` = speed-async / TRL: training seconds per step, evaluation left out).

    python benchmarks/vs_trl.py [--quick] [--seeds 0,1,2] [--budget-s 400] [--out results.md] [--plot fig.png]
    python benchmarks/vs_trl.py --analyze DIR      # tables and plot again from kept run directories

TRL is an optional extra: `pip install -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import emit, machine, print_table  # noqa: E402
from benchmarks.runs import (  # noqa: E402
    Curve,
    budget_overrides,
    default_model,
    eval_curve,
    median_or_none,
    run_train,
)
from benchmarks.trl_peer import INSTALL_HINT  # noqa: E402

TASKS = {"hardmix": "configs/tiny-cpu-hardmix.toml", "ladder": "configs/tiny-cpu.toml"}
TRL_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Pair:
    """One seed of one task: both systems' accuracy curves and mean step times."""

    task: str
    seed: int
    ours: Curve
    trl: Curve
    ours_step_s: float
    trl_step_s: float


def _trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def run_trl(config: str, model: str, out: Path, seed: int, args: argparse.Namespace) -> None:
    """TRL's training run, then the evaluation of its snapshots, each a process of its own."""
    common = [
        sys.executable, str(ROOT / "benchmarks" / "trl_peer.py"), "--out", str(out), "--config", config,
        "--model", model, "--seed", str(seed), "--eval-n", str(args.eval_n), "--eval-prompts", str(args.eval_prompts),
    ]  # fmt: skip
    # The same overrides on both sides: TRL's run reads the settings both share (learning rate, batch, response
    # length) and its evaluator the engine's (dtype, temperature) from the config; the rest it ignores.
    common += [arg for override in args.set for arg in ("--set", override)]
    train = [*common, "--budget-s", str(args.budget_s), "--eval-every", str(args.trl_eval_every)]
    if args.use_vllm:
        train.append("--use-vllm")
    for argv in (train, [*common, "--evaluate-only"]):
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=TRL_TIMEOUT_S, check=False)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
            raise RuntimeError(f"{' '.join(argv[1:3])} into {out} exited with code {done.returncode}:\n{tail}")


def trl_curve(out: Path) -> Curve:
    """TRL's accuracy curve (training seconds, steps, accuracy) from trl_curve.json."""
    data = json.loads((out / "trl_curve.json").read_text())
    evals = sorted(data["evals"], key=lambda e: e["step"])
    return Curve(
        wall_s=tuple(float(e["train_s"]) for e in evals),
        steps=tuple(int(e["step"]) for e in evals),
        acc=tuple(float(e["acc"]) for e in evals),
    )


def step_seconds(curve: Curve) -> float:
    """Seconds of training per RL step: training time at the last evaluation over its step (both systems'
    clocks leave out start-up and evaluation; speed-async's `time/step` would count an evaluation's stall)."""
    return curve.wall_s[-1] / curve.steps[-1]


def targets(pair: Pair, gains: list[float], fractions: list[float]) -> list[tuple[str, float, float]]:
    """(name, target for speed-async, target for TRL): each system's own step-0 accuracy plus the same gain."""
    out = [(f"+{g:g} pt", pair.ours.acc[0] + g / 100, pair.trl.acc[0] + g / 100) for g in gains]
    trl_gain = pair.trl.acc[-1] - pair.trl.acc[0]
    if trl_gain > 0:
        out += [
            (f"{f:g} x TRL gain", pair.ours.acc[0] + f * trl_gain, pair.trl.acc[0] + f * trl_gain) for f in fractions
        ]
    return out


def compare(pairs: list[Pair], gains: list[float], fractions: list[float]) -> tuple[list[list[Any]], dict[str, list]]:
    """Rows (task, seed, target, seconds of each, ratio TRL / speed-async) and the ratios per task. A system that
    never reached a target the other reached stands in with its whole training time: a lower bound of the ratio
    (shown `>`) when TRL never got there, an upper bound (shown `<`) when speed-async never did; None when
    neither did (left out of the medians)."""
    rows, ratios = [], {}
    for pair in pairs:
        for name, ours_target, trl_target in targets(pair, gains, fractions):
            ours_s, trl_s = pair.ours.time_to(ours_target), pair.trl.time_to(trl_target)
            mark = ""
            if trl_s is None and ours_s is not None:
                trl_s, mark = pair.trl.wall_s[-1], ">"
            elif ours_s is None and trl_s is not None:
                ours_s, mark = pair.ours.wall_s[-1], "<"
            ratio = trl_s / ours_s if ours_s and trl_s else None
            ratios.setdefault(pair.task, []).append(ratio)
            shown = "-" if ratio is None else f"{mark}{ratio:.2f}"
            ours_cell = ("> " if mark == "<" else "") + _s(ours_s)
            trl_cell = ("> " if mark == ">" else "") + _s(trl_s)
            rows.append([pair.task, pair.seed, name, ours_cell, trl_cell, shown])
    return rows, ratios


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.0f}"


def curve_rows(pairs: list[Pair]) -> list[list[Any]]:
    """Per run: step-0 and final accuracy, training seconds, steps and mean step time."""
    rows = []
    for p in pairs:
        for system, curve, step_s in (("speed-async", p.ours, p.ours_step_s), ("TRL", p.trl, p.trl_step_s)):
            rows.append([p.task, p.seed, system, f"{curve.acc[0]:.3f}", f"{curve.acc[-1]:.3f}", f"{max(curve.acc):.3f}",
                         f"{curve.wall_s[-1]:.0f}", curve.steps[-1], f"{step_s:.2f}"])  # fmt: skip
    return rows


def plot(pairs: list[Pair], out: Path) -> None:
    """Accuracy against training seconds, one panel per task, both systems, every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({p.task for p in pairs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for j, p in enumerate(q for q in pairs if q.task == task):
            for system, curve, color in (("speed-async", p.ours, "C0"), ("TRL GRPOTrainer", p.trl, "C3")):
                ax.plot(curve.wall_s, curve.acc, color=color, marker=".", alpha=0.8, label=system if j == 0 else None)
        ax.set_title(f"{task} ({TASKS[task]})")
        ax.set_xlabel("training seconds (start-up and evaluation left out)")
        ax.set_ylabel("held-out accuracy (mean@n)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def load_pairs(base: Path, tasks: list[str], seeds: list[int]) -> list[Pair]:
    """The pairs whose two run directories exist under `base` (<task>-ours-s<seed>, <task>-trl-s<seed>)."""
    pairs = []
    for task in tasks:
        for seed in seeds:
            ours, trl = base / f"{task}-ours-s{seed}", base / f"{task}-trl-s{seed}"
            if (ours / "metrics.jsonl").is_file() and (trl / "trl_curve.json").is_file():
                ours_curve, trl = eval_curve(ours), trl_curve(trl)
                pairs.append(Pair(task, seed, ours_curve, trl, step_seconds(ours_curve), step_seconds(trl)))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="hardmix,ladder", help=f"comma-separated, of {sorted(TASKS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget-s", type=float, default=400.0, help="training seconds of every run")
    parser.add_argument("--eval-every", type=int, default=5, help="speed-async: evaluate every this many steps")
    parser.add_argument("--trl-eval-every", type=int, default=3, help="TRL: snapshot every this many steps")
    parser.add_argument("--eval-prompts", type=int, default=300, help="held-out prompts per evaluation")
    parser.add_argument("--eval-n", type=int, default=4, help="samples per held-out prompt (mean@n)")
    parser.add_argument("--gains", default="2,3,4", help="targets: points over each run's step-0 accuracy")
    parser.add_argument("--fractions", default="0.5,0.8", help="targets: fractions of TRL's final gain")
    parser.add_argument("--use-vllm", action="store_true", help="TRL with its colocated vLLM (use_vllm=True)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="speed-async override")
    parser.add_argument("--quick", action="store_true", help="1 seed, 120 s per run")
    parser.add_argument("--keep-runs", action="store_true")
    parser.add_argument("--analyze", type=Path, help="re-read kept run directories instead of running")
    parser.add_argument("--out", type=Path, help="write a results markdown file here")
    parser.add_argument("--plot", type=Path, help="write the accuracy figure here (PNG)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.budget_s = "0", 120.0
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    gains, fractions = [float(g) for g in args.gains.split(",")], [float(f) for f in args.fractions.split(",")]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        sys.exit(f"--tasks {unknown} unknown; allowed: {sorted(TASKS)}")
    started = time.time()
    if args.analyze:
        base = args.analyze
    else:
        if not _trl_available():
            sys.exit(INSTALL_HINT)
        base = Path(tempfile.mkdtemp(prefix="vs-trl-"))
        model = default_model()
        common = [
            *budget_overrides(args.budget_s, args.eval_every, args.eval_prompts, args.eval_n),
            "trainer.save_every=0",
            *args.set,
        ]
        for seed in seeds:  # seed-major, systems alternating: a drift of the machine hits both alike
            for task in tasks:
                ours = base / f"{task}-ours-s{seed}"
                info = run_train(TASKS[task], model, ours, [*common, f"trainer.seed={seed}"])
                print(f"{task} seed {seed}: speed-async {info['run_s']:.0f} s ({ours})", flush=True)
                trl = base / f"{task}-trl-s{seed}"
                run_trl(TASKS[task], model, trl, seed, args)
                print(f"{task} seed {seed}: TRL done ({trl})", flush=True)
    pairs = load_pairs(base, tasks, seeds)
    if not pairs:
        sys.exit(f"no finished pairs of run directories under {base}")
    rows, ratios = compare(pairs, gains, fractions)
    headers = ["task", "seed", "target", "speed-async s", "TRL s", "TRL / speed-async"]
    print_table(headers, rows)
    run_headers = ["task", "seed", "system", "acc0", "final", "best", "train s", "steps", "s/step"]
    print_table(run_headers, curve_rows(pairs))
    step = {
        task: statistics.median(p.ours_step_s / p.trl_step_s for p in pairs if p.task == task)
        for task in {p.task for p in pairs}
    }
    result = {
        "benchmark": "vs_trl",
        "speedup_vs_trl": median_or_none(ratios.get("hardmix", [])),
        "speedup_vs_trl_ladder": median_or_none(ratios.get("ladder", [])),
        "step_time_ratio": step,
        "targets_reached": {t: sum(r is not None for r in v) for t, v in ratios.items()},
        "targets_total": {t: len(v) for t, v in ratios.items()},
        "precision": precision(base, tasks, seeds),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs_dir": str(base) if args.keep_runs or args.analyze else None,
        "minutes": round((time.time() - started) / 60, 1),
        "machine": machine(),
    }
    if args.plot:
        plot(pairs, args.plot)
    if args.out:
        _write(args.out, headers, rows, run_headers, curve_rows(pairs), result)
    if not (args.keep_runs or args.analyze):
        shutil.rmtree(base, ignore_errors=True)
    emit(result)


def precision(base: Path, tasks: list[str], seeds: list[int]) -> dict[str, dict[str, object]]:
    """Per task, the dtypes speed-async's learner and engine resolved to (from its run's logs) and TRL's precision
    (from its trl_curve.json), of the first seed's runs."""
    found: dict[str, dict[str, object]] = {}
    for task in tasks:
        ours, trl = base / f"{task}-ours-s{seeds[0]}", base / f"{task}-trl-s{seeds[0]}" / "trl_curve.json"
        entry: dict[str, object] = {}
        for role, name, pattern in (
            ("learner", "learner", "learner computes in "),
            ("engine", "sampler-0", "engine dtype "),
        ):
            log = ours / "logs" / f"{name}.log"
            lines = log.read_text().splitlines() if log.is_file() else []
            line = next((x for x in lines if pattern in x), None)
            if line is not None:
                entry[f"speed_async_{role}"] = line.split(pattern, 1)[1].strip()
        if trl.is_file():
            data = json.loads(trl.read_text())
            entry["trl"] = {k: data.get(k) for k in ("bf16", "attn_implementation", "threads")}
        found[task] = entry
    return found


def _write(path: Path, headers: list[str], rows: list, run_headers: list[str], runs: list, result: dict) -> None:
    def table(h: list[str], r: list) -> str:
        lines = ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
        return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in r])

    text = (
        "# speed-async vs TRL GRPOTrainer (benchmarks/vs_trl.py)\n\n"
        f"Command: `python benchmarks/vs_trl.py {' '.join(sys.argv[1:])}`\n\n"
        f"## Time to target\n\n{table(headers, rows)}\n\n## Runs\n\n{table(run_headers, runs)}\n\n"
        f"## JSON\n\n```\n{json.dumps(result, sort_keys=True)}\n```\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
