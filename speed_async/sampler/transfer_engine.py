"""vLLM's weight-transfer interface, served by this project's sync group: the receiving end inside vLLM's worker.

vLLM 0.32 lets a trainer push weights into a running engine through four calls, `init_weight_transfer_engine`,
`start_weight_update`, `update_weights` and `finish_weight_update`, which its worker hands to a
`WeightTransferEngine` chosen by name from `WeightTransferEngineFactory` (`LLM(weight_transfer_config=...)`).
`register()` adds this module's engine to that factory as `BACKEND`; `speed_async.sampler.engine.Engine` starts
vLLM with it and drives every weight update through those four calls:

```
  learner rank 0 ── WeightBroadcaster.send(v) ══ sync group (gloo on CPU, NCCL on CUDA) ══╗
  Engine.init_weight_sync ──► llm.init_weight_transfer_engine  ──► join generation g      ║
  Engine.receive_weights(v) ─► llm.start_weight_update         ──► open a layerwise reload ║
                              llm.update_weights({version: v}) ──► receive every bucket ◄═╝ then model.load_weights
                              llm.finish_weight_update         ──► layerwise post-processing (CPU: repacking)
```
The wire is the project's (`speed_async.weight_sync.broadcast`: metadata first, then buckets, every wait bounded
and naming who did not answer); `SyncGroup` picks gloo or NCCL from the worker's device, so CPU and CUDA run
this same code. Loading follows vLLM's own NCCL engine: `model.load_weights` between `initialize_layerwise_reload`
and `finalize_layerwise_reload`, which is exactly what the worker's `reload_weights` does (a bare
`model.load_weights` on the CPU backend skips the repacking of linear weights and corrupts the model).

Why not vLLM's own NCCL engine on CUDA: its group is a `PyNcclCommunicator` whose broadcasts have no timeout (a
sampler killed in a transfer would hang the learner's send for good, where the project bounds every wait and
re-forms the group per generation without the lost sampler), its trainer side would bring vLLM into the learner
(vLLM stays in the sampler), and its receiver needs every tensor's name, dtype and shape in the update request
(here they travel on the broadcast itself). Why `update_weights` is overridden: the base class ends it with
`torch.accelerator.synchronize()`, which raises on a CPU-only torch ("Cannot access accelerator device when none
is available"); this engine synchronizes only on CUDA.

Registration lives in the process that creates the vLLM worker: the project runs the engine in process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, as the launcher sets it) and `Engine` registers before it starts vLLM. (A
multiprocess engine would need the registration in its worker process too, e.g. through vLLM's
`vllm.general_plugins` entry point; vLLM then fails at start-up naming the unknown backend.)
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from speed_async.weight_sync.broadcast import BufferPool, receive
from speed_async.weight_sync.group import SyncGroup

BACKEND = "speed_async"
"""The name of this engine in vLLM's WeightTransferEngineFactory (`WeightTransferConfig(backend=BACKEND)`)."""


@dataclass
class SyncGroupInitInfo(WeightTransferInitInfo):
    """Where and as whom this engine joins the learner's sync group."""

    master_address: str
    master_port: int
    rank: int
    """This engine's rank (>= 1; rank 0 is the learner)."""
    world_size: int
    timeout_s: float
    generation: int = 0
    """The sync group's generation (it is re-formed when a sampler leaves or joins)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank={self.rank} is not allowed for an engine; rank 0 is the learner")


@dataclass
class SyncGroupUpdateInfo(WeightTransferUpdateInfo):
    """One update: the policy version the broadcast must carry."""

    version: int


class SyncGroupTransferEngine(WeightTransferEngine[SyncGroupInitInfo, SyncGroupUpdateInfo]):
    """Receives the learner's bucketed broadcast on the sync group and loads it through vLLM's layerwise reload."""

    init_info_cls = SyncGroupInitInfo
    update_info_cls = SyncGroupUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group: SyncGroup | None = None
        # On CPU receive buffers are kept between versions (one extra copy of the weights in host memory): fresh
        # ones cost a page fault per page. CUDA's caching allocator already reuses device memory.
        self.pool = BufferPool() if self.device.type == "cpu" else None
        self.last_update: dict[str, int] = {}

    def init_transfer_engine(self, init_info: SyncGroupInitInfo) -> None:
        """Join generation `init_info.generation` of the sync group, leaving any earlier one."""
        self.shutdown()
        self.group = SyncGroup.connect(
            init_info.master_address,
            init_info.master_port,
            rank=init_info.rank,
            world_size=init_info.world_size,
            device=self.device.type,
            timeout_s=init_info.timeout_s,
            generation=init_info.generation,
        )

    def start_weight_update(self) -> None:
        """Open a layerwise reload of the checkpoint-format weights about to arrive."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """Receive one broadcast and load it (synchronizing the device only on CUDA; see the module docstring)."""
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def receive_weights(self, update_info: SyncGroupUpdateInfo) -> None:
        """Receive every bucket of the next broadcast (which must carry `update_info.version`) into the model."""
        if self.group is None:
            raise RuntimeError("update_weights: no weight-sync group; call init_weight_transfer_engine first")
        # On CPU every bucket is posted at once (into the pooled buffers) and received before loading starts:
        # receiving and loading are both copies by this engine's cores, so overlapping them only slows the
        # learner's send (SPEED_ASYNC_RELOAD_WHILE_RECEIVING=1 overlaps them, for comparison). On CUDA the copies
        # run on the device and one bucket ahead bounds the extra device memory.
        on_cpu = self.pool is not None
        overlap = os.environ.get("SPEED_ASYNC_RELOAD_WHILE_RECEIVING") == "1"
        incoming = receive(
            self.group, self.device, pool=self.pool, ahead=None if on_cpu else 1, receive_first=not overlap
        )
        if incoming.version != update_info.version:
            raise RuntimeError(
                f"weight broadcast carries version {incoming.version}, expected version {update_info.version}"
            )
        names = {meta.name for bucket in incoming.buckets for meta in bucket.metas}
        self.model.load_weights(with_tied_head(incoming.tensors(), names, tied_embeddings(self.model_config)))
        assert incoming.received_buckets == len(incoming.buckets), "loading must consume every bucket"
        incoming.release()  # the load has copied every tensor into the model
        self.last_update = {"version": incoming.version, "bytes": incoming.nbytes, "buckets": len(incoming.buckets)}

    def finish_weight_update(self) -> None:
        """Run the layerwise post-processing of the loaded weights (on CPU: the repacking of linear weights)."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        """Leave the sync group (no-op when not in one)."""
        if self.group is not None:
            self.group.close()
            self.group = None


def tied_embeddings(model_config: Any) -> bool:
    """Whether the model's output head shares the input embedding's weights (vLLM's model config)."""
    return bool(getattr(model_config.hf_config, "tie_word_embeddings", False))


def with_tied_head(
    named: Iterable[tuple[str, torch.Tensor]], names: Collection[str], tied: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """`named`, plus `lm_head.weight` right after `model.embed_tokens.weight` when the embeddings are tied and
    `names` (every name `named` holds) lacks it.

    An HF checkpoint of a tied model, and the learner's broadcast, hold the embedding once. vLLM's layerwise
    reload then loads nothing into its LM head and puts the head's old kernel tensors back ("ParallelLMHead:
    Failed to load weights"): the head would keep the weights the engine started with. Measured on the tiny model
    with perturbed weights: log-probs off by up to 3.2 nats from the true model's without the head, 4e-6 with it.
    """
    add = tied and "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    for name, tensor in named:
        yield name, tensor
        if add and name == "model.embed_tokens.weight":
            yield "lm_head.weight", tensor


def register() -> str:
    """Add this engine to vLLM's WeightTransferEngineFactory as BACKEND (once per process); returns BACKEND."""
    try:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, SyncGroupTransferEngine.__name__)
    except ValueError as err:
        if "already registered" not in str(err):
            raise
    return BACKEND
