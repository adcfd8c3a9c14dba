"""Bucketed broadcast of full model weights from learner rank 0 to every sampler engine.

Wire order on the sync group (rank 0 sends, every other rank receives, all in this order):

    1. metadata length      int64[1]
    2. metadata             uint8[length]: msgpack {schema, version, bucket_bytes, [(name, dtype, shape)]}
    3. bucket 0 .. n-1      flat buffer of one dtype each, planned by `plan_buckets(metas, bucket_bytes)`

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
from speed_async.weight_sync.group import SyncGroup

DEFAULT_BUCKET_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}


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
    """The sender side (rank 0 of a `SyncGroup`)."""

    def __init__(self, group: SyncGroup, bucket_bytes: int | None = None) -> None:
        """`bucket_bytes` defaults to 256 MiB on CPU and 1 GiB on CUDA."""
        if group.rank != 0:
            raise ValueError(f"WeightBroadcaster needs rank 0 of the sync group, got rank {group.rank}")
        self.group = group
        self.bucket_bytes = bucket_bytes if bucket_bytes is not None else DEFAULT_BUCKET_BYTES[group.device.type]
        if self.bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes={self.bucket_bytes} is not allowed; it must be > 0")

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncStats:
        """Broadcast every tensor as policy `version`; returns what was moved and how long it took.

        `named_tensors` is walked once, up front, for names, dtypes and shapes (references only); the data
        is read bucket by bucket, so it may live anywhere a `copy_` can read from.
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
        for i, bucket in enumerate(buckets):
            flat = pack(bucket, [tensors[m.name] for m in bucket.metas], self.group.device)
            self.group.broadcast(flat, f"bucket {i} of {len(buckets)}")
        if self.group.device.type == "cuda":
            torch.cuda.synchronize(self.group.device)
        return SyncStats(
            seconds=time.perf_counter() - start, bytes=sum(b.nbytes for b in buckets), buckets=len(buckets)
        )


@dataclass
class Incoming:
    """A broadcast whose metadata has arrived; `tensors()` receives the buckets one at a time."""

    group: SyncGroup
    version: int
    buckets: list[Bucket]
    device: torch.device
    received_buckets: int = field(default=0)

    @property
    def nbytes(self) -> int:
        """Tensor bytes in the whole broadcast."""
        return sum(b.nbytes for b in self.buckets)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) bucket by bucket; a bucket's tensors are views into its flat buffer.

        Consume it completely: the sender blocks on every bucket until all receivers have taken it.
        """
        assert self.received_buckets == 0, "an Incoming broadcast can be consumed once"
        for i, bucket in enumerate(self.buckets):
            flat = torch.empty(bucket.numel, dtype=DTYPES[bucket.dtype], device=self.group.device)
            self.group.broadcast(flat, f"bucket {i} of {len(self.buckets)}")
            self.received_buckets += 1
            if flat.device != self.device:
                flat = flat.to(self.device)
            yield from unpack(bucket, flat)


def receive(group: SyncGroup, device: torch.device | str | None = None) -> Incoming:
    """Receive the metadata of the next broadcast on `group` (rank > 0); tensors land on `device`."""
    if group.rank == 0:
        raise ValueError("receive() is for ranks > 0 of the sync group; rank 0 sends")
    version, bucket_bytes, metas = decode_metadata(_receive_metadata(group))
    target = torch.device(device) if device is not None else group.device
    return Incoming(group=group, version=version, buckets=plan_buckets(metas, bucket_bytes), device=target)
