"""The benchmarks' accuracy curves count training time: evaluation time is left out."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.runs import eval_curve


def write_metrics(run_dir: Path, records: list[dict[str, float]]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_curve_time_is_training_time_without_earlier_evaluations(tmp_path: Path) -> None:
    # Start-up 40 s; step 1 starts at 50 s after a 10 s step-0 evaluation; steps take 5 s of training each,
    # and the evaluation of version 2 stalls step 3 by 8 s.
    write_metrics(
        tmp_path,
        [
            {"step": 0, "time/wall": 50.0, "eval/a/acc": 0.5, "eval/seconds": 10.0},
            {"step": 0, "policy_version": 1, "time/wall": 55.0, "time/step": 15.0},  # with the step-0 evaluation
            {"step": 1, "policy_version": 2, "time/wall": 60.0, "time/step": 5.0},
            {"step": 2, "time/wall": 69.0, "eval/a/acc": 0.6, "eval/seconds": 8.0},
            {"step": 2, "policy_version": 3, "time/wall": 73.0, "time/step": 13.0},
            {"step": 3, "policy_version": 4, "time/wall": 78.0, "time/step": 5.0},
            {"step": 4, "time/wall": 80.0, "eval/a/acc": 0.7, "eval/seconds": 8.0, "rolled_back": True},
            {"step": 4, "time/wall": 88.0, "eval/a/acc": 0.65, "eval/seconds": 8.0},
        ],
    )
    curve = eval_curve(tmp_path)
    assert curve.steps == (0, 2, 4)
    assert curve.acc == (0.5, 0.6, 0.65)
    assert curve.wall_s == (0.0, 10.0, 20.0), "four 5 s steps, the evaluations' 18 s left out"
    assert curve.time_to(0.6) == 10.0 and curve.time_to(0.66) is None and curve.steps_to(0.65) == 4


def test_runs_without_evaluation_seconds_count_wall_time(tmp_path: Path) -> None:
    write_metrics(
        tmp_path,
        [
            {"step": 0, "time/wall": 45.0, "eval/a/acc": 0.5},
            {"step": 0, "policy_version": 1, "time/wall": 50.0, "time/step": 5.0},
            {"step": 1, "time/wall": 52.0, "eval/a/acc": 0.55},
        ],
    )
    assert eval_curve(tmp_path).wall_s == (0.0, 5.0)


def test_an_evaluation_overlapping_training_never_makes_time_run_backwards(tmp_path: Path) -> None:
    # k = 1: the evaluation of version 2 runs from 58 s to 66 s while the learner trains on buffered groups
    # (version 3 appears at 65 s); the final evaluation, of version 3, runs from 66 s to 70 s.
    write_metrics(
        tmp_path,
        [
            {"step": 0, "time/wall": 50.0, "eval/a/acc": 0.5, "eval/seconds": 0.0},
            {"step": 0, "policy_version": 1, "time/wall": 55.0, "time/step": 5.0},
            {"step": 1, "policy_version": 2, "time/wall": 60.0, "time/step": 5.0},
            {"step": 2, "policy_version": 3, "time/wall": 65.0, "time/step": 5.0},
            {"step": 2, "time/wall": 66.0, "eval/a/acc": 0.6, "eval/seconds": 8.0},
            {"step": 3, "time/wall": 70.0, "eval/a/acc": 0.7, "eval/seconds": 4.0},
        ],
    )
    # Version 2: 10 s of run, 2 of them (58-60 s) evaluating; version 3: 15 s, 7 of them (58-65 s) evaluating.
    assert eval_curve(tmp_path).wall_s == (0.0, 8.0, 8.0)


def _run_dir(path: Path, mode: str, n: int, n_continue: int, events: list[dict]) -> Path:
    path.mkdir(parents=True)
    config = {"rollout": {"n": n, "n_continue": n_continue}, "curriculum": {"mode": mode}}
    (path / "resolved_config.json").write_text(json.dumps(config))
    (path / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def test_generation_budget_counts_the_samples_behind_each_trained_group(tmp_path: Path) -> None:
    from benchmarks.runs import generation_budget

    # SPEED, n = 4 and n_continue = 12: 5 prompts screened (20 samples), 2 qualified and continued (24 more);
    # one trained, one dropped as stale; a rolled-back screening does not count. 44 samples per trained group.
    speed = [
        *[{"event": "screened"} for _ in range(5)],
        {"event": "screened", "rolled_back": True},
        {"event": "qualified"},
        {"event": "qualified"},
        {"event": "trained"},
        {"event": "dropped", "reason": "stale"},
    ]
    got = generation_budget(_run_dir(tmp_path / "speed", "speed", 4, 12, speed))
    assert (got["screened"], got["qualified"], got["trained"], got["stale"]) == (5, 2, 1, 1)
    assert got["samples"] == 5 * 4 + 2 * 12 and got["samples_per_trained"] == 44
    # DAPO, groups of 16: 3 trained, 2 zero-variance and 1 stale group dropped: 6 * 16 / 3 = 32 per trained.
    dapo = [
        *[{"event": "trained"} for _ in range(3)],
        {"event": "dropped", "reason": "zero_variance"},
        {"event": "dropped", "reason": "zero_variance"},
        {"event": "dropped", "reason": "stale"},
    ]
    got = generation_budget(_run_dir(tmp_path / "dapo", "dapo", 16, 0, dapo))
    assert (got["zero_variance"], got["stale"], got["samples_per_trained"]) == (2, 1, 32)


def test_window_rows_average_each_seed_then_over_seeds() -> None:
    from benchmarks.runs import Curve
    from benchmarks.speedup import window_rows

    # Budget 90 s in 3 windows of 30 s. Seed a: 0.6 (step 0, left out), 0.7 at 10 s, 0.8 at 40 s and 0.9 at 90 s
    # (the end belongs to the last window); seed b: 0.5 at 20 s and 0.7 at 80 s, nothing in the middle.
    a = Curve(wall_s=(0.0, 10.0, 40.0, 90.0), steps=(0, 1, 2, 3), acc=(0.6, 0.7, 0.8, 0.9))
    b = Curve(wall_s=(0.0, 20.0, 80.0), steps=(0, 1, 2), acc=(0.6, 0.5, 0.7))
    headers, rows = window_rows({"arm": [a, b]}, budget_s=90.0)
    assert headers == ["arm", "acc 0.0-0.5 min", "acc 0.5-1.0 min", "acc 1.0-1.5 min"]
    # Window 1: mean(0.7, 0.5) = 0.6, standard error stdev(0.7, 0.5) / sqrt(2) = 0.1; window 2: seed a only.
    assert rows == [["arm", "0.600 +- 0.100", "0.800 +- nan", "0.800 +- 0.100"]]


def test_vs_trl_targets_bounds_and_step_seconds() -> None:
    from benchmarks.runs import Curve
    from benchmarks.vs_trl import Pair, compare, step_seconds

    # speed-async: 0.60 -> 0.63 at 10 s -> 0.65 at 20 s; TRL: 0.61 -> 0.63 at 30 s, final 0.64 at 40 s.
    ours = Curve(wall_s=(0.0, 10.0, 20.0), steps=(0, 5, 10), acc=(0.60, 0.63, 0.65))
    trl = Curve(wall_s=(0.0, 30.0, 40.0), steps=(0, 10, 20), acc=(0.61, 0.63, 0.64))
    pair = Pair("hardmix", 0, ours, trl, step_seconds(ours), step_seconds(trl))
    assert (pair.ours_step_s, pair.trl_step_s) == (2.0, 2.0)  # training seconds per step at the last evaluation
    rows, ratios = compare([pair], gains=[2.0, 4.0, 6.0], fractions=[0.5])
    # +2 pt: ours 0.62 at 10 s, TRL 0.63 at 30 s -> 3.0. +4 pt: ours 0.64 at 20 s, TRL 0.65 never -> > 40/20.
    # +6 pt: neither -> None. 0.5 x TRL's gain (0.03): ours 0.615 at 10 s, TRL 0.625 at 30 s -> 3.0.
    assert ratios["hardmix"] == [3.0, 2.0, None, 3.0]
    assert [r[5] for r in rows] == ["3.00", ">2.00", "-", "3.00"]
    # The other way round: a target only TRL reached counts speed-async's whole time (an upper bound, "<").
    _, flipped = compare([Pair("ladder", 0, trl, ours, 2.0, 2.0)], gains=[4.0], fractions=[])
    assert flipped["ladder"] == [20.0 / 40.0]
