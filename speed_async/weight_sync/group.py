"""The weight-sync process group: learner rank 0 (rank 0 here) plus every sampler engine.

It is built from its own `TCPStore` (master on learner rank 0, started first) and a gloo (CPU) or NCCL
(CUDA) process-group object, never through `init_process_group`: the FSDP world of the learner and the
in-process world of a vLLM engine stay untouched, and the group can be re-formed under a new generation
(a `PrefixStore` namespace) when a sampler leaves or joins. Every wait has a deadline; a missed one raises
`SyncTimeoutError` naming the generation, this rank and the step (connect / metadata / bucket i of n).
After any error the group is unusable: close it and form the next generation.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
_CONNECT_TRY_S = 2.0


class SyncTimeoutError(TimeoutError):
    """A weight-sync step did not complete in time (or a peer failed during it)."""


def _where(generation: int, rank: int, world_size: int, step: str) -> str:
    return f"weight-sync group generation {generation}, rank {rank} of {world_size}, step {step!r}"


def connect_store(
    master_addr: str, master_port: int, *, is_master: bool, timeout_s: float, what: str = "weight-sync store"
) -> dist.TCPStore:
    """Start the store (master) or connect to it, retrying with short tries until `timeout_s` has passed.

    A client that starts before its master backs off for tens of seconds inside one long try, so clients
    make tries of at most 2 s. Under torchrun the agent's store would be returned instead of a new one,
    hence TORCHELASTIC_USE_AGENT_STORE=False.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} is not allowed; it must be > 0")
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    if is_master:
        return dist.TCPStore(master_addr, master_port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            return dist.TCPStore(
                master_addr, master_port, None, False, timedelta(seconds=max(0.1, min(_CONNECT_TRY_S, left)))
            )
        except (RuntimeError, TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise SyncTimeoutError(
                    f"{what}: no master at {master_addr}:{master_port} within {timeout_s} s ({exc})"
                ) from exc
            time.sleep(0.2)


class Pending:
    """A started broadcast; `wait()` blocks until it completed on this rank (at most the group's timeout)."""

    def __init__(self, work: dist.Work, where: str, timeout: timedelta) -> None:
        self._work, self._where, self._timeout = work, where, timeout

    def wait(self) -> None:
        """Raise SyncTimeoutError naming the group, rank and step when it does not complete in time."""
        try:
            self._work.wait(self._timeout)
        except RuntimeError as exc:
            raise SyncTimeoutError(
                f"{self._where} did not complete within {self._timeout.total_seconds()} s: {exc}"
            ) from exc


class SyncGroup:
    """One generation of the weight-sync group; rank 0 is the sender (learner rank 0)."""

    def __init__(
        self,
        store: dist.Store,
        *,
        rank: int,
        world_size: int,
        device: str,
        timeout_s: float,
        generation: int = 0,
    ) -> None:
        """Join generation `generation` on `store`; waits up to `timeout_s` for every rank to arrive.

        Raises SyncTimeoutError naming the ranks that did not arrive.
        """
        if device not in BACKENDS:
            raise ValueError(f"device={device!r} is not supported; allowed: {sorted(BACKENDS)}")
        if world_size < 2:
            raise ValueError(f"world_size={world_size} is not allowed; it must be >= 2 (sender + receiver)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not allowed; it must be in [0, {world_size})")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} is not allowed; it must be > 0")
        self.rank, self.world_size, self.generation = rank, world_size, generation
        self._owned_store: dist.Store | None = None
        self.device = torch.device(device if device == "cpu" else f"cuda:{torch.cuda.current_device()}")
        self.backend = BACKENDS[device]
        self.timeout = timedelta(seconds=timeout_s)
        self._store = dist.PrefixStore(f"speed_async/weight_sync/gen{generation}/", store)
        self._rendezvous(timeout_s)
        if self.backend == "gloo":
            self._pg = dist.ProcessGroupGloo(self._store, rank, world_size, self.timeout)
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.timeout
            self._pg = dist.ProcessGroupNCCL(self._store, rank, world_size, options)

    @classmethod
    def connect(
        cls,
        master_addr: str,
        master_port: int,
        *,
        rank: int,
        world_size: int,
        device: str,
        timeout_s: float,
        generation: int = 0,
    ) -> SyncGroup:
        """Start (rank 0) or reach the store at master_addr:master_port and join the group on it."""
        store = connect_store(master_addr, master_port, is_master=rank == 0, timeout_s=timeout_s)
        group = cls(store, rank=rank, world_size=world_size, device=device, timeout_s=timeout_s, generation=generation)
        group._owned_store = store
        return group

    def _rendezvous(self, timeout_s: float) -> None:
        """Announce this rank and wait until every rank has; the error names the missing ones."""
        self._store.set(f"joined/{self.rank}", b"1")
        keys = [f"joined/{r}" for r in range(self.world_size)]
        deadline = time.monotonic() + timeout_s
        while not self._store.check(keys):
            if time.monotonic() >= deadline:
                missing = [r for r, key in enumerate(keys) if not self._store.check([key])]
                raise SyncTimeoutError(
                    f"{_where(self.generation, self.rank, self.world_size, 'connect')}: "
                    f"rank(s) {missing} did not join within {timeout_s} s"
                )
            time.sleep(0.05)

    def broadcast(self, tensor: torch.Tensor, step: str) -> None:
        """Broadcast `tensor` in place from rank 0; `step` names this transfer in a timeout error."""
        self.broadcast_async(tensor, step).wait()

    def broadcast_async(self, tensor: torch.Tensor, step: str) -> Pending:
        """Start broadcasting `tensor` in place from rank 0 and return at once; `Pending.wait()` finishes it.

        Collectives run in the order they are started, on every rank; leave `tensor` untouched until then.
        """
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        where = _where(self.generation, self.rank, self.world_size, step)
        try:
            return Pending(self._pg.broadcast([tensor], opts), where, self.timeout)
        except RuntimeError as exc:
            raise SyncTimeoutError(f"{where} could not start: {exc}") from exc

    def close(self) -> None:
        """Release the process group (and the store, when this group started or reached it itself)."""
        self._pg = None
        self._owned_store = None
