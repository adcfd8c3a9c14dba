"""A real sampler process (vLLM on CPU, math-verify rewards, ZeroMQ) driven by the test as its dispatcher.

Checks the three modes end to end: SPEED emits only groups whose screening pass rate is strictly inside the
band, of size n + n_continue, with the rejected prompts reported; plain groups are all emitted; DAPO drops
zero-variance groups and reports them. Rewards are recomputed from the decoded responses, and behaviour
log-probs are compared with a transformers forward pass of the same weights. In one of them the "learner"
then stops answering, and the sampler must report it (naming what it waited for) and exit with status 3
within pipeline.request_timeout_s. In plain mode every group goes to the engine at once, and each must be
streamed when its own longest response is done, not when the longest of all is: the order of arrival follows
the groups' longest responses.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from speed_async.config import load_config
from speed_async.data.arithmetic import load_split
from speed_async.data.templates import render_prompt
from speed_async.protocol import (
    ContinueDecision,
    GroupDropped,
    Heartbeat,
    Hello,
    NoWork,
    RolloutGroup,
    ScreenReport,
    Shutdown,
    WorkAssignment,
    WorkItem,
    WorkRequest,
)
from speed_async.rewards import math_reward
from speed_async.transport import Context, PullSocket, RouterSocket
from tests.e2e.harness import kill_group, log_tail, start_sampler

pytestmark = pytest.mark.e2e
NUM_PROMPTS = 12
# fp32 on both sides; tests/e2e/test_engine.py measured max |diff| 9.5e-7 on the engine alone.
LOGPROB_TOL = 1e-3


def _items(tokenizer, n: int, n_continue: int) -> list[WorkItem]:
    records = load_split("test")[:NUM_PROMPTS]
    return [
        WorkItem(
            prompt_id=i,
            epoch=0,
            data_source=r.data_source,
            prompt_token_ids=np.array(tokenizer.encode(render_prompt(r)), dtype=np.int32),
            ground_truth=r.ground_truth,
            num_screen=n,
            num_continue=n_continue,
        )
        for i, r in enumerate(records)
    ]


def _drive(
    tmp_path: Path,
    model: Path,
    overrides: list[str],
    *,
    then_hang: bool = False,
    decline: frozenset[int] = frozenset(),
    ignore_first_qualified: bool = False,
) -> tuple[list, list[WorkItem], Path]:
    """Hand the prompts to a real sampler and collect what it streams back, answering each qualified screen with
    a ContinueDecision (go, except for the prompt ids in `decline`; none at all for the first qualified screen
    with `ignore_first_qualified`); then tell it to stop or, with `then_hang`, stop answering (a hung learner)
    and check that it reports that and exits with status 3."""
    config = load_config(
        None, ["rollout.max_response_length=48", "rollout.gen_batch_size=6", "rollout.enforce_eager=true", *overrides]
    )
    tokenizer = AutoTokenizer.from_pretrained(model)
    items = _items(tokenizer, config.rollout.n, config.rollout.n_continue if config.curriculum.mode == "speed" else 0)
    ctx = Context()
    router, pull = RouterSocket(ctx), PullSocket(ctx)
    endpoints = {"work": router.bind_endpoint("127.0.0.1", 0), "results": pull.bind_endpoint("127.0.0.1", 0)}
    proc = start_sampler(config, tmp_path, model, 0, endpoints)
    results: list = []
    handed_out = False
    finished: set[int] = set()
    deadline = time.monotonic() + 240
    try:
        while len(finished) < len(items):
            assert proc.poll() is None, f"sampler exited early:\n{log_tail(tmp_path / 'sampler-0.log')}"
            assert time.monotonic() < deadline, f"timed out; finished {sorted(finished)}"
            got = router.recv(0.05)
            if got is not None:
                identity, msg = got
                assert isinstance(msg, Hello | WorkRequest | Heartbeat), msg
                if isinstance(msg, WorkRequest):
                    reply = (
                        NoWork(retry_after_s=0.2, reason="test")
                        if handed_out
                        else WorkAssignment(items=items, version=0)
                    )
                    handed_out = True
                    router.send_to(identity, reply)
            msg = pull.recv(0.05)
            if msg is None:
                continue
            results.append(msg)
            if isinstance(msg, ScreenReport) and msg.qualified and ignore_first_qualified:
                ignore_first_qualified = False  # its GroupDropped("no_decision") finishes it
            elif isinstance(msg, ScreenReport) and msg.qualified:
                go = msg.prompt_id not in decline
                router.send_to(identity, ContinueDecision(prompt_id=msg.prompt_id, epoch=msg.epoch, go=go))
                if not go:
                    finished.add(msg.prompt_id)
            if isinstance(msg, RolloutGroup | GroupDropped) or (isinstance(msg, ScreenReport) and not msg.qualified):
                finished.add(msg.prompt_id)
        if then_hang:
            hung_at = time.time()
            code = proc.wait(timeout=120)
            log = (tmp_path / "sampler-0.log").read_text(errors="replace")
            assert code == 3, log_tail(tmp_path / "sampler-0.log")
            line = next((x for x in log.splitlines() if "the learner is unresponsive: the dispatcher at" in x), "")
            assert "tcp://127.0.0.1:" in line and "did not answer a work request within" in line, log_tail(
                tmp_path / "sampler-0.log"
            )
            # When the sampler reported it (its log line's time), not when the process had exited: shutting the
            # engine and reward workers down afterwards took up to 30 s on a loaded machine.
            reported = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            waited = reported - hung_at
            limit = config.pipeline.request_timeout_s
            assert limit - 1 <= waited < limit + 15, f"reported after {waited:.1f} s (request_timeout_s = {limit})"
        else:
            router.send_to(identity, Shutdown(reason="test over"))
            assert proc.wait(timeout=60) == 0, log_tail(tmp_path / "sampler-0.log")
    finally:
        kill_group(proc)
        router.close()
        pull.close()
        ctx.close()
    return results, items, model


def _check_rewards_and_logprobs(groups: list[RolloutGroup], items: list[WorkItem], model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    worst = 0.0
    for group in groups:
        item = items[group.prompt_id]
        for r in group.responses():
            text = tokenizer.decode(r.token_ids, skip_special_tokens=True)
            assert r.score == math_reward(text, item.ground_truth), (text, item.ground_truth)
            assert r.reward == r.score  # no overlong penalty configured
            assert r.finish_reason in ("stop", "length")
            assert r.version_min == r.version_max == 0
        # Behaviour log-probs of the first two responses against a transformers forward pass.
        for r in list(group.responses())[:2]:
            ids = torch.tensor(np.concatenate([item.prompt_token_ids, r.token_ids]), dtype=torch.long)[None]
            with torch.no_grad():
                logits = model(ids).logits[0, len(item.prompt_token_ids) - 1 : -1]
            ref = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, len(item.prompt_token_ids) :, None])[:, 0]
            worst = max(worst, float((ref - torch.from_numpy(np.array(r.logprobs))).abs().max()))
    assert worst < LOGPROB_TOL, f"behaviour log-probs differ from transformers by {worst}"


def test_speed_mode_emits_only_qualified_complete_groups(tmp_path: Path, tiny_model_dir: Path) -> None:
    # The dispatcher declines the continuation of the odd prompts: their screens are dropped, never continued.
    # It never answers the first qualified screen: after request_timeout_s the sampler returns that prompt.
    decline = frozenset(range(1, NUM_PROMPTS, 2))
    overrides = ["rollout.n=4", "rollout.n_continue=4", "pipeline.request_timeout_s=8"]
    started = time.monotonic()
    results, items, model = _drive(tmp_path, tiny_model_dir, overrides, decline=decline, ignore_first_qualified=True)
    screens = {m.prompt_id: m for m in results if isinstance(m, ScreenReport)}
    groups = [m for m in results if isinstance(m, RolloutGroup)]
    assert set(screens) == set(range(NUM_PROMPTS)), "every prompt is screened exactly once"
    (unanswered,) = [m for m in results if isinstance(m, GroupDropped)]
    first = next(m for m in results if isinstance(m, ScreenReport) and m.qualified)
    assert (unanswered.prompt_id, unanswered.reason) == (first.prompt_id, "no_decision")
    assert time.monotonic() - started >= 8, "returned only after pipeline.request_timeout_s"
    continued = {p for p, s in screens.items() if s.qualified and p not in decline} - {first.prompt_id}
    assert {g.prompt_id for g in groups} == continued, "exactly the qualified prompts the dispatcher let go on"
    assert continued and any(s.qualified for p, s in screens.items() if p in decline), "both decisions were made"
    for group in groups:
        assert group.num_responses == 8 and group.num_screen == 4
        screening = group.scores[:4]
        assert 0 < screening.mean() < 1, "only prompts whose screening pass rate is inside (0, 1) continue"
        assert screens[group.prompt_id].qualified
        np.testing.assert_array_equal(screens[group.prompt_id].rewards, screening)
    rejected = [s for s in screens.values() if not s.qualified]
    assert all(s.rewards.mean() in (0.0, 1.0) for s in rejected)
    _check_rewards_and_logprobs(groups, items, model)


def test_plain_mode_emits_every_group_then_reports_a_hung_learner(tmp_path: Path, tiny_model_dir: Path) -> None:
    overrides = ["curriculum.mode=none", "rollout.n=6", "pipeline.request_timeout_s=8"]
    results, items, model = _drive(tmp_path, tiny_model_dir, overrides, then_hang=True)
    groups = [m for m in results if isinstance(m, RolloutGroup)]
    assert sorted(g.prompt_id for g in groups) == list(range(NUM_PROMPTS))
    assert all(g.num_responses == 6 for g in groups)
    assert not [m for m in results if isinstance(m, ScreenReport | GroupDropped)]
    # All 12 prompts ran in the engine together; a group is emitted when its longest response is scored, so
    # groups arrive in the order of their longest responses (ties and scoring batches aside). A sampler that
    # emitted after its longest request of all (one generate call per round) orders them by prompt instead:
    # a rank correlation of 0.6 or more then has a chance of about 2% over 12 groups.
    longest = [float(g.response_lengths.max()) for g in groups]
    assert min(longest) < max(longest), f"the responses' lengths did not spread: {longest}"
    rho = _spearman(list(range(len(groups))), longest)
    assert rho >= 0.6, f"groups arrived in this order of longest responses: {longest} (rank correlation {rho:.2f})"
    _check_rewards_and_logprobs(groups[:3], items, model)


def _rank(values: list[float]) -> np.ndarray:
    """Ranks (0-based, ties averaged) of `values`."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    for v in set(values):
        tied = [i for i, x in enumerate(values) if x == v]
        ranks[tied] = ranks[tied].mean()
    return ranks


def _spearman(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(_rank(a), _rank(b))[0, 1])


def test_dapo_mode_drops_zero_variance_groups(tmp_path: Path, tiny_model_dir: Path) -> None:
    results, _, _ = _drive(tmp_path, tiny_model_dir, ["curriculum.mode=dapo", "rollout.n=6"])
    groups = [m for m in results if isinstance(m, RolloutGroup)]
    dropped = [m for m in results if isinstance(m, GroupDropped)]
    assert len(groups) + len(dropped) == NUM_PROMPTS
    assert all(g.scores.std() > 0 for g in groups)
    assert all(d.reason == "zero_variance" and d.rewards.std() == 0 for d in dropped)
