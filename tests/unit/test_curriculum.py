"""SPEED group assembly (sampler side) and the dispatcher's pacing and staleness rule, as pure state machines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from speed_async.curriculum.dispatch import DispatchState
from speed_async.curriculum.groups import (
    CompletedGroup,
    DroppedGroup,
    GroupAssembler,
    PromptWork,
    Response,
    ScreenOutcome,
)


def _work(pid: int, n: int = 4, n_continue: int = 20) -> PromptWork:
    return PromptWork(pid, 0, "arith", np.array([1, 2], np.int32), "3", n, n_continue)


def _responses(scores: list[float], version: int = 0) -> list[Response]:
    return [
        Response(np.array([5], np.int32), np.array([-0.1], np.float32), "stop", s, s, version, version) for s in scores
    ]


def test_speed_screens_then_continues_when_the_dispatcher_says_go() -> None:
    asm = GroupAssembler("speed")
    asm.add([_work(0), _work(1), _work(2), _work(3)])
    first = asm.next_batch(max_new=3)
    assert [(w.prompt_id, n) for w, n in first] == [(0, 4), (1, 4), (2, 4)]
    qualified = asm.complete(first[0][0], _responses([1, 0, 0, 1]))
    rejected = asm.complete(first[1][0], _responses([1, 1, 1, 1]))
    declined = asm.complete(first[2][0], _responses([0, 0, 0, 1]))
    assert isinstance(qualified, ScreenOutcome) and qualified.qualified
    assert isinstance(rejected, ScreenOutcome) and not rejected.qualified
    assert isinstance(declined, ScreenOutcome) and declined.qualified
    # Qualified screens wait for the dispatcher: nothing is continued before its decision.
    assert asm.num_pending == 2 and sorted(asm.held_keys()) == [(0, 0), (0, 2), (0, 3)]
    assert asm.next_batch(max_new=0) == []
    assert asm.decide((0, 2), go=False).prompt_id == 2  # dropped: the dispatcher hands prompt 2 out again
    assert asm.decide((0, 2), go=True) is None  # a second answer for it is moot
    assert asm.decide((0, 0), go=True).prompt_id == 0
    # The continuation of prompt 0 rides in the same engine batch as the screening of prompt 3.
    second = asm.next_batch(max_new=2)
    assert [(w.prompt_id, n) for w, n in second] == [(0, 20), (3, 4)]
    assert asm.num_pending == 0
    group = asm.complete(second[0][0], _responses([1.0] * 20, version=1))
    assert isinstance(group, CompletedGroup)
    assert len(group.responses) == 24 and group.num_screen == 4
    assert group.version == 0  # min over responses, screening included


@pytest.mark.parametrize(
    ("scores", "qualified"),
    [([0, 0, 0, 0], False), ([1, 1, 1, 1], False), ([1, 0, 0, 0], True), ([1, 1, 1, 0], True)],
)
def test_speed_band_is_open_interval(scores: list[float], qualified: bool) -> None:
    asm = GroupAssembler("speed")
    asm.add([_work(0)])
    ((work, _),) = asm.next_batch(1)
    outcome = asm.complete(work, _responses(scores))
    assert isinstance(outcome, ScreenOutcome) and outcome.qualified is qualified


def test_configured_band() -> None:
    # Band (0.25, 0.75): pass rate 0.25 is outside (open), 0.5 inside.
    asm = GroupAssembler("speed", pass_rate_low=0.25, pass_rate_high=0.75)
    asm.add([_work(0), _work(1)])
    (a, _), (b, _) = asm.next_batch(2)
    assert not asm.complete(a, _responses([1, 0, 0, 0])).qualified
    assert asm.complete(b, _responses([1, 1, 0, 0])).qualified


def test_plain_and_dapo_modes() -> None:
    plain = GroupAssembler("none")
    plain.add([_work(0, n=4, n_continue=0)])
    ((w, n),) = plain.next_batch(1)
    assert n == 4 and isinstance(plain.complete(w, _responses([1, 1, 1, 1])), CompletedGroup)
    dapo = GroupAssembler("dapo")
    dapo.add([_work(0, n=4, n_continue=0), _work(1, n=4, n_continue=0)])
    (a, _), (b, _) = dapo.next_batch(2)
    dropped = dapo.complete(a, _responses([0, 0, 0, 0]))
    assert isinstance(dropped, DroppedGroup) and dropped.reason == "zero_variance"
    assert isinstance(dapo.complete(b, _responses([0, 1, 0, 0])), CompletedGroup)


@dataclass
class _Group:
    version: int


def _state(k: int, batch: int = 2, mode: str = "none") -> DispatchState[_Group]:
    return DispatchState(100, seed=0, train_batch_size=batch, max_staleness=k, mode=mode)


def test_pacing_k0_is_synchronous() -> None:
    st = _state(k=0)
    keys = st.assign(sampler_id=0, sampler_version=0, max_prompts=10)
    assert len(keys) == 2  # room = 1 step x 2 groups, plain groups yield 1 each
    assert st.assign(0, 0, 10) == []
    for key in keys:
        st.on_group(key, _Group(0))
    batch, stale = st.take_batch(0)
    assert batch is not None and len(batch) == 2 and stale == []
    # Step 0 is training; weights v1 not yet published: nothing can be used by step 1 at lag 0.
    assert st.assign(0, 0, 10) == []
    st.published(1)
    assert len(st.assign(0, 1, 10)) == 2


def test_pacing_k1_overlaps_one_step() -> None:
    st = _state(k=1)
    assert len(st.assign(0, 0, 10)) == 4  # steps 0 and 1 can use version-0 groups


def test_stale_groups_are_dropped_and_counted_never_trained() -> None:
    st = _state(k=1)
    keys = st.assign(0, 0, 10)
    for key in keys[:2]:
        st.on_group(key, _Group(0))
    assert st.take_batch(0)[0] is not None
    st.published(1)
    for key in keys[2:]:
        st.on_group(key, _Group(0))
    assert st.take_batch(1)[0] is not None  # lag 1 <= k
    st.published(2)
    late = st.assign(0, 1, 10)
    for key in late:
        st.on_group(key, _Group(0))  # a (wrongly) old version: lag 2 > k at step 2
    batch, stale = st.take_batch(2)
    assert batch is None and len(stale) == len(late)
    assert st.metrics()["dropped/stale_groups"] == len(late)


def test_speed_accept_rate_scales_the_handout_and_lost_work_is_reissued() -> None:
    st = _state(k=0, batch=4, mode="speed")
    keys = st.assign(0, 0, 100)
    assert len(keys) == 10  # 4 groups at an initial accept rate of 0.5, with the surplus: ceil(4 / (0.5 / 1.25))
    assert st.on_screened(keys[0], qualified=True, version=0) == "go"
    assert st.on_screened(keys[1], qualified=False, version=0) == "rejected"
    lost = st.sampler_lost(0)
    assert sorted(lost) == sorted(keys[0:1] + keys[2:])
    again = st.assign(1, 0, 100)
    assert again[: len(lost)] == lost  # re-issued first
    assert st.on_group((99, 99), _Group(0)) is False  # unknown prompt: ignored, counted
    assert st.counters["ignored_results"] == 1


def test_accept_rate_is_a_mean_over_a_long_window() -> None:
    from speed_async.curriculum.dispatch import ACCEPT_PRIOR_WEIGHT, ACCEPT_WINDOW

    st = _state(k=0, batch=4, mode="speed")
    keys = st.assign(0, 0, 10_000)
    # Prior 0.5 worth 8 prompts, then 2 accepted of 8 screened: (0.5 * 8 + 2) / (8 + 8) = 0.375.
    for i, key in enumerate(keys[:8]):
        st.on_screened(key, qualified=i < 2, version=0)
    assert st.accept_rate == pytest.approx((0.5 * ACCEPT_PRIOR_WEIGHT + 2) / (ACCEPT_PRIOR_WEIGHT + 8))
    # A long run of one accepted in every 5: the estimate settles within a few points of 0.2 and stays there.
    # (A mean over the last ~10 results swings even on this regular pattern: with weight 0.1 per result it
    # peaks at M = 0.1 / (1 - 0.9 ** 5) = 0.244 after an acceptance and falls to 0.9 ** 4 * M = 0.160.)
    more = st.assign(0, 0, 10_000)
    seen = []
    for i, key in enumerate([*keys[8:], *more][:2000]):
        st.on_screened(key, qualified=i % 5 == 0, version=0)
        seen.append(st.accept_rate)
    assert all(abs(rate - 0.2) < 0.03 for rate in seen[ACCEPT_WINDOW * 2 :])
    saved = st.state_dict()
    fresh = _state(k=0, batch=4, mode="speed")
    fresh.load_state_dict(saved, ready=[])
    assert (fresh.accept_rate, fresh.accept_count) == (st.accept_rate, st.accept_count)


def test_state_dict_round_trip_reissues_in_flight() -> None:
    st = _state(k=1)
    keys = st.assign(0, 0, 10)
    st.on_group(keys[0], _Group(0))
    saved = st.state_dict()
    fresh = _state(k=1)
    fresh.load_state_dict(saved, ready=[(keys[0], _Group(0))])
    assert list(fresh.reissue) == keys[1:] and len(fresh.ready) == 1
    assert fresh.cursor.state_dict() == st.cursor.state_dict()


def test_continuations_only_while_a_reachable_batch_slot_is_open() -> None:
    # k = 1, batches of 2, sampler at version 0 while step 0 is next: a version-0 group can fill steps 0 and 1,
    # so 4 slots. Six screens qualify: the first four are continued, the last two declined and handed out again.
    st = _state(k=1, batch=2, mode="speed")
    keys = st.assign(0, 0, 100)
    assert len(keys) == 10  # 4 open slots / (accept rate 0.5 / SCREEN_SURPLUS 1.25)
    decisions = [st.on_screened(key, qualified=True, version=0) for key in keys[:6]]
    assert decisions == ["go"] * 4 + ["declined"] * 2
    assert list(st.reissue) == keys[4:6] and st.metrics()["curriculum/declined_continuations"] == 2
    # Two groups arrive and step 0 takes them; the other two continuations still fill step 1: a seventh
    # qualified screen of version 0 has no slot left, one of version 1 has step 2's two.
    for key in keys[:2]:
        st.on_group(key, _Group(0))
    assert st.take_batch(0)[0] is not None
    assert st.on_screened(keys[6], qualified=True, version=0) == "declined"
    assert st.on_screened(keys[7], qualified=True, version=1) == "go"
    # Once step 1 is taken too, a version-0 screen can reach no step at all (1 + k < 2 is not).
    for key in keys[2:4]:
        st.on_group(key, _Group(0))
    assert st.take_batch(1)[0] is not None
    assert st.open_slots(0, count_screens=False) == 0.0
    assert st.open_slots(1, count_screens=False) == 1.0  # step 2: two slots, one held by keys[7]'s continuation


def test_open_slots_place_supply_earliest_deadline_first() -> None:
    # k = 2, batches of 2, step 0 next. Three version-0 groups are ready: two fill step 0, one step 1. A group of
    # version 1 can fill steps 1..3 (6 slots), one of them taken: 5 left; version 0 reaches steps 0..2: 3 left.
    st = _state(k=2, batch=2)
    keys = st.assign(0, 0, 3)
    for key in keys:
        st.on_group(key, _Group(0))
    assert st.open_slots(1, count_screens=False) == 5.0
    assert st.open_slots(0, count_screens=False) == 3.0


def test_batches_take_the_oldest_versions_first() -> None:
    # k = 1: a late version-0 group queued behind version-1 ones goes into step 1's batch (lag 1), not the
    # version-1 groups, which can still wait for step 2; FIFO would have left it to go stale.
    st = _state(k=1, batch=2)
    st.next_step = 1
    keys = st.assign(0, 1, 10)[:3]
    for key, version in zip(keys, (1, 1, 0), strict=True):
        st.on_group(key, _Group(version))
    batch, stale = st.take_batch(1)
    assert [g.version for _, g in batch] == [0, 1] and stale == []
    assert [g.version for _, g in st.ready] == [1]
