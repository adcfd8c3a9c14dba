"""The receiving end inside a vLLM worker: a mixin that vLLM adds to its worker class.

Pass `worker_extension_cls="speed_async.weight_sync.worker_extension.WeightSyncWorkerExtension"` to `LLM`
and call the methods by name with `llm.collective_rpc("method", args=(...))`. Inside the worker, `self` is
vLLM's worker: it provides `self.device` and `self.reload_weights(weights_iterator=..., is_checkpoint_format=
True)`, which copies checkpoint-format (HF-named) tensors into the running model the way the loader does.
(`model.load_weights` on the CPU backend skips the repacking of linear weights and corrupts the model.)
Nothing here imports vLLM. The caller resets the prefix cache after a reload.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Iterable, Iterator
from typing import Any

import torch

from speed_async.weight_sync.broadcast import BufferPool, receive
from speed_async.weight_sync.group import SyncGroup


def with_tied_head(
    named: Iterable[tuple[str, torch.Tensor]], names: Collection[str], tied: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """`named`, plus `lm_head.weight` right after `model.embed_tokens.weight` when the embeddings are tied and
    `names` (every name `named` holds) lacks it.

    An HF checkpoint of a tied model, and the learner's broadcast, hold the embedding once. vLLM's layerwise
    reload then loads nothing into its LM head and puts the head's old kernel tensors back ("ParallelLMHead:
    Failed to load weights"): the sampler's head would keep the weights its engine started with (found and fixed
    by the issue-15 work, where the measured log-prob error of such a reload was 0.40 nats on the tiny model).
    """
    add = tied and "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    for name, tensor in named:
        yield name, tensor
        if add and name == "model.embed_tokens.weight":
            yield "lm_head.weight", tensor


class WeightSyncWorkerExtension:
    """Weight-sync methods mixed into vLLM's worker class (state lives on the worker instance)."""

    device: torch.device
    reload_weights: Any  # provided by vLLM's worker
    _weight_sync_group: SyncGroup | None = None
    _receive_pool: BufferPool | None = None

    def init_weight_sync(
        self,
        master_addr: str,
        master_port: int,
        rank: int,
        world_size: int,
        timeout_s: float,
        generation: int = 0,
    ) -> None:
        """Join the learner's sync group as `rank` (>= 1), replacing any earlier generation."""
        if rank < 1:
            raise ValueError(f"rank={rank} is not allowed for an engine; rank 0 is the learner")
        self.close_weight_sync()
        self._weight_sync_group = SyncGroup.connect(
            master_addr,
            master_port,
            rank=rank,
            world_size=world_size,
            device=self.device.type,
            timeout_s=timeout_s,
            generation=generation,
        )

    def receive_weights_rpc(self, version: int, tied: bool = False) -> dict[str, float | int]:
        """Receive one broadcast (which must be `version`) and reload it (`tied`: the model's LM head shares the
        embedding, see `with_tied_head`); returns sizes and timings."""
        group = self._weight_sync_group
        if group is None:
            raise RuntimeError("receive_weights_rpc: no weight-sync group; call init_weight_sync first")
        start = time.perf_counter()
        if self._receive_pool is None and group.device.type == "cpu":
            # On CPU, receive buffers are kept between versions (one extra copy of the weights in host memory):
            # fresh ones cost a page fault per page. CUDA's caching allocator already reuses device memory.
            self._receive_pool = BufferPool()
        # On CPU every bucket is posted at once (into the pooled buffers) and received before the reload starts:
        # receiving and reloading are both copies by this engine's cores, so overlapping them only slows the
        # learner's send (SPEED_ASYNC_RELOAD_WHILE_RECEIVING=1 overlaps them, for comparison). On CUDA the copies
        # run on the device and one bucket ahead bounds the extra device memory.
        on_cpu = self._receive_pool is not None
        overlap = os.environ.get("SPEED_ASYNC_RELOAD_WHILE_RECEIVING") == "1"
        incoming = receive(
            group, self.device, pool=self._receive_pool, ahead=None if on_cpu else 1, receive_first=not overlap
        )
        if incoming.version != version:
            raise RuntimeError(f"weight broadcast carries version {incoming.version}, expected version {version}")
        names = {meta.name for bucket in incoming.buckets for meta in bucket.metas}
        self.reload_weights(weights_iterator=with_tied_head(incoming.tensors(), names, tied), is_checkpoint_format=True)
        assert incoming.received_buckets == len(incoming.buckets), "reload must consume every bucket"
        incoming.release()  # the reload has copied every tensor into the model
        return {
            "version": incoming.version,
            "bytes": incoming.nbytes,
            "buckets": len(incoming.buckets),
            "seconds": time.perf_counter() - start,
        }

    def reload_from_named(self, named: list[tuple[str, torch.Tensor]], tied: bool = False) -> None:
        """Reload from local (name, tensor) pairs through the same path as a broadcast."""
        weights = with_tied_head(((name, t.to(self.device)) for name, t in named), {n for n, _ in named}, tied)
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)

    def close_weight_sync(self) -> None:
        """Leave the sync group (no-op when not in one)."""
        if self._weight_sync_group is not None:
            self._weight_sync_group.close()
            self._weight_sync_group = None
