"""Bucketed broadcast of full model weights from learner rank 0 to every sampler engine.

Wire order on the sync group (rank 0 sends, every other rank receives, all in this order):

    1. metadata length      int64[1]
    2. metadata             uint8[length]: msgpack {schema, version, bucket_bytes, [(name, dtype, shape)]}
    3. bucket 0 .. n-1      flat buffer of one dtype each, planned by `plan_buckets(metas, bucket_bytes)`;
                            up to IN_FLIGHT buckets are on the wire at once (started in this order everywhere)

Ordering contract (break it and the ranks deadlock or read garbage):
- The learner pushes AFTER the optimizer step of version v, with the full weights of version v.
- A sampler receives BETWEEN generation calls (never while its engine is generating), then reloads,
  resets its prefix cache and only then reports version v.
- Every learner rank gathers full tensors in the SAME order (FSDP2 all-gathers are collective); only rank 0
  sends. Never interleave the gathers with the send in an order the other learner ranks do not follow:
  finish the gather of whatever `send` is given before calling it, or gather in `send`'s bucket order on
  every rank.
- One broadcast at a time per group; a failed one leaves the group unusable (form the next generation).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from speed_async.weight_sync.buckets import (
    DTYPES,
    Bucket,
    decode_metadata,
    describe,
    encode_metadata,
    pack,
    plan_buckets,
    unpack,
)
from speed_async.weight_sync.group import Pending, SyncGroup

# Small on CPU: a tensor bigger than a bucket travels alone and is sent in place (no copy); the small ones are
# packed, so a broadcast is a few hundred collectives at most. On CUDA the gathered tensors live on the host
# and must be copied to the device anyway, so bigger buckets cost nothing extra.
DEFAULT_BUCKET_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}
IN_FLIGHT = 2  # broadcasts started and not yet finished: one on the wire while the next one is packed


@dataclass(frozen=True)
class SyncStats:
    """What one broadcast moved: wall seconds, payload bytes (tensor data only) and bucket count."""

    seconds: float
    bytes: int
    buckets: int

    @property
    def gbps(self) -> float:
        """Throughput in GB/s (10^9 bytes)."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def _send_metadata(group: SyncGroup, payload: bytes) -> None:
    length = torch.tensor([len(payload)], dtype=torch.int64, device=group.device)
    group.broadcast(length, "metadata length")
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(group.device)
    group.broadcast(data, "metadata")


def _receive_metadata(group: SyncGroup) -> bytes:
    length = torch.zeros(1, dtype=torch.int64, device=group.device)
    group.broadcast(length, "metadata length")
    data = torch.empty(int(length.item()), dtype=torch.uint8, device=group.device)
    group.broadcast(data, "metadata")
    return data.cpu().numpy().tobytes()


class WeightBroadcaster:
    """The sender side (rank 0 of a `SyncGroup`).

    A broadcast is pipelined: bucket i+1 is packed while bucket i is on the wire (at most `IN_FLIGHT` started
    and unfinished). A bucket holding one tensor that is already contiguous on the group's device is sent in
    place; the others are packed into staging buffers that are allocated once and reused for every version.
    """

    def __init__(self, group: SyncGroup, bucket_bytes: int | None = None) -> None:
        """`bucket_bytes` defaults to 8 MiB on CPU and 256 MiB on CUDA."""
        if group.rank != 0:
            raise ValueError(f"WeightBroadcaster needs rank 0 of the sync group, got rank {group.rank}")
        self.group = group
        self.bucket_bytes = bucket_bytes if bucket_bytes is not None else DEFAULT_BUCKET_BYTES[group.device.type]
        if self.bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes={self.bucket_bytes} is not allowed; it must be > 0")
        self._staging: list[torch.Tensor] = []  # IN_FLIGHT raw byte buffers, grown on demand

    def _stage(self, slot: int, bucket: Bucket) -> torch.Tensor:
        """A reusable flat buffer of `bucket`'s dtype and size (staging slot `slot`)."""
        while len(self._staging) <= slot:
            self._staging.append(torch.empty(0, dtype=torch.uint8, device=self.group.device))
        if self._staging[slot].numel() < bucket.nbytes:
            self._staging[slot] = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.group.device)
        return self._staging[slot][: bucket.nbytes].view(DTYPES[bucket.dtype])

    def _flat(self, bucket: Bucket, tensors: list[torch.Tensor], slot: int) -> torch.Tensor:
        """The buffer to broadcast for `bucket`: the tensor itself when it can be sent in place, else packed."""
        if len(tensors) == 1:
            (tensor,) = tensors
            if tensor.device == self.group.device and tensor.is_contiguous() and tensor.dtype == DTYPES[bucket.dtype]:
                return tensor.view(-1)
        return pack(bucket, tensors, self.group.device, out=self._stage(slot, bucket))

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncStats:
        """Broadcast every tensor as policy `version`; returns what was moved and how long it took.

        `named_tensors` is walked once, up front, for names, dtypes and shapes (references only); the data
        is read bucket by bucket, so it may live anywhere a `copy_` can read from. The tensors must not change
        until `send` returns.
        """
        start = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in named_tensors:
            if name in tensors:
                raise ValueError(f"tensor name {name!r} appears twice in the weights for version {version}")
            tensors[name] = tensor
        metas = [describe(name, tensor) for name, tensor in tensors.items()]
        buckets = plan_buckets(metas, self.bucket_bytes)
        _send_metadata(self.group, encode_metadata(version, self.bucket_bytes, metas))
        in_flight: deque[Pending] = deque()
        for i, bucket in enumerate(buckets):
            # Staging slot i % IN_FLIGHT is free: the broadcast that last used it (bucket i - IN_FLIGHT) is done.
            flat = self._flat(bucket, [tensors[m.name] for m in bucket.metas], slot=i % IN_FLIGHT)
            in_flight.append(self.group.broadcast_async(flat, f"bucket {i} of {len(buckets)}"))
            if len(in_flight) >= IN_FLIGHT:
                in_flight.popleft().wait()
        while in_flight:
            in_flight.popleft().wait()
        if self.group.device.type == "cuda":
            torch.cuda.synchronize(self.group.device)
        return SyncStats(
            seconds=time.perf_counter() - start, bytes=sum(b.nbytes for b in buckets), buckets=len(buckets)
        )


class BufferPool:
    """Receive buffers kept from one version to the next (CPU): a fresh buffer costs a page fault per 4 KiB
    page on first touch, which is several times the copy itself. A buffer goes back into the pool only after
    the reload that used it has finished, so no live tensor of the engine ever aliases a reused buffer."""

    def __init__(self) -> None:
        self._free: dict[tuple[torch.dtype, int, str], list[torch.Tensor]] = {}

    def take(self, dtype: torch.dtype, numel: int, device: torch.device) -> torch.Tensor:
        """A buffer of `numel` elements of `dtype` on `device` (reused when one is free, else new)."""
        free = self._free.get((dtype, numel, str(device)))
        # First in, first out: each bucket gets the buffer the same bucket had last version.
        return free.pop(0) if free else torch.empty(numel, dtype=dtype, device=device)

    def give(self, buffers: Iterable[torch.Tensor]) -> None:
        """Return buffers nothing refers to any more."""
        for buf in buffers:
            self._free.setdefault((buf.dtype, buf.numel(), str(buf.device)), []).append(buf)


@dataclass
class Incoming:
    """A broadcast whose metadata has arrived; `tensors()` receives the buckets ahead of the consumer."""

    group: SyncGroup
    version: int
    buckets: list[Bucket]
    device: torch.device
    pool: BufferPool | None = None
    ahead: int | None = 1
    """Buckets posted beyond the one the consumer is taking; None posts every bucket at once (the transfer
    then runs at the wire's speed while the consumer reloads, at the cost of holding the whole broadcast)."""
    receive_first: bool = False
    """With `ahead=None`: every bucket is in before the consumer gets the first tensor, so the consumer's work
    (an engine's reload) does not compete with the transfer for the receiver's cores (CPU)."""
    received_buckets: int = field(default=0)
    _used: list[torch.Tensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Tensor bytes in the whole broadcast."""
        return sum(b.nbytes for b in self.buckets)

    def _start(self, i: int) -> tuple[torch.Tensor, Pending]:
        bucket = self.buckets[i]
        dtype = DTYPES[bucket.dtype]
        flat = (
            self.pool.take(dtype, bucket.numel, self.group.device)
            if self.pool is not None
            else torch.empty(bucket.numel, dtype=dtype, device=self.group.device)
        )
        self._used.append(flat)
        return flat, self.group.broadcast_async(flat, f"bucket {i} of {len(self.buckets)}")

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) bucket by bucket; a bucket's tensors are views into its own flat buffer, valid
        until `release()`. Buckets i+1 .. i+`ahead` are already being received while the consumer takes bucket i.

        Consume it completely: the sender blocks on every bucket until all receivers have taken it.
        """
        assert self.received_buckets == 0, "an Incoming broadcast can be consumed once"
        n = len(self.buckets)
        depth = n if self.ahead is None else 1 + max(0, self.ahead)
        started: deque[tuple[torch.Tensor, Pending]] = deque(self._start(i) for i in range(min(depth, n)))
        if self.receive_first and self.ahead is None:
            for _, pending in started:
                pending.wait()
        for i, bucket in enumerate(self.buckets):
            flat, pending = started.popleft()
            pending.wait()
            self.received_buckets += 1
            if i + depth < n:
                started.append(self._start(i + depth))
            if flat.device != self.device:
                flat = flat.to(self.device)
            yield from unpack(bucket, flat)

    def release(self) -> None:
        """The consumer is done with every yielded tensor (its reload copied them): the buffers go back to
        the pool for the next version."""
        if self.pool is not None:
            self.pool.give(self._used)
        self._used = []


def receive(
    group: SyncGroup,
    device: torch.device | str | None = None,
    pool: BufferPool | None = None,
    ahead: int | None = 1,
    receive_first: bool = False,
) -> Incoming:
    """Receive the metadata of the next broadcast on `group` (rank > 0); tensors land on `device`; receive
    buffers come from `pool` when given (return them with `Incoming.release()`); `ahead` and `receive_first`:
    see `Incoming`."""
    if group.rank == 0:
        raise ValueError("receive() is for ranks > 0 of the sync group; rank 0 sends")
    version, bucket_bytes, metas = decode_metadata(_receive_metadata(group))
    target = torch.device(device) if device is not None else group.device
    buckets = plan_buckets(metas, bucket_bytes)
    return Incoming(group, version, buckets, target, pool=pool, ahead=ahead, receive_first=receive_first)
