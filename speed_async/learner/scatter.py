"""Send the step's training groups from rank 0 (where the rollout stream lands) to every learner rank.

Tensor collectives only (no pickle): five broadcasts at most, in this order, every rank knowing each size
from the ones before:
    sizes   int64 [5]           num_groups, num_responses, int32 count, float32 count, text bytes
    meta    int64 [G*6 + R]     per group (prompt_id, epoch, version, num_responses, prompt_len, source_len),
                                then every response length
    ints    int32 [...]         per group: prompt tokens, then each response's tokens
    floats  float32 [...]       per group: each response's behaviour log-probs, then the rewards
    text    uint8 [...]         the data_source strings, utf-8, concatenated
Empty buffers are not broadcast (every rank skips the same ones).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from speed_async.curriculum.train_group import TrainGroup

_META_FIELDS = 6


def encode_groups(groups: list[TrainGroup]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(meta int64, ints int32, floats float32, text uint8) flat buffers of `groups` (layout: module doc)."""
    sources = [g.data_source.encode("utf-8") for g in groups]
    header = [
        (g.prompt_id, g.epoch, g.version, len(g.responses), len(g.prompt_token_ids), len(source))
        for g, source in zip(groups, sources, strict=True)
    ]
    lengths = [len(r) for g in groups for r in g.responses]
    meta = np.array([v for row in header for v in row] + lengths, dtype=np.int64)
    ints = [part for g in groups for part in (g.prompt_token_ids, *g.responses)]
    floats = [part for g in groups for part in (*g.behaviour_logprobs, g.rewards)]
    return (
        meta,
        np.concatenate(ints) if ints else np.zeros(0, dtype=np.int32),
        np.concatenate(floats) if floats else np.zeros(0, dtype=np.float32),
        np.frombuffer(b"".join(sources), dtype=np.uint8).copy(),
    )


def decode_groups(
    num_groups: int, meta: np.ndarray, ints: np.ndarray, floats: np.ndarray, text: np.ndarray
) -> list[TrainGroup]:
    """Inverse of `encode_groups` for `num_groups` groups."""
    header = meta[: num_groups * _META_FIELDS]
    lengths = iter(meta[num_groups * _META_FIELDS :].tolist())
    text_bytes = text.tobytes()
    groups = []
    i = f = t = 0
    for prompt_id, epoch, version, n, prompt_len, source_len in header.reshape(num_groups, _META_FIELDS).tolist():
        sizes = [next(lengths) for _ in range(n)]
        prompt = ints[i : i + prompt_len]
        i += prompt_len
        responses, logprobs = [], []
        for size in sizes:
            responses.append(ints[i : i + size].copy())
            logprobs.append(floats[f : f + size].copy())
            i += size
            f += size
        rewards = floats[f : f + n].copy()
        f += n
        source = text_bytes[t : t + source_len].decode("utf-8")
        t += source_len
        groups.append(TrainGroup(prompt_id, epoch, source, prompt.copy(), responses, logprobs, rewards, version))
    assert i == len(ints) and f == len(floats) and t == len(text_bytes), (i, f, t)
    return groups


def _device_of(group: dist.ProcessGroup | None) -> torch.device:
    """Where the collectives of `group` need their tensors: the current CUDA device for nccl, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast(buffer: Tensor, src: int, group: dist.ProcessGroup | None) -> Tensor:
    """Broadcast `buffer` in place from global rank `src` (skipped when empty: every rank knows the size)."""
    if buffer.numel():
        dist.broadcast(buffer, src=src, group=group)
    return buffer


def broadcast_groups(
    groups: list[TrainGroup] | None, group: dist.ProcessGroup | None = None, src: int = 0
) -> list[TrainGroup]:
    """Every rank returns the same list: `groups` as given on rank `src` (other ranks pass None).

    `src` is a global rank; `group` defaults to the default process group. Raises ValueError when `src`
    does not pass a list or another rank does (the call would otherwise silently disagree).
    """
    is_src = dist.get_rank() == src
    if is_src != (groups is not None):
        raise ValueError(
            f"broadcast_groups on rank {dist.get_rank()} got groups={'None' if groups is None else 'a list'}; "
            f"allowed: a list on the source rank {src} and None on every other rank"
        )
    device = _device_of(group)
    sizes = torch.zeros(5, dtype=torch.int64, device=device)
    buffers = encode_groups(groups) if groups is not None else None
    if groups is not None and buffers is not None:
        num_responses = sum(len(g.responses) for g in groups)
        sizes[:] = torch.tensor([len(groups), num_responses, *(len(b) for b in buffers[1:])])
    num_groups, num_responses, num_ints, num_floats, num_text = _broadcast(sizes, src, group).tolist()
    layout = [
        (num_groups * _META_FIELDS + num_responses, torch.int64),
        (num_ints, torch.int32),
        (num_floats, torch.float32),
        (num_text, torch.uint8),
    ]
    received = []
    for k, (size, dtype) in enumerate(layout):
        if buffers is not None:
            buffer = torch.from_numpy(buffers[k]).to(device)
        else:
            buffer = torch.empty(size, dtype=dtype, device=device)
        assert buffer.numel() == size and buffer.dtype == dtype, (k, buffer.numel(), size, buffer.dtype)
        received.append(_broadcast(buffer, src, group).cpu().numpy())
    return decode_groups(num_groups, *received)
