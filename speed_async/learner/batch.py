"""Training groups and their packing into right-padded micro-batches under a token budget.

Alignment (every per-token tensor of a `MicroBatch` is `[rows, T - 1]`, T = padded sequence length):
column k holds what the logits at position k say about token k + 1. A sequence is prompt (P tokens) then
response (R tokens); response token j sits at position P + j and is predicted at column P + j - 1, so the
response occupies columns P - 1 .. P + R - 2:

    position   0    1   ..  P-1   P    ..  P+R-1  | pad
    token      p0   p1  ..  pP-1  r0   ..  rR-1   | 0
    column     0    1   ..  P-1   P    ..  P+R-2    (column k scores token k + 1)
    mask       0    0   ..  1     1    ..  1      (ones on the R columns P-1 .. P+R-2)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from speed_async.curriculum.train_group import TrainGroup


@dataclass
class MicroBatch:
    """Right-padded sequences of one forward/backward pass; see the module docstring for the alignment."""

    input_ids: Tensor
    """int64 [B, T], prompt + response, right-padded with 0."""
    attention_mask: Tensor
    """int64 [B, T], 1 on real tokens."""
    position_ids: Tensor
    """int64 [B, T], 0..T-1 on every row (padding positions are masked out)."""
    response_mask: Tensor
    """float32 [B, T - 1], 1 on the columns that score response tokens."""
    advantages: Tensor
    """float32 [B, T - 1], the response's advantage on its masked columns, 0 elsewhere."""
    behaviour_logprobs: Tensor
    """float32 [B, T - 1], the sampler's log-probs on the masked columns, 0 elsewhere."""
    rows: list[tuple[int, int]]
    """(group index, response index) of each row, indices into the `groups` given to the builder."""

    @property
    def num_padded_tokens(self) -> int:
        """B * T: what the token budget bounds."""
        return self.input_ids.numel()

    @property
    def target_ids(self) -> Tensor:
        """int64 [B, T - 1]: the token each column scores (input_ids shifted left by one)."""
        return self.input_ids[:, 1:]


def sequence_lengths(groups: Sequence[TrainGroup]) -> list[tuple[int, int, int]]:
    """(group index, response index, prompt + response length) of every response, in group order."""
    return [
        (g, i, len(group.prompt_token_ids) + len(response))
        for g, group in enumerate(groups)
        for i, response in enumerate(group.responses)
    ]


def plan_micro_batches(lengths: Sequence[tuple[int, int, int]], token_budget: int) -> list[list[int]]:
    """Split entries of `lengths` (as from `sequence_lengths`) into micro-batches, as lists of indices.

    Longest first (stable), greedily: a sequence joins the current micro-batch while rows x longest length
    stays <= `token_budget`; a sequence longer than the budget is a micro-batch by itself.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget = {token_budget} is invalid: must be >= 1")
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k][2])
    plans: list[list[int]] = []
    for k in order:
        # Lengths are decreasing, so the first row of a micro-batch is its longest.
        if plans and (len(plans[-1]) + 1) * lengths[plans[-1][0]][2] <= token_budget:
            plans[-1].append(k)
        else:
            plans.append([k])
    return plans


def build_micro_batches(
    groups: Sequence[TrainGroup], advantages: Sequence[np.ndarray | Tensor], token_budget: int
) -> list[MicroBatch]:
    """Pack every response of `groups` (prompt + response, right-padded) into micro-batches.

    `advantages[g]` holds one scalar per response of `groups[g]`. Each micro-batch has B x T <= token_budget,
    except that a single sequence longer than the budget forms its own micro-batch. Raises ValueError when
    the advantages do not match the groups.
    """
    if len(advantages) != len(groups):
        raise ValueError(f"advantages has {len(advantages)} entries; allowed: one per group ({len(groups)})")
    for g, (group, adv) in enumerate(zip(groups, advantages, strict=True)):
        if tuple(adv.shape) != (len(group.responses),):
            raise ValueError(
                f"advantages[{g}] has shape {tuple(adv.shape)}; allowed: ({len(group.responses)},), one per "
                f"response of group {g} (prompt_id={group.prompt_id})"
            )
    lengths = sequence_lengths(groups)
    return [
        _pack(groups, advantages, [lengths[k][:2] for k in plan]) for plan in plan_micro_batches(lengths, token_budget)
    ]


def _pack(
    groups: Sequence[TrainGroup], advantages: Sequence[np.ndarray | Tensor], rows: list[tuple[int, int]]
) -> MicroBatch:
    """One right-padded micro-batch holding the responses `rows` = [(group index, response index), ...]."""
    lengths = [len(groups[g].prompt_token_ids) + len(groups[g].responses[i]) for g, i in rows]
    width = max(lengths)
    input_ids = np.zeros((len(rows), width), dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    response_mask = np.zeros((len(rows), width - 1), dtype=np.float32)
    token_advantages = np.zeros((len(rows), width - 1), dtype=np.float32)
    behaviour = np.zeros((len(rows), width - 1), dtype=np.float32)
    for b, (g, i) in enumerate(rows):
        prompt, response = groups[g].prompt_token_ids, groups[g].responses[i]
        p, r = len(prompt), len(response)
        input_ids[b, :p] = prompt
        input_ids[b, p : p + r] = response
        attention_mask[b, : p + r] = 1
        response_mask[b, p - 1 : p + r - 1] = 1.0
        token_advantages[b, p - 1 : p + r - 1] = float(advantages[g][i])
        behaviour[b, p - 1 : p + r - 1] = groups[g].behaviour_logprobs[i]
    return MicroBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        position_ids=torch.arange(width, dtype=torch.int64).expand(len(rows), width).contiguous(),
        response_mask=torch.from_numpy(response_mask),
        advantages=torch.from_numpy(token_advantages),
        behaviour_logprobs=torch.from_numpy(behaviour),
        rows=list(rows),
    )


def empty_micro_batch() -> MicroBatch:
    """A one-row, two-token micro-batch with an all-zero response mask: it contributes nothing to the loss.

    A rank that has fewer micro-batches than another runs these so that every rank makes the same number of
    FSDP forward/backward passes (each one is a collective).
    """
    return MicroBatch(
        input_ids=torch.zeros(1, 2, dtype=torch.int64),
        attention_mask=torch.ones(1, 2, dtype=torch.int64),
        position_ids=torch.arange(2, dtype=torch.int64).unsqueeze(0),
        response_mask=torch.zeros(1, 1),
        advantages=torch.zeros(1, 1),
        behaviour_logprobs=torch.zeros(1, 1),
        rows=[],
    )


def split_response_values(micro_batch: MicroBatch, values: Tensor) -> dict[tuple[int, int], np.ndarray]:
    """Per-row [B, T - 1] `values` back to one float32 array per response, keyed by (group, response).

    Only the masked (response) columns are kept, so each array has the response's length.
    """
    assert values.shape == micro_batch.response_mask.shape, (values.shape, micro_batch.response_mask.shape)
    mask = micro_batch.response_mask.bool().cpu()
    values = values.detach().float().cpu()
    return {row: values[b][mask[b]].numpy() for b, row in enumerate(micro_batch.rows)}


def to_device(micro_batch: MicroBatch, device: torch.device) -> MicroBatch:
    """A copy of `micro_batch` with every tensor on `device`."""
    return MicroBatch(
        input_ids=micro_batch.input_ids.to(device),
        attention_mask=micro_batch.attention_mask.to(device),
        position_ids=micro_batch.position_ids.to(device),
        response_mask=micro_batch.response_mask.to(device),
        advantages=micro_batch.advantages.to(device),
        behaviour_logprobs=micro_batch.behaviour_logprobs.to(device),
        rows=micro_batch.rows,
    )
