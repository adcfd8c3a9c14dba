"""Bucket plan and packing for the weight broadcast: pure functions, the same on sender and receiver.

The sender describes every tensor once (`TensorMeta`: name, dtype, shape), sends that list, and both sides
derive the same `plan_buckets(metas, bucket_bytes)`. A bucket is one flat buffer of a single dtype holding
whole tensors back to back; tensors keep their relative order inside a dtype, and buckets are emitted in the
order they fill up (then the partly filled ones, in order of their dtype's first appearance). A tensor larger
than `bucket_bytes` travels alone in a bucket of its own size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgpack
import torch

# Wire names of the dtypes a model's weights may have; the reverse map decodes metadata.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
METADATA_SCHEMA = 1


@dataclass(frozen=True)
class TensorMeta:
    """Name, dtype (a key of `DTYPES`) and shape of one tensor in a broadcast."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements."""
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return self.numel * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Bucket:
    """One flat buffer of `dtype`: `metas[i]` occupies elements `offsets[i]` to `offsets[i] + metas[i].numel`."""

    dtype: str
    metas: tuple[TensorMeta, ...]
    offsets: tuple[int, ...]
    numel: int

    @property
    def nbytes(self) -> int:
        """Size of the flat buffer in bytes."""
        return self.numel * DTYPES[self.dtype].itemsize


def describe(name: str, tensor: torch.Tensor) -> TensorMeta:
    """The `TensorMeta` of one named tensor; rejects dtypes the wire does not carry."""
    if tensor.dtype not in _NAMES:
        raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} is not supported; allowed: {sorted(DTYPES)}")
    return TensorMeta(name=name, dtype=_NAMES[tensor.dtype], shape=tuple(tensor.shape))


def _bucket(dtype: str, metas: list[TensorMeta]) -> Bucket:
    offsets, total = [], 0
    for meta in metas:
        offsets.append(total)
        total += meta.numel
    return Bucket(dtype=dtype, metas=tuple(metas), offsets=tuple(offsets), numel=total)


def plan_buckets(metas: Iterable[TensorMeta], bucket_bytes: int) -> list[Bucket]:
    """Group tensors into per-dtype buckets of at most `bucket_bytes` (a bigger tensor gets its own bucket)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes} is not allowed; it must be > 0")
    done: list[Bucket] = []
    open_: dict[str, list[TensorMeta]] = {}
    sizes: dict[str, int] = {}
    for meta in metas:
        current = open_.setdefault(meta.dtype, [])
        if current and sizes[meta.dtype] + meta.nbytes > bucket_bytes:
            done.append(_bucket(meta.dtype, current))
            current = open_[meta.dtype] = []
            sizes[meta.dtype] = 0
        current.append(meta)
        sizes[meta.dtype] = sizes.get(meta.dtype, 0) + meta.nbytes
    done.extend(_bucket(dtype, current) for dtype, current in open_.items() if current)
    return done


def encode_metadata(version: int, bucket_bytes: int, metas: Sequence[TensorMeta]) -> bytes:
    """msgpack of the broadcast header: schema, policy version, bucket size and [(name, dtype, shape)]."""
    tensors = [[m.name, m.dtype, list(m.shape)] for m in metas]
    header = {"schema": METADATA_SCHEMA, "version": version, "bucket_bytes": bucket_bytes, "tensors": tensors}
    return msgpack.packb(header, use_bin_type=True)


def decode_metadata(payload: bytes) -> tuple[int, int, list[TensorMeta]]:
    """Inverse of `encode_metadata`: (version, bucket_bytes, metas); a malformed header raises ValueError."""
    try:
        header = msgpack.unpackb(payload, raw=False)
        if header["schema"] != METADATA_SCHEMA:
            raise ValueError(f"metadata schema {header['schema']!r}; allowed: {METADATA_SCHEMA}")
        metas = [TensorMeta(name=n, dtype=d, shape=tuple(int(s) for s in shape)) for n, d, shape in header["tensors"]]
        version, bucket_bytes = int(header["version"]), int(header["bucket_bytes"])
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
        raise ValueError(f"malformed weight-sync metadata ({len(payload)} bytes): {exc!r}") from exc
    unknown = sorted({m.dtype for m in metas} - set(DTYPES))
    if unknown:
        raise ValueError(f"weight-sync metadata names dtypes {unknown}; allowed: {sorted(DTYPES)}")
    return version, bucket_bytes, metas


def pack(
    bucket: Bucket, tensors: Sequence[torch.Tensor], device: torch.device | str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Copy `tensors` (in `bucket.metas` order) into one flat buffer on `device` (`out` when given: a flat
    tensor of the bucket's dtype and size, e.g. a reused staging buffer)."""
    assert len(tensors) == len(bucket.metas), "one tensor per bucket entry"
    if out is not None:
        assert out.numel() == bucket.numel and out.dtype == DTYPES[bucket.dtype], "out does not fit the bucket"
    flat = out if out is not None else torch.empty(bucket.numel, dtype=DTYPES[bucket.dtype], device=device)
    for meta, offset, tensor in zip(bucket.metas, bucket.offsets, tensors, strict=True):
        assert tuple(tensor.shape) == meta.shape and _NAMES[tensor.dtype] == meta.dtype, meta.name
        flat[offset : offset + meta.numel].copy_(tensor.reshape(-1))
    return flat


def unpack(bucket: Bucket, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views into `flat`, one per entry of `bucket`, with their names and shapes."""
    assert flat.numel() == bucket.numel and flat.dtype == DTYPES[bucket.dtype]
    return [
        (meta.name, flat[offset : offset + meta.numel].view(meta.shape))
        for meta, offset in zip(bucket.metas, bucket.offsets, strict=True)
    ]
