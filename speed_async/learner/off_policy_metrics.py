"""One RL step's off-policy statistics, summed over micro-batches and reduced over the learner ranks.

Per response token the importance ratio rho = pi_old / pi_behaviour (learner log-probs before the update
against the sampler's): quantiles p1 / p50 / p99 from a fixed-bin histogram of log rho (it adds up exactly
over micro-batches and ranks), the mean log rho (minus it is the k1 estimate of KL(pi_behaviour || pi_old),
the samples being drawn from pi_behaviour), the k3 estimate mean(rho - 1 - log rho) >= 0, and the share of
tokens the correction changed: truncated at the cap (tis) or masked to 0 (mis, icepop).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from speed_async.algorithms.off_policy import NUM_BINS, histogram_quantiles, log_ratio_histogram

_SUMS = ("tokens", "log_ratio", "k3", "masked", "weight")


class OffPolicyTally:
    """Accumulates one step on one rank (`add` per micro-batch); `reduce` sums over ranks (a collective: every
    rank calls it) and returns the step's metrics."""

    def __init__(self, device: torch.device, correction: str, tis_cap: float) -> None:
        self.correction, self.tis_cap = correction, tis_cap
        self.histogram = torch.zeros(NUM_BINS, dtype=torch.float64, device=device)
        self.sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)

    def add(self, old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, weights: Tensor | None) -> None:
        """One micro-batch: its pi_old and behaviour log-probs, response mask and correction weights (None: 1)."""
        with torch.no_grad():
            self.histogram += log_ratio_histogram(old_logprobs, behaviour_logprobs, mask)
            on = mask > 0
            log_ratio = (old_logprobs - behaviour_logprobs).double()[on]
            if weights is None:
                masked, weight = torch.zeros((), dtype=torch.float64), log_ratio.new_tensor(float(on.sum()))
            else:
                w = weights.double()[on]
                masked = (w >= self.tis_cap).sum() if self.correction == "tis" else (w == 0).sum()
                weight = w.sum()
            k3 = torch.expm1(log_ratio.clamp(max=20.0)) - log_ratio
            parts = (float(on.sum()), log_ratio.sum(), k3.sum(), masked, weight)
            self.sums += torch.stack([torch.as_tensor(p, dtype=torch.float64).to(self.sums.device) for p in parts])

    def reduce(self) -> dict[str, float]:
        """Sum over ranks; `offpolicy/ratio_p1|p50|p99`, `offpolicy/log_ratio_mean`, `offpolicy/kl_k3`,
        `offpolicy/masked_frac` (truncated or masked share of the response tokens), `is_weight_mean`."""
        dist.all_reduce(self.histogram, op=dist.ReduceOp.SUM)
        dist.all_reduce(self.sums, op=dist.ReduceOp.SUM)
        sums = dict(zip(_SUMS, self.sums.tolist(), strict=True))
        tokens = max(sums["tokens"], 1.0)
        p1, p50, p99 = histogram_quantiles(self.histogram, (0.01, 0.5, 0.99))
        return {
            "offpolicy/ratio_p1": p1,
            "offpolicy/ratio_p50": p50,
            "offpolicy/ratio_p99": p99,
            "offpolicy/log_ratio_mean": sums["log_ratio"] / tokens,
            "offpolicy/kl_k3": sums["k3"] / tokens,
            "offpolicy/masked_frac": sums["masked"] / tokens,
            "is_weight_mean": sums["weight"] / tokens,
        }
