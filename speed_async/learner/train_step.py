"""One RL step on the learner ranks: advantages, pi_old, mini-batches of token-budget micro-batches, AdamW.

    train_step(groups, step)                    every rank, same `groups` (see scatter.broadcast_groups)
      advantages per group (RLOO / GRPO)
      for each mini-batch: this rank's groups i::world -> micro-batches (padded to the max count over ranks)
      pi_old of the micro-batches of mini-batches 1.. (and pi_ref of all when kl_coef > 0), no grad,
      weights of version `step`; mini-batch 0 trains on the weights of version `step` itself, so its pi_old
      is its own training forward, detached (the same numbers, without a second forward)
      for each mini-batch:
        N = response tokens of the mini-batch over ALL ranks (all_reduce)
        per micro-batch: loss = sum(token losses) / N; backward(loss * world)   <- FSDP2 averages over
        ranks, so the reduced gradient is the gradient of ONE token mean of the mini-batch
        clip grad norm, AdamW step, LR scheduler step

Every rank runs the same number of forward and backward passes (each is an FSDP collective): a rank with
fewer micro-batches runs empty ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from speed_async.algorithms import group_advantages, importance_weights, kl_loss, policy_loss
from speed_async.config import Config
from speed_async.curriculum.train_group import TrainGroup
from speed_async.learner.batch import (
    MicroBatch,
    build_micro_batches,
    empty_micro_batch,
    split_response_values,
    to_device,
)
from speed_async.learner.model import (
    attention_implementation,
    build_optimizer,
    compute_dtype,
    init_distributed,
    load_model,
)
from speed_async.learner.off_policy_metrics import OffPolicyTally

log = logging.getLogger("speed_async.learner")

# Local sums reduced over ranks once per RL step, in this order.
_SUMS = ("loss", "kl", "clipfrac", "entropy", "behaviour_abs_diff", "response_tokens")


def token_logprobs(
    model: nn.Module, micro_batch: MicroBatch, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor | None]:
    """Log-probs [B, T - 1] of each next token under `model` (logits / temperature, float32), and entropies.

    The entropy of each column's distribution is computed without gradient, only when `with_entropy`.
    """
    logits = model(
        input_ids=micro_batch.input_ids,
        attention_mask=micro_batch.attention_mask,
        position_ids=micro_batch.position_ids,
        use_cache=False,
    ).logits[:, :-1]
    logits = logits.float() / temperature
    log_norm = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, micro_batch.target_ids.unsqueeze(-1)).squeeze(-1) - log_norm
    if not with_entropy:
        return logprobs, None
    with torch.no_grad():
        log_p = logits - log_norm.unsqueeze(-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
    return logprobs, entropy


class Learner:
    """The FSDP2 policy (and frozen reference when algorithm.kl_coef > 0), its optimizer and the RL step.

    Every learner rank constructs one and calls each method with the same arguments, in the same order.
    """

    def __init__(self, config: Config, model_path: str | Path, device: torch.device | str) -> None:
        """Join the default process group (gloo on CPU, nccl on CUDA), load and shard the model(s)."""
        self.config = config
        self.device = init_distributed(torch.device(device))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world != config.cluster.num_learner_ranks:
            raise ValueError(
                f"cluster.num_learner_ranks = {config.cluster.num_learner_ranks} but the process group has "
                f"{self.world} ranks; launch one learner process per rank"
            )
        self.model = load_model(model_path, config.model, self.device)
        self.model.train()
        if self.rank == 0:
            log.info(
                "learner computes in %s with %s attention (model.train_dtype = %s, model.attn_implementation = %s)",
                compute_dtype(config.model, self.device), attention_implementation(config.model, self.device),
                config.model.train_dtype, config.model.attn_implementation,
            )  # fmt: skip
        self.ref_model: nn.Module | None = None
        if config.algorithm.kl_coef > 0:
            self.ref_model = load_model(model_path, config.model, self.device)
            self.ref_model.eval().requires_grad_(False)
        per_step = -(-config.data.train_batch_size // config.algorithm.mini_batch_size)  # optimizer steps / RL step
        total = config.trainer.total_steps * per_step
        self.optimizer, self.scheduler = build_optimizer(self.model, config.optim, total)
        self.separate_old_pass = False
        """True: pi_old of mini-batch 0 from a no-grad pass of its own as well (the same numbers, one more
        forward; kept to test that the two agree)."""

    def _sync_clock(self) -> float:
        """Seconds on a monotonic clock, after the device's queued work is done."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _rank_micro_batches(
        self, groups: Sequence[TrainGroup], advantages: Sequence[np.ndarray], index: Sequence[int]
    ) -> list[MicroBatch]:
        """This rank's share (index[rank::world]) of the groups `index`, packed by the token budget."""
        mine = list(index[self.rank :: self.world])
        return build_micro_batches(
            [groups[i] for i in mine], [advantages[i] for i in mine], self.config.algorithm.micro_batch_tokens
        )

    def _no_grad_logprobs(self, model: nn.Module, micro_batches: Sequence[MicroBatch]) -> list[Tensor]:
        """Log-probs of every micro-batch (on the device), without gradient."""
        temperature = self.config.rollout.temperature
        with torch.no_grad():
            return [token_logprobs(model, to_device(mb, self.device), temperature, False)[0] for mb in micro_batches]

    def compute_logprobs(self, groups: Sequence[TrainGroup]) -> list[np.ndarray]:
        """Log-probs of every response's tokens under the current weights, flat in group then response order.

        Every rank must call it with the same groups (each rank computes all of them: the forward passes are
        collectives). Returns float32 arrays of the responses' lengths.
        """
        zeros = [np.zeros(len(g.responses), dtype=np.float32) for g in groups]
        micro_batches = build_micro_batches(groups, zeros, self.config.algorithm.micro_batch_tokens)
        found: dict[tuple[int, int], np.ndarray] = {}
        for mb, logprobs in zip(micro_batches, self._no_grad_logprobs(self.model, micro_batches), strict=True):
            found.update(split_response_values(mb, logprobs))
        return [found[(g, i)] for g, group in enumerate(groups) for i in range(len(group.responses))]

    def _plan_mini_batches(self, groups: Sequence[TrainGroup]) -> tuple[list[list[MicroBatch]], list[float]]:
        """This rank's micro-batches of each mini-batch, and each mini-batch's response tokens over all ranks.

        Mini-batch m is groups [m * size, (m + 1) * size); this rank takes every world-th of them from its
        rank on. Every rank gets the same number of micro-batches per mini-batch (padded with empty ones).
        """
        algo = self.config.algorithm
        advantages = [
            a.numpy() for a in group_advantages([torch.from_numpy(g.rewards) for g in groups], algo.advantage)
        ]
        size = algo.mini_batch_size
        plans = [self._rank_micro_batches(groups, advantages, range(s, s + size)) for s in range(0, len(groups), size)]
        counts = torch.tensor([len(p) for p in plans], dtype=torch.int64, device=self.device)
        tokens = torch.tensor([sum(int(mb.response_mask.sum()) for mb in p) for p in plans], device=self.device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
        padded = [p + [empty_micro_batch()] * (int(c) - len(p)) for p, c in zip(plans, counts, strict=True)]
        return padded, [float(t) for t in tokens.tolist()]

    def train_step(self, groups: list[TrainGroup], step: int) -> dict[str, float]:
        """One RL step on `groups` (identical on every rank, train_batch_size of them); returns global metrics.

        `step` is the RL step index s (the update produces version s + 1); lag metrics are s - group.version.
        Metrics: loss and kl (mean over optimizer steps of the global token-mean losses), grad_norm (mean
        over optimizer steps, before clipping), lr (of the last optimizer step), clipfrac, entropy and
        is_weight_mean (the off-policy correction's token weights) and behaviour_logprob_abs_diff (|pi_old -
        pi_behaviour| log-probs: engine/learner mismatch plus staleness) as global token means, the ratio
        statistics of `OffPolicyTally` (offpolicy/...), response_tokens, lag_mean, lag_max, and seconds of the
        pi_old pass, forward, backward, optimizer and the whole step (rank 0's clock).
        """
        cfg = self.config
        if len(groups) != cfg.data.train_batch_size:
            raise ValueError(
                f"train_step got {len(groups)} groups; allowed: data.train_batch_size = {cfg.data.train_batch_size}"
            )
        started = self._sync_clock()
        plans, tokens = self._plan_mini_batches(groups)
        planned = self._sync_clock()
        # Before the first optimizer step the weights are pi_old: mini-batch 0 takes pi_old from its training
        # forward. Later mini-batches train on updated weights and need pi_old from a pass of their own, now.
        first = 0 if self.separate_old_pass else 1
        old: list[list[Tensor] | None] = [None] * first
        old += [self._no_grad_logprobs(self.model, p) for p in plans[first:]]
        ref = [self._no_grad_logprobs(self.ref_model, p) for p in plans] if self.ref_model is not None else None
        seconds = {"plan": planned - started, "old_logprobs": self._sync_clock() - planned}
        seconds.update(forward=0.0, backward=0.0, optimizer=0.0)

        sums = dict.fromkeys(_SUMS, 0.0)
        self._tally = OffPolicyTally(self.device, cfg.algorithm.off_policy_correction, cfg.algorithm.tis_cap)
        grad_norms, lr = [], 0.0
        for m, plan in enumerate(plans):
            normalizer = tokens[m]
            self.optimizer.zero_grad(set_to_none=True)
            for k, mb in enumerate(plan):
                t0 = self._sync_clock()
                old_mb = old[m]
                part = self._micro_batch_loss(
                    to_device(mb, self.device), old_mb[k] if old_mb else None, ref[m][k] if ref else None, normalizer
                )
                t1 = self._sync_clock()
                # FSDP2 divides the reduced gradient by the world size; undo it so ranks' gradients SUM.
                (part.pop("objective") * self.world).backward()
                seconds["forward"] += t1 - t0
                seconds["backward"] += self._sync_clock() - t1
                for key, value in part.items():
                    sums[key] += float(value)
            t0 = self._sync_clock()
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            grad_norms.append(float(norm.full_tensor() if isinstance(norm, DTensor) else norm))
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            seconds["optimizer"] += self._sync_clock() - t0

        totals = torch.tensor([sums[key] for key in _SUMS], dtype=torch.float64, device=self.device)
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        reduced = dict(zip(_SUMS, totals.tolist(), strict=True))
        off_policy = self._tally.reduce()
        num_tokens, num_steps = reduced["response_tokens"], len(plans)
        lags = [step - g.version for g in groups]
        seconds["step"] = self._sync_clock() - started
        return {
            "loss": reduced["loss"] / num_steps,
            "kl": reduced["kl"] / num_steps,
            "grad_norm": sum(grad_norms) / num_steps,
            "lr": lr,
            "clipfrac": reduced["clipfrac"] / num_tokens,
            "entropy": reduced["entropy"] / num_tokens,
            **off_policy,
            "behaviour_logprob_abs_diff": reduced["behaviour_abs_diff"] / num_tokens,
            "response_tokens": num_tokens,
            "lag_mean": sum(lags) / len(lags),
            "lag_max": float(max(lags)),
            **{f"seconds_{key}": value for key, value in seconds.items()},
        }

    def _micro_batch_loss(
        self, mb: MicroBatch, old_logprobs: Tensor | None, ref_logprobs: Tensor | None, normalizer: float
    ) -> dict[str, Tensor]:
        """The micro-batch's share of the mini-batch objective ("objective", with grad) and its metric sums.

        `old_logprobs` None: pi_old is the weights being trained (mini-batch 0), i.e. this forward, detached.

        Metric sums are detached: "loss" and "kl" are this micro-batch's terms of the global token means
        (they add up over micro-batches and ranks); the rest are sums over its response tokens.
        """
        algo = self.config.algorithm
        logprobs, entropy = token_logprobs(self.model, mb, self.config.rollout.temperature, True)
        assert entropy is not None
        if old_logprobs is None:
            old_logprobs = logprobs.detach()
        mask = mb.response_mask
        is_weights = importance_weights(
            algo.off_policy_correction,
            old_logprobs,
            mb.behaviour_logprobs,
            mask,
            tis_cap=algo.tis_cap,
            mis_band=(algo.mis_low, algo.mis_high),
            icepop_band=(algo.icepop_low, algo.icepop_high),
        )
        self._tally.add(old_logprobs, mb.behaviour_logprobs, mask, is_weights)
        loss, stats = policy_loss(
            logprobs,
            old_logprobs,
            mb.advantages,
            mask,
            clip_low=algo.clip_low,
            clip_high=algo.clip_high,
            clip_c=algo.clip_c,
            is_weights=is_weights,
            normalizer=normalizer,
        )
        kl = kl_loss(logprobs, ref_logprobs, mask, normalizer) if ref_logprobs is not None else torch.zeros(())
        num_tokens = mask.sum()
        return {
            "objective": loss + algo.kl_coef * kl,
            "loss": loss.detach(),
            "kl": kl.detach(),
            "clipfrac": stats["clipfrac"] * num_tokens,
            "entropy": (entropy * mask).sum(),
            "behaviour_abs_diff": ((old_logprobs - mb.behaviour_logprobs).abs() * mask).sum(),
            "response_tokens": num_tokens,
        }
