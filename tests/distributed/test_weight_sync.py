"""Weight sync: the bucket plan (pure), gloo broadcasts on loopback, the missing-rank timeout, and a real
learner-side sender process feeding a vLLM engine in another process."""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from speed_async.weight_sync.broadcast import BufferPool, SyncStats, WeightBroadcaster, receive
from speed_async.weight_sync.buckets import (
    TensorMeta,
    decode_metadata,
    encode_metadata,
    pack,
    plan_buckets,
    unpack,
)
from speed_async.weight_sync.group import SyncGroup, SyncTimeoutError

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- bucket plan (pure) --------------------------------------------------------------------------------------
A = TensorMeta("a", "float32", (2, 3))  # 6 elements, 24 bytes
B = TensorMeta("b", "bfloat16", (4,))  # 4 elements, 8 bytes
C = TensorMeta("c", "float32", (5,))  # 5 elements, 20 bytes
D = TensorMeta("d", "float32", (10,))  # 10 elements, 40 bytes


def test_plan_groups_per_dtype_in_order_and_splits_at_the_limit() -> None:
    # 48-byte buckets: float32 a (24) + c (20) = 44 <= 48; + d (40) = 84 > 48, so [a, c] closes and d opens
    # a new one. At the end the open buckets flush in order of first appearance: float32 [d], bfloat16 [b].
    buckets = plan_buckets([A, B, C, D], bucket_bytes=48)
    assert [[m.name for m in b.metas] for b in buckets] == [["a", "c"], ["d"], ["b"]]
    assert [b.dtype for b in buckets] == ["float32", "float32", "bfloat16"]
    assert buckets[0].offsets == (0, 6) and buckets[0].numel == 11 and buckets[0].nbytes == 44


def test_plan_with_tiny_and_huge_buckets() -> None:
    # 1 byte: every tensor is bigger than a bucket, so each travels alone, float32 ones first (a, c, d close
    # as the next float32 arrives or at the end; b is the only bfloat16).
    assert [[m.name for m in b.metas] for b in plan_buckets([A, B, C, D], 1)] == [["a"], ["c"], ["d"], ["b"]]
    # 1 GiB: one bucket per dtype.
    assert [[m.name for m in b.metas] for b in plan_buckets([A, B, C, D], 1 << 30)] == [["a", "c", "d"], ["b"]]
    with pytest.raises(ValueError, match="bucket_bytes=0"):
        plan_buckets([A], 0)


def test_metadata_round_trip_and_malformed_metadata() -> None:
    payload = encode_metadata(7, 48, [A, B])
    assert decode_metadata(payload) == (7, 48, [A, B])
    with pytest.raises(ValueError, match="malformed weight-sync metadata"):
        decode_metadata(b"\x93\x01\x02")
    with pytest.raises(ValueError, match=r"dtypes \['complex64'\]"):
        decode_metadata(encode_metadata(1, 48, [TensorMeta("z", "complex64", (1,))]))


def test_pack_unpack_round_trip() -> None:
    (bucket,) = plan_buckets([A, C], 1 << 20)
    a, c = torch.arange(6.0).view(2, 3), torch.arange(5.0) + 100
    flat = pack(bucket, [a, c], "cpu")
    assert flat.tolist() == [0, 1, 2, 3, 4, 5, 100, 101, 102, 103, 104]
    out = dict(unpack(bucket, flat))
    assert torch.equal(out["a"], a) and torch.equal(out["c"], c)


# ---- gloo on loopback, in threads of this process -------------------------------------------------------------
def _weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ("emb", torch.randn(50, 16, generator=g)),
        ("norm", torch.randn(16, generator=g).to(torch.bfloat16)),
        ("proj.weight", torch.randn(16, 16, generator=g)),
        ("proj.bias", torch.randn(16, generator=g)),
    ]


@pytest.mark.parametrize(
    ("ahead", "receive_first"),
    [(1, False), (None, False), (None, True)],
    ids=["one-bucket-ahead", "all-buckets-posted", "all-received-first"],
)
@pytest.mark.parametrize("bucket_bytes", [64, 1 << 30], ids=["smaller-than-a-tensor", "larger-than-the-model"])
def test_broadcast_delivers_every_tensor_exactly(bucket_bytes: int, ahead: int | None, receive_first: bool) -> None:
    port, versions = _free_port(), {3: _weights(0), 4: _weights(1)}
    received: dict[int, dict[str, torch.Tensor]] = {}

    def receiver() -> None:
        group = SyncGroup.connect("127.0.0.1", port, rank=1, world_size=2, device="cpu", timeout_s=20)
        pool = BufferPool()
        for _ in versions:  # the second version lands in the buffers the first one used
            incoming = receive(group, pool=pool, ahead=ahead, receive_first=receive_first)
            received[incoming.version] = {name: t.clone() for name, t in incoming.tensors()}
            incoming.release()
        group.close()

    thread = threading.Thread(target=receiver)
    thread.start()
    group = SyncGroup.connect("127.0.0.1", port, rank=0, world_size=2, device="cpu", timeout_s=20)
    broadcaster = WeightBroadcaster(group, bucket_bytes=bucket_bytes)
    stats = [broadcaster.send(sent, version=v) for v, sent in versions.items()]
    thread.join(timeout=20)
    group.close()
    # 50*16 + 16*16 + 16 = 1072 float32 (4288 bytes) + 16 bfloat16 (32 bytes) = 4320 bytes.
    assert stats[0].bytes == 4320
    # 64-byte buckets: proj.bias (64 bytes) and norm (32) fit alone, emb and proj.weight exceed: 4 buckets.
    assert stats[0].buckets == (4 if bucket_bytes == 64 else 2)
    assert set(received) == {3, 4}
    for version, sent in versions.items():
        assert set(received[version]) == {name for name, _ in sent}
        for name, tensor in sent:
            got = received[version][name]
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), (version, name)


def test_pack_into_a_reused_buffer() -> None:
    (bucket,) = plan_buckets([A, C], 1 << 20)
    out = torch.full((11,), -1.0)
    flat = pack(bucket, [torch.arange(6.0).view(2, 3), torch.arange(5.0) + 100], "cpu", out=out)
    assert flat.data_ptr() == out.data_ptr() and out.tolist() == [0, 1, 2, 3, 4, 5, 100, 101, 102, 103, 104]


def test_sender_times_out_naming_the_rank_that_never_joined() -> None:
    start = time.monotonic()
    with pytest.raises(SyncTimeoutError, match=r"generation 4, rank 0 of 3, step 'connect'.*rank\(s\) \[1, 2\]"):
        SyncGroup.connect("127.0.0.1", _free_port(), rank=0, world_size=3, device="cpu", timeout_s=2, generation=4)
    assert time.monotonic() - start < 4


# ---- a vLLM engine in another process receives from this one ---------------------------------------------------
def _perturbed(model_dir: Path, seed: int = 1) -> list[tuple[str, torch.Tensor]]:
    """The 'learner's' weights: the tiny model plus seeded noise (same result in every process)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    return [(n, t.detach() + 0.5 * t.std() * torch.randn(t.shape, generator=g)) for n, t in model.state_dict().items()]


PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [(5 * i) % 97 + 1 for i in range(33)]]
# Small buckets: the broadcast mixes tensors sent in place with packed buckets and keeps two on the wire.
BUCKET_BYTES = 256 << 10


def _receiver_main(model_dir: str, port: int, out: mp.Queue) -> None:
    from speed_async.sampler.engine import Engine, SamplingSettings

    settings = SamplingSettings(temperature=1.0, top_p=1.0, max_tokens=10, seed=5)

    def outputs() -> list[tuple[list[int], list[float]]]:
        result = engine.generate(PROMPTS, [2, 3], settings)
        return [(c.token_ids.tolist(), c.logprobs.tolist()) for group in result for c in group]

    engine = Engine(model_dir, dtype="float32", max_model_len=512, enforce_eager=True)
    try:
        initial = outputs()
        out.put(("ready", None))
        engine.init_weight_sync("127.0.0.1", port, 1, 2, "gloo", 30.0)
        seconds = engine.receive_weights(1)
        assert engine.version == 1
        synced = [outputs()]
        engine.receive_weights(2)  # into the receive buffers version 1 used (CPU buffer pool)
        synced.append(outputs())
        local = []
        for seed in (1, 2):
            engine.load_weights_from_tensors(_perturbed(Path(model_dir), seed), version=10 + seed)
            local.append(outputs())
        out.put(("done", (initial, synced, local, seconds)))
    finally:
        engine.close()


def test_engine_outputs_after_broadcast_equal_a_local_load(tiny_model_dir: Path) -> None:
    ctx = mp.get_context("spawn")
    port, queue = _free_port(), ctx.Queue()
    proc = ctx.Process(target=_receiver_main, args=(str(tiny_model_dir), port, queue))
    proc.start()
    try:
        weights = [_perturbed(tiny_model_dir, 1), _perturbed(tiny_model_dir, 2)]  # before the receiver's clock runs
        assert queue.get(timeout=120) == ("ready", None)
        group = SyncGroup.connect("127.0.0.1", port, rank=0, world_size=2, device="cpu", timeout_s=30)
        broadcaster = WeightBroadcaster(group, bucket_bytes=BUCKET_BYTES)
        stats: SyncStats = broadcaster.send(weights[0], version=1)
        broadcaster.send(weights[1], version=2)
        tag, (initial, synced, local, receive_s) = queue.get(timeout=60)
        group.close()
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    assert tag == "done" and proc.exitcode == 0
    print(
        f"sync of {stats.bytes / 1e6:.2f} MB in {stats.buckets} bucket(s): send {stats.seconds:.3f} s "
        f"({stats.gbps:.2f} GB/s), receive + reload + cache reset {receive_s:.3f} s"
    )
    assert stats.buckets > 4, "several buckets, so the pipeline and the buffer reuse are exercised"
    assert [t for t, _ in synced[0]] != [t for t, _ in initial]  # the broadcast changed the policy
    assert synced[0] == local[0]  # and it is exactly the policy of the sender's weights
    assert synced[1] == local[1], "version 2, received into reused buffers, is exactly the sender's weights"
    assert synced[1] != synced[0]
    assert np.isfinite([lp for _, lps in synced[0] for lp in lps]).all()
