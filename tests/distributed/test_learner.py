"""The learner's training core: micro-batch packing (pure), the group broadcast, FSDP2 on 1 and 2 gloo ranks.

The distributed checks run in two spawned jobs (1 rank, then 2 ranks), each doing the same sequence on the
tiny model; the tests then compare what they saved:
  - broadcast_groups round trip (2 ranks);
  - iter_full_state: names/shapes of the HF checkpoint, values of the unsharded model;
  - compute_logprobs against a plain HF forward;
  - a hand-computed batch whose loss is one global token mean (1 and 2 ranks);
  - one RL step (2 mini-batches, token-budget micro-batches, TIS, KL) taking the same update on 1 and 2 ranks;
  - save_hf writes the trained weights;
  - the same step in bfloat16 (FSDP2 mixed precision, eager attention): float32 masters, near float32's numbers.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from speed_async.config import (
    AlgorithmConfig,
    ClusterConfig,
    Config,
    CurriculumConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
)
from speed_async.curriculum.train_group import TrainGroup
from speed_async.learner.batch import (
    build_micro_batches,
    empty_micro_batch,
    plan_micro_batches,
    split_response_values,
)
from speed_async.learner.model import lr_factor, warmup_factor
from speed_async.learner.scatter import decode_groups, encode_groups

pytestmark = pytest.mark.distributed

VOCAB = 300  # token ids stay below the tiny tokenizer's size
# 1 vs 2 ranks after two AdamW steps at lr 1e-3 (float32, gloo): summation order differs between the two, and
# AdamW's m / sqrt(v) magnifies it where gradients are tiny. Measured max |diff|: 1.1e-6 on the 0.63M tiny model,
# 1.05e-5 on the 1.26M one. A gradient bug is caught by the grad_norm comparison (averaging over ranks halves it).
PARAM_ATOL = 5e-5
# bfloat16 against float32 on the same batch (the tiny model, random tokens, log-probs near -5.8): measured mean
# |diff| of the log-probs 0.018 (max 0.15); loss, KL, grad norm, entropy and IS weight within 1.9% of float32's.
BF16_LOGPROB_MEAN_ATOL = 0.05
BF16_METRIC_RTOL = 0.05


def _group(prompt: list[int], responses: list[list[int]], rewards: list[float], **kw: Any) -> TrainGroup:
    """A TrainGroup from lists; behaviour log-probs are -0.1 * (position + 1) unless given."""
    logprobs = kw.pop("behaviour_logprobs", None) or [[-0.1 * (j + 1) for j in range(len(r))] for r in responses]
    return TrainGroup(
        prompt_id=kw.pop("prompt_id", 0),
        epoch=kw.pop("epoch", 0),
        data_source=kw.pop("data_source", "test"),
        prompt_token_ids=np.array(prompt, dtype=np.int32),
        responses=[np.array(r, dtype=np.int32) for r in responses],
        behaviour_logprobs=[np.array(lp, dtype=np.float32) for lp in logprobs],
        rewards=np.array(rewards, dtype=np.float32),
        version=kw.pop("version", 0),
    )


def _random_groups(num_groups: int, group_size: int, seed: int) -> list[TrainGroup]:
    """Groups with varied prompt/response lengths, 0/1 rewards with at least one of each, noisy log-probs."""
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(num_groups):
        prompt = rng.integers(1, VOCAB, rng.integers(2, 9)).tolist()
        responses = [rng.integers(1, VOCAB, rng.integers(1, 13)).tolist() for _ in range(group_size)]
        rewards = [float(g % 2 == 0), float(g % 2 == 1), *rng.integers(0, 2, group_size - 2).astype(float).tolist()]
        # log(1/320) ~ -5.77 is the log-prob of a token under a near-uniform random model: TIS weights near 1,
        # some capped.
        logprobs = [(-5.77 + rng.normal(0, 1, len(r))).tolist() for r in responses]
        groups.append(
            _group(
                prompt,
                responses,
                rewards,
                behaviour_logprobs=logprobs,
                prompt_id=100 + g,
                epoch=g % 3,
                version=g % 2,
                data_source=f"src-é{g}",
            )
        )
    return groups


def _assert_groups_equal(got: list[TrainGroup], want: list[TrainGroup]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert (a.prompt_id, a.epoch, a.data_source, a.version) == (b.prompt_id, b.epoch, b.data_source, b.version)
        np.testing.assert_array_equal(a.prompt_token_ids, b.prompt_token_ids)
        np.testing.assert_array_equal(a.rewards, b.rewards)
        assert len(a.responses) == len(b.responses)
        for x, y in zip(a.responses + a.behaviour_logprobs, b.responses + b.behaviour_logprobs, strict=True):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- pure: packing, masks, encoding


def test_build_micro_batches_packing_and_alignment() -> None:
    # Sequence lengths: (0,0) 3+2=5, (0,1) 3+1=4, (1,0) 1+4=5. Longest first (stable): (0,0), (1,0), (0,1).
    # Budget 10: [(0,0), (1,0)] is 2 rows x 5 = 10 <= 10; adding (0,1) would be 3 x 5 = 15 -> new micro-batch.
    groups = [
        _group([5, 6, 7], [[8, 9], [10]], [1.0, 0.0]),
        _group([1], [[2, 3, 4, 5]], [1.0]),
    ]
    advantages = [np.array([0.5, -0.5], dtype=np.float32), np.array([2.0], dtype=np.float32)]
    first, second = build_micro_batches(groups, advantages, token_budget=10)
    assert first.rows == [(0, 0), (1, 0)] and second.rows == [(0, 1)]
    assert first.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]]
    assert first.attention_mask.tolist() == [[1] * 5, [1] * 5]
    assert first.position_ids.tolist() == [[0, 1, 2, 3, 4]] * 2
    # Column k scores token k + 1: prompt length P=3, R=2 -> response columns 2..3; P=1, R=4 -> columns 0..3.
    assert first.target_ids.tolist() == [[6, 7, 8, 9], [2, 3, 4, 5]]
    assert first.response_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert first.advantages.tolist() == [[0, 0, 0.5, 0.5], [2, 2, 2, 2]]
    np.testing.assert_allclose(first.behaviour_logprobs.numpy(), [[0, 0, -0.1, -0.2], [-0.1, -0.2, -0.3, -0.4]])
    # Second micro-batch: [5, 6, 7, 10], P=3, R=1 -> column 2 only.
    assert second.input_ids.tolist() == [[5, 6, 7, 10]]
    assert second.response_mask.tolist() == [[0, 0, 1]]
    assert second.advantages.tolist() == [[0, 0, -0.5]]
    assert first.num_padded_tokens == 10 and second.num_padded_tokens == 4
    # Right padding: with budget 20, all three rows share one micro-batch of width 5; (0,1) is padded with 0.
    (single,) = build_micro_batches(groups, advantages, token_budget=20)
    assert single.rows == [(0, 0), (1, 0), (0, 1)]
    assert single.input_ids[2].tolist() == [5, 6, 7, 10, 0]
    assert single.attention_mask[2].tolist() == [1, 1, 1, 1, 0]
    assert single.response_mask[2].tolist() == [0, 0, 1, 0]


def test_sequences_longer_than_the_budget_are_alone() -> None:
    groups = [_group([5, 6, 7], [[8, 9], [10]], [1.0, 0.0]), _group([1], [[2, 3, 4, 5]], [1.0])]
    zeros = [np.zeros(2, np.float32), np.zeros(1, np.float32)]
    micro = build_micro_batches(groups, zeros, token_budget=3)  # every sequence (5, 4, 5 tokens) exceeds 3
    assert [mb.rows for mb in micro] == [[(0, 0)], [(1, 0)], [(0, 1)]]
    assert plan_micro_batches([(0, 0, 4), (0, 1, 4), (0, 2, 9)], token_budget=8) == [[2], [0, 1]]


def test_random_packing_respects_budget_and_covers_every_token() -> None:
    groups = _random_groups(num_groups=6, group_size=5, seed=1)
    advantages = [np.arange(5, dtype=np.float32) + 10 * g for g in range(6)]
    micro = build_micro_batches(groups, advantages, token_budget=40)
    rows = [row for mb in micro for row in mb.rows]
    assert sorted(rows) == [(g, i) for g in range(6) for i in range(5)]
    for mb in micro:
        assert len(mb.rows) == 1 or mb.num_padded_tokens <= 40
        for b, (g, i) in enumerate(mb.rows):
            assert mb.response_mask[b].sum() == len(groups[g].responses[i])
            # Every masked column carries this response's advantage; target ids are the response tokens.
            assert set(mb.advantages[b][mb.response_mask[b].bool()].tolist()) == {float(advantages[g][i])}
            assert mb.target_ids[b][mb.response_mask[b].bool()].tolist() == groups[g].responses[i].tolist()
        back = split_response_values(mb, mb.behaviour_logprobs)
        for (g, i), values in back.items():
            np.testing.assert_array_equal(values, groups[g].behaviour_logprobs[i])
    assert empty_micro_batch().response_mask.sum() == 0


def test_bad_inputs_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"prompt_id=7\)\.responses\[0\] is int64"):
        TrainGroup(7, 0, "s", np.ones(2, np.int32), [np.ones(2, np.int64)], [np.ones(2, np.float32)],
                   np.ones(1, np.float32), 0)  # fmt: skip
    with pytest.raises(ValueError, match=r"behaviour_logprobs\[0\] has shape \(1,\)"):
        _group([1], [[2, 3]], [1.0], behaviour_logprobs=[[-1.0]])
    with pytest.raises(ValueError, match=r"advantages\[0\] has shape \(3,\)"):
        build_micro_batches([_group([1], [[2]], [1.0])], [np.zeros(3, np.float32)], token_budget=8)


def test_encode_decode_round_trip() -> None:
    groups = _random_groups(num_groups=3, group_size=4, seed=2)
    meta, ints, floats, text = encode_groups(groups)
    # 3 groups x 6 header fields + 12 response lengths.
    assert meta.shape == (3 * 6 + 12,) and ints.dtype == np.int32 and floats.dtype == np.float32
    _assert_groups_equal(decode_groups(3, meta, ints, floats, text), groups)


def test_warmup_factor() -> None:
    # warmup 4: optimizer steps 0..4 run at 1/4, 2/4, 3/4, 1, 1 of the rate; warmup 0: always 1.
    assert [warmup_factor(s, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    # Cosine over 7 optimizer steps after a warm-up of 3: steps 0, 1 warm up (1/3, 2/3); step 2 is the top (1.0);
    # steps 2..6 run cos from 0 to pi over 4 intervals: 0.1 + 0.9 * (1 + cos(pi * j / 4)) / 2 for j = 0..4,
    # i.e. 1.0, 0.8682, 0.55, 0.2318, 0.1; later steps stay at 0.1; "constant" stays at 1 after warm-up.
    cosine = OptimConfig(lr=1.0, warmup_steps=3, lr_schedule="cosine", min_lr_ratio=0.1)
    got = [lr_factor(s, cosine, 7) for s in range(8)]
    assert got == pytest.approx([1 / 3, 2 / 3, 1.0, 0.86820, 0.55, 0.23180, 0.1, 0.1], abs=1e-5)
    assert [lr_factor(s, OptimConfig(warmup_steps=3), 7) for s in (0, 2, 6)] == [1 / 3, 1.0, 1.0]


# ---------------------------------------------------------------- distributed (spawned gloo jobs)

# Hand batch: RLOO advantages. Group A, rewards [1, 0]: mean 0.5, A = 2/1 * (r - 0.5) = [1, -1], lengths [3, 1].
# Group B, rewards [1, 0, 0, 1]: mean 0.5, A = 4/3 * (r - 0.5) = [2/3, -2/3, -2/3, 2/3], lengths [2, 2, 1, 3].
# pi_old is recomputed with the same weights, so ratio = 1 and the per-token loss is -A (dual clip inactive:
# for A < 0, -A < -A * c). sum(A * length) = 3 - 1 + (2/3) * (2 - 2 - 1 + 3) = 2 + 4/3 = 10/3 over
# 4 + 8 = 12 tokens: loss = -(10/3) / 12 = -5/18. On 2 ranks each rank holds one group: the mean of per-rank
# token means would be -(2/4 + (4/3)/8) / 2 = -1/3, the mean of per-micro-batch means something else again.
HAND_LOSS = -5 / 18
HAND_GROUPS = [
    ([11, 12], [[21, 22, 23], [24]], [1.0, 0.0]),
    ([13, 14, 15], [[31, 32], [33, 34], [35], [36, 37, 38]], [1.0, 0.0, 0.0, 1.0]),
]


def _config(world: int, **algorithm: Any) -> Config:
    return Config(
        data=DataConfig(train_batch_size=algorithm.pop("train_batch_size")),
        rollout=RolloutConfig(n=4, n_continue=0),
        curriculum=CurriculumConfig(mode="none"),
        algorithm=AlgorithmConfig(**algorithm),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, grad_clip=1.0),
        cluster=ClusterConfig(num_learner_ranks=world),
    )


def _worker(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from speed_async.learner.model import iter_full_state, save_hf
    from speed_async.learner.scatter import broadcast_groups
    from speed_async.learner.train_step import Learner

    out: dict[str, Any] = {}
    # Budget 16 tokens: 1-2 sequences per micro-batch, so ranks differ in micro-batch counts.
    hand = Learner(_config(world, train_batch_size=2, mini_batch_size=2, micro_batch_tokens=16), model_dir, "cpu")
    out["hand"] = hand.train_step([_group(*g) for g in HAND_GROUPS], step=0)
    del hand

    groups = _random_groups(num_groups=4, group_size=4, seed=0)
    out["broadcast"] = broadcast_groups(groups if rank == 0 else None)
    cfg = _config(
        world,
        train_batch_size=4,
        mini_batch_size=2,
        micro_batch_tokens=40,
        off_policy_correction="tis",
        tis_cap=2.0,
        kl_coef=0.05,
        advantage="grpo",
    )
    learner = Learner(cfg, model_dir, "cpu")
    out["state_before"] = list(iter_full_state(learner.model))
    out["logprobs"] = learner.compute_logprobs(groups)
    out["metrics"] = learner.train_step(out["broadcast"], step=1)
    out["state_after"] = list(iter_full_state(learner.model))
    out["saved_dir"] = Path(out_dir) / "saved"
    save_hf(learner.model, model_dir, out["saved_dir"])
    del learner
    # The same step with pi_old of mini-batch 0 from a no-grad pass of its own (what the learner did before it
    # took pi_old from the training forward).
    separate = Learner(cfg, model_dir, "cpu")
    separate.separate_old_pass = True
    out["separate_metrics"] = separate.train_step(out["broadcast"], step=1)
    out["separate_state_after"] = list(iter_full_state(separate.model))
    del separate
    # The same in bfloat16 (`model.train_dtype`: FSDP2 mixed precision; eager attention on CPU).
    bf16 = Learner(dataclasses.replace(cfg, model=ModelConfig(train_dtype="bfloat16")), model_dir, "cpu")
    out["bf16_attention"] = bf16.model.config._attn_implementation
    out["bf16_logprobs"] = bf16.compute_logprobs(groups)
    out["bf16_metrics"] = bf16.train_step(out["broadcast"], step=1)
    out["bf16_state_after"] = list(iter_full_state(bf16.model))
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _run(world: int, model_dir: Path, out_dir: Path) -> list[dict[str, Any]]:
    """Run `_worker` on `world` gloo ranks (spawned processes) and load what each rank saved."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(world, port, str(model_dir), str(out_dir)), nprocs=world, start_method="spawn")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _run(1, tiny_model_dir, tmp_path_factory.mktemp("one_rank"))


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _run(2, tiny_model_dir, tmp_path_factory.mktemp("two_ranks"))


def test_broadcast_groups_round_trip(two_ranks: list[dict[str, Any]]) -> None:
    want = _random_groups(num_groups=4, group_size=4, seed=0)
    for result in two_ranks:
        _assert_groups_equal(result["broadcast"], want)


def test_loss_is_one_global_token_mean(one_rank: list[dict[str, Any]], two_ranks: list[dict[str, Any]]) -> None:
    for result in one_rank + two_ranks:
        hand = result["hand"]
        assert hand["loss"] == pytest.approx(HAND_LOSS, abs=1e-6)
        assert hand["response_tokens"] == 12
        assert hand["is_weight_mean"] == 1.0 and hand["kl"] == 0.0
        assert hand["lr"] == pytest.approx(0.5e-3)  # first optimizer step of a 2-step warm-up: (0 + 1) / 2


def test_iter_full_state_matches_the_hf_checkpoint(tiny_model_dir: Path, two_ranks: list[dict[str, Any]]) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    checkpoint = load_file(str(tiny_model_dir / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    unsharded = model.state_dict()
    for result in two_ranks:
        names = [name for name, _ in result["state_before"]]
        assert sorted(names) == sorted(checkpoint), "names differ from the HF checkpoint's"
        assert names == [n for n in unsharded if n in checkpoint], "not in state-dict order"
        for name, tensor in result["state_before"]:
            assert tensor.device.type == "cpu" and tensor.dtype == torch.float32
            assert torch.equal(tensor, unsharded[name]), name


def test_compute_logprobs_matches_a_plain_forward(
    tiny_model_dir: Path, one_rank: list[dict[str, Any]], two_ranks: list[dict[str, Any]]
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    groups = _random_groups(num_groups=4, group_size=4, seed=0)
    want = []
    with torch.no_grad():
        for group in groups:
            p = len(group.prompt_token_ids)
            for response in group.responses:
                ids = torch.from_numpy(np.concatenate([group.prompt_token_ids, response])).long()[None]
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
                want.append(logp[p - 1 :].gather(-1, ids[0, p:, None]).squeeze(-1).numpy())
    for result in one_rank + two_ranks:
        assert len(result["logprobs"]) == 16
        for got, ref in zip(result["logprobs"], want, strict=True):
            np.testing.assert_allclose(got, ref, atol=1e-5)


def test_two_ranks_take_the_same_update(one_rank: list[dict[str, Any]], two_ranks: list[dict[str, Any]]) -> None:
    single, dual = one_rank[0], two_ranks[0]
    # grad_norm is scale-sensitive where AdamW is not: it catches an averaged (halved) gradient.
    # The off-policy statistics add up over micro-batches and ranks (quantiles from one reduced histogram).
    off_policy = ("offpolicy/ratio_p1", "offpolicy/ratio_p50", "offpolicy/ratio_p99", "offpolicy/log_ratio_mean")
    for key in ("loss", "kl", "grad_norm", "clipfrac", "entropy", "is_weight_mean", "response_tokens", *off_policy):
        assert dual["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5, abs=1e-7), key
    m = single["metrics"]
    assert 0 < m["offpolicy/ratio_p1"] <= m["offpolicy/ratio_p50"] <= m["offpolicy/ratio_p99"]
    assert m["offpolicy/kl_k3"] >= 0 and 0 <= m["offpolicy/masked_frac"] <= 1  # TIS: the share at the cap
    assert single["metrics"]["kl"] > 0  # the second mini-batch sees weights that moved away from the reference
    assert 0 < single["metrics"]["is_weight_mean"] < 2
    assert single["metrics"]["lag_max"] == 1.0
    pairs = zip(single["state_after"], single["state_before"], strict=True)
    moved = max((a - b).abs().max().item() for (_, a), (_, b) in pairs)
    assert moved > 1e-4  # two AdamW steps at lr 1e-3 (after the hand step): the parameters did change
    diff = 0.0
    for (name_a, a), (name_b, b), (_, c) in zip(
        single["state_after"], dual["state_after"], two_ranks[1]["state_after"], strict=True
    ):
        assert name_a == name_b
        assert torch.equal(b, c), f"ranks disagree on {name_b}"
        diff = max(diff, (a - b).abs().max().item())
    print(f"1 vs 2 ranks: max abs parameter diff {diff:.3g}; step seconds 1 rank "
          f"{single['metrics']['seconds_step']:.3f}, 2 ranks {dual['metrics']['seconds_step']:.3f}")  # fmt: skip
    assert diff < PARAM_ATOL


def test_pi_old_from_the_training_forward_changes_nothing(
    one_rank: list[dict[str, Any]], two_ranks: list[dict[str, Any]]
) -> None:
    # Mini-batch 0 trains on the weights of version `step`, so pi_old is its own forward: the loss, the TIS
    # weights, every metric and the update equal those of the step that ran a separate no-grad pass for it.
    keys = ("loss", "kl", "grad_norm", "clipfrac", "entropy", "is_weight_mean", "behaviour_logprob_abs_diff")
    for result in one_rank + two_ranks:
        fused, separate = result["metrics"], result["separate_metrics"]
        for key in keys:
            assert fused[key] == pytest.approx(separate[key], rel=1e-6, abs=1e-8), key
        for (name, a), (_, b) in zip(result["state_after"], result["separate_state_after"], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)


def test_save_hf_writes_the_trained_weights(two_ranks: list[dict[str, Any]]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = two_ranks[0]["saved_dir"]
    model = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32)
    state = model.state_dict()
    for name, tensor in two_ranks[0]["state_after"]:
        assert torch.equal(state[name], tensor), name
    assert AutoTokenizer.from_pretrained(str(saved)) is not None


def test_a_bfloat16_learner_keeps_float32_masters_and_follows_the_float32_one(
    one_rank: list[dict[str, Any]], two_ranks: list[dict[str, Any]]
) -> None:
    # bfloat16 computes the forward and backward (on CPU with eager attention), float32 keeps the master weights,
    # the optimizer and the log-probs; its log-probs and its step stay near the float32 learner's.
    for result in one_rank + two_ranks:
        assert result["bf16_attention"] == "eager"
        got = np.concatenate(result["bf16_logprobs"])
        want = np.concatenate(result["logprobs"])
        assert got.dtype == np.float32 and np.isfinite(got).all()
        diff = np.abs(got - want)
        print(f"bfloat16 vs float32 log-probs: mean |diff| {diff.mean():.4f}, max {diff.max():.4f}")
        assert 1e-4 < diff.mean() < BF16_LOGPROB_MEAN_ATOL  # computed in bfloat16 indeed, and close
        fp32, bf16 = result["metrics"], result["bf16_metrics"]
        for key in ("loss", "kl", "grad_norm", "entropy", "is_weight_mean"):
            assert np.isfinite(bf16[key]), key
            assert bf16[key] == pytest.approx(fp32[key], rel=BF16_METRIC_RTOL, abs=1e-3), key
        moved = 0.0
        for (name, a), (_, before) in zip(result["bf16_state_after"], result["state_before"], strict=True):
            assert a.dtype == torch.float32, name
            moved = max(moved, (a - before).abs().max().item())
        assert moved > 1e-4  # it trained
