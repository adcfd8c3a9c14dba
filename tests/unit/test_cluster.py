"""Roles of torchrun workers in a multi-node run (launcher.cluster), without starting any process."""

from __future__ import annotations

import pytest

from launcher.cluster import assign_role, cluster_config, under_torchrun
from speed_async.config import load_config


def test_first_ranks_learn_and_the_rest_sample() -> None:
    roles = [assign_role(rank, 8, num_learner_ranks=3) for rank in range(8)]
    assert [r.name for r in roles] == [
        "learner[0]", "learner[1]", "learner[2]",
        "sampler[0]", "sampler[1]", "sampler[2]", "sampler[3]", "sampler[4]",
    ]  # fmt: skip
    assert all(r.world_size == 8 for r in roles)
    assert [r.global_rank for r in roles] == list(range(8))


def test_a_world_without_room_for_a_sampler_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"cluster.num_learner_ranks = 2 .* world of 2 workers"):
        assign_role(0, 2, num_learner_ranks=2)


def test_the_number_of_samplers_follows_the_workers_started() -> None:
    config = load_config(None, ["cluster.num_learner_ranks=2", "cluster.num_samplers=1"])
    assert cluster_config(config, 8).cluster.num_samplers == 6
    assert cluster_config(config, 8).cluster.num_learner_ranks == 2


def test_torchrun_workers_are_recognised(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert not under_torchrun()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("RANK", "1")
    assert not under_torchrun()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert under_torchrun()


def test_a_sampler_runs_the_loop_class_the_benchmark_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.roles import SAMPLER_LOOP_ENV, sampler_loop_class
    from speed_async.sampler.loop import SamplerLoop

    monkeypatch.delenv(SAMPLER_LOOP_ENV, raising=False)
    assert sampler_loop_class() is SamplerLoop
    monkeypatch.setenv(SAMPLER_LOOP_ENV, "benchmarks.long_tail_loops:BatchedLoop")
    assert sampler_loop_class().__name__ == "BatchedLoop" and issubclass(sampler_loop_class(), SamplerLoop)
    for bad, reason in (("nope", "cannot be loaded"), ("speed_async.config:Config", "is not a subclass")):
        monkeypatch.setenv(SAMPLER_LOOP_ENV, bad)
        with pytest.raises(ValueError, match=f"{SAMPLER_LOOP_ENV}='{bad}' {reason}"):
            sampler_loop_class()
