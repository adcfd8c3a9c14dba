"""Transport on real loopback sockets (tcp with port 0, and ipc): delivery, rejection, timeouts, binding rules."""

import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from speed_async.protocol import (
    SCHEMA_VERSION,
    Hello,
    NoWork,
    ProtocolError,
    RolloutGroup,
    Shutdown,
    WorkRequest,
    encode,
)
from speed_async.transport import (
    SHARED_KEY_ENV,
    Context,
    DealerSocket,
    PullSocket,
    PushSocket,
    RouterSocket,
    TransportError,
    TransportTimeout,
    is_loopback,
    load_shared_key,
)
from tests.unit._threads import task_cpus, threads_named

KEY = b"0123456789abcdef0123456789abcdef"
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ctx() -> Iterator[Context]:
    with Context() as context:
        yield context


def group() -> RolloutGroup:
    n, length = 4, 8
    return RolloutGroup(
        sampler_id=1,
        prompt_id=2,
        epoch=0,
        data_source="t",
        prompt_token_ids=np.arange(1, 6, dtype=np.int32),
        response_token_ids=np.arange(n * length, dtype=np.int32),
        response_lengths=np.full(n, length, np.int32),
        response_logprobs=np.linspace(-3, 0, n * length, dtype=np.float32),
        rewards=np.array([1, 0, 0, 1], np.float32),
        scores=np.array([1, 0, 0, 1], np.float32),
        finish_reasons=["stop"] * n,
        version_min=np.zeros(n, np.int32),
        version_max=np.ones(n, np.int32),
        num_screen=4,
    )


def raw_socket(ctx: Context, kind: int, endpoint: str) -> zmq.Socket:
    sock = ctx.zmq.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_push_pull_delivers_validated_messages(ctx: Context, transport: str, tmp_path: Path) -> None:
    pull = PullSocket(ctx)
    if transport == "tcp":
        endpoint = pull.bind_endpoint("127.0.0.1", 0)
        assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith(":0")
    else:
        endpoint = pull.bind_ipc(str(tmp_path / "pull.sock"))
        assert endpoint == f"ipc://{tmp_path / 'pull.sock'}"
    push = PushSocket(ctx, endpoint)
    push.send(group(), timeout_s=2.0)
    push.send(Shutdown(reason="bye"), timeout_s=2.0)
    got = pull.recv(timeout_s=2.0)
    assert isinstance(got, RolloutGroup)
    np.testing.assert_array_equal(got.response_token_ids, group().response_token_ids)
    assert got.response_logprobs.dtype == np.float32 and got.group_version == 0
    bye = pull.recv(timeout_s=2.0)
    assert isinstance(bye, Shutdown) and bye.reason == "bye"
    assert pull.rejected == Counter()


def test_localhost_binds_to_loopback(ctx: Context) -> None:
    endpoint = PullSocket(ctx).bind_endpoint("localhost", 0)
    assert endpoint.startswith("tcp://127.0.0.1:")


def test_router_dealer_request_reply(ctx: Context) -> None:
    router = RouterSocket(ctx)
    endpoint = router.bind_endpoint("127.0.0.1", 0)
    dealers = [DealerSocket(ctx, endpoint, f"sampler-{i}".encode()) for i in range(2)]
    for i, dealer in enumerate(dealers):
        dealer.send(WorkRequest(sampler_id=i, version=0, max_prompts=4), timeout_s=2.0)
    asked = {}
    for _ in dealers:
        received = router.recv(timeout_s=2.0)
        assert received is not None
        identity, msg = received
        assert isinstance(msg, WorkRequest)
        asked[identity] = msg.sampler_id
    assert asked == {b"sampler-0": 0, b"sampler-1": 1}
    router.send_to(b"sampler-1", NoWork(retry_after_s=0.5, reason="bound"))
    answer = dealers[1].recv(timeout_s=2.0)
    assert isinstance(answer, NoWork) and answer.retry_after_s == 0.5 and answer.reason == "bound"
    assert dealers[0].recv(timeout_s=0.05) is None


def test_router_refuses_unknown_peer(ctx: Context) -> None:
    router = RouterSocket(ctx)
    endpoint = router.bind_endpoint("127.0.0.1", 0)
    with pytest.raises(TransportError, match=f"no peer with identity b'ghost' is connected to {endpoint}"):
        router.send_to(b"ghost", Shutdown(reason="x"))


def test_garbage_frames_are_counted_and_the_next_valid_message_arrives(
    ctx: Context, caplog: pytest.LogCaptureFixture
) -> None:
    pull = PullSocket(ctx)
    endpoint = pull.bind_endpoint("127.0.0.1", 0)
    raw = raw_socket(ctx, zmq.PUSH, endpoint)
    raw.send(b"garbage")
    raw.send(b"")
    raw.send_multipart([encode(Shutdown(reason="a")), encode(Shutdown(reason="b"))])
    raw.send(msgpack.packb(["shutdown", SCHEMA_VERSION + 1, msgpack.packb({"reason": "x"}), None]))
    raw.send(msgpack.packb(["hello", SCHEMA_VERSION, msgpack.packb({"sampler_id": 1}), None]))
    raw.send(encode(Hello(sampler_id=7, pid=1, hostname="h")))
    with caplog.at_level(logging.WARNING, logger="speed_async.transport.sockets"):
        got = pull.recv(timeout_s=2.0)  # one call: it waits past the five bad frames
    assert isinstance(got, Hello) and got.sampler_id == 7
    assert pull.rejected == Counter({"malformed": 3, "bad_version": 1, "bad_field": 1})
    assert len(caplog.records) == 5 and endpoint in caplog.records[0].getMessage()


def test_router_counts_garbage_from_a_raw_dealer(ctx: Context) -> None:
    router = RouterSocket(ctx)
    raw = raw_socket(ctx, zmq.DEALER, router.bind_endpoint("127.0.0.1", 0))
    raw.send(b"\xc1")  # never-used msgpack byte
    raw.send_multipart([b"a", b"b"])
    raw.send(encode(Shutdown(reason="ok")))
    received = router.recv(timeout_s=2.0)
    assert received is not None and isinstance(received[1], Shutdown)
    assert router.rejected == Counter({"malformed": 2})


def test_keyed_sockets_reject_unsigned_and_wrongly_signed_frames(ctx: Context) -> None:
    pull = PullSocket(ctx, key=KEY)
    endpoint = pull.bind_endpoint("127.0.0.1", 0)
    raw = raw_socket(ctx, zmq.PUSH, endpoint)
    raw.send(encode(Shutdown(reason="unsigned")))
    raw.send(encode(Shutdown(reason="forged"), b"not the shared key!"))
    raw.send(encode(Shutdown(reason="signed"), KEY))  # same connection: arrives after the two bad ones
    got = pull.recv(timeout_s=2.0)
    assert isinstance(got, Shutdown) and got.reason == "signed"
    assert pull.rejected == Counter({"missing_mac": 1, "bad_mac": 1})


def test_recv_timeout_returns_none(ctx: Context) -> None:
    pull = PullSocket(ctx)
    pull.bind_endpoint("127.0.0.1", 0)
    start = time.monotonic()
    assert pull.recv(timeout_s=0.2) is None
    waited = time.monotonic() - start
    assert 0.19 <= waited < 1.0


def test_recv_keeps_waiting_after_bad_frames_but_not_past_its_timeout(ctx: Context) -> None:
    pull = PullSocket(ctx)
    raw = raw_socket(ctx, zmq.PUSH, pull.bind_endpoint("127.0.0.1", 0))
    raw.send(encode(Shutdown(reason="connected")))
    assert pull.recv(timeout_s=2.0) is not None
    raw.send(b"bad")
    start = time.monotonic()
    assert pull.recv(timeout_s=0.2) is None
    assert 0.19 <= time.monotonic() - start < 1.0
    assert pull.rejected == Counter({"malformed": 1})


def test_push_timeout_names_the_endpoint(ctx: Context, tmp_path: Path) -> None:
    # Nobody binds this endpoint: with hwm=1 the pipe holds one message, then send blocks.
    endpoint = f"ipc://{tmp_path / 'nobody.sock'}"
    push = PushSocket(ctx, endpoint, hwm=1)
    start = time.monotonic()
    with pytest.raises(TransportTimeout, match=f"send of shutdown to {endpoint} timed out after 0.1 s"):
        for _ in range(5):
            push.send(Shutdown(reason="x"), timeout_s=0.1)
    assert time.monotonic() - start < 1.0


def test_push_blocks_when_the_receiver_does_not_read(ctx: Context) -> None:
    pull = PullSocket(ctx, hwm=1)
    push = PushSocket(ctx, pull.bind_endpoint("127.0.0.1", 0), hwm=1)
    big = Shutdown(reason="x" * 500_000)  # a few of these fill both queues and the kernel buffers
    sent = 0
    with pytest.raises(TransportTimeout):
        for _ in range(200):
            push.send(big, timeout_s=0.1)
            sent += 1
    assert 1 <= sent < 200
    assert isinstance(pull.recv(timeout_s=2.0), Shutdown)  # the stream drains normally afterwards


def test_sender_refuses_frames_above_the_cap_and_receiver_survives_an_oversized_peer(ctx: Context) -> None:
    pull = PullSocket(ctx, max_bytes=1000)
    endpoint = pull.bind_endpoint("127.0.0.1", 0)
    push = PushSocket(ctx, endpoint, max_bytes=1000)
    with pytest.raises(ProtocolError) as info:
        push.send(Shutdown(reason="x" * 2000), timeout_s=1.0)
    assert info.value.reason == "oversized"
    # A raw peer that ignores the cap: up to twice the cap the frame is received, rejected and counted ...
    raw = raw_socket(ctx, zmq.PUSH, endpoint)
    raw.send(b"x" * 1500)
    assert pull.recv(timeout_s=0.3) is None
    assert pull.rejected["oversized"] == 1
    # ... above that ZeroMQ disconnects the peer before the frame is in memory; it reconnects and what it sends
    # afterwards arrives.
    raw.send(b"x" * 2001)
    assert pull.recv(timeout_s=0.3) is None
    raw.send(encode(Shutdown(reason="small")))
    got = pull.recv(timeout_s=3.0)
    assert isinstance(got, Shutdown) and got.reason == "small"
    assert pull.rejected["oversized"] == 1


def test_bound_sockets_count_connections_that_fail_the_handshake(ctx: Context) -> None:
    router = RouterSocket(ctx)
    host, port = router.bind_endpoint("127.0.0.1", 0).removeprefix("tcp://").rsplit(":", 1)
    # (Raw bytes that happen to parse as ZMTP 1.0 frames instead reach decode and count as malformed.)
    for payload in (b"GET / HTTP/1.0\r\n\r\n", b"\xff" + bytes(8) + b"\x7f" + b"junk" * 10, b""):
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(payload)
            time.sleep(0.1)
    deadline = time.monotonic() + 5
    while router.rejected["handshake"] < 3 and time.monotonic() < deadline:
        router.recv(timeout_s=0.1)
    assert router.rejected["handshake"] == 3
    dealer = DealerSocket(ctx, router.endpoint, b"sampler-0")  # the socket still serves real peers
    dealer.send(Hello(sampler_id=0, pid=1, hostname="h"), timeout_s=1.0)
    got = router.recv(timeout_s=3.0)
    assert got is not None and isinstance(got[1], Hello)
    router.close()
    router.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "*", "eth0", "node-7.cluster", "::"])
def test_non_loopback_bind_without_key_is_refused(ctx: Context, host: str) -> None:
    with pytest.raises(ValueError, match=rf"binds to {host}.*requires a shared key \(cluster.shared_key_file"):
        PullSocket(ctx).bind_endpoint(host, 0)
    with pytest.raises(ValueError, match="requires a shared key"):
        RouterSocket(ctx).bind_endpoint(host, 5555)


def test_loopback_detection() -> None:
    assert all(is_loopback(h) for h in ["127.0.0.1", "127.3.4.5", "::1", "localhost"])
    assert not any(is_loopback(h) for h in ["0.0.0.0", "128.0.0.1", "::", "*", "localhost.example", ""])


def test_bad_arguments_are_value_errors(ctx: Context) -> None:
    with pytest.raises(ValueError, match="port: 70000 not allowed"):
        PullSocket(ctx).bind_endpoint("127.0.0.1", 70000)
    with pytest.raises(ValueError, match="endpoint: 'udp://x:1' not allowed"):
        PushSocket(ctx, "udp://x:1")
    with pytest.raises(ValueError, match="identity"):
        DealerSocket(ctx, "tcp://127.0.0.1:1", b"\x00abc")
    with pytest.raises(ValueError, match="hwm: 0 not allowed"):
        PullSocket(ctx, hwm=0)


def test_load_shared_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(SHARED_KEY_ENV, raising=False)
    assert load_shared_key(None) is None
    path = tmp_path / "key"
    path.write_bytes(KEY + b"\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert load_shared_key(str(path)) == KEY  # trailing newline stripped
    assert "readable by group or others" in caplog.text and KEY.decode() not in caplog.text
    monkeypatch.setenv(SHARED_KEY_ENV, "an environment key of 32 bytes..")
    assert load_shared_key(None) == b"an environment key of 32 bytes.."
    assert load_shared_key(str(path)) == KEY  # the file wins over the environment
    monkeypatch.setenv(SHARED_KEY_ENV, "short")
    with pytest.raises(ValueError, match=f"{SHARED_KEY_ENV}: shared key has 5 bytes, at least 16"):
        load_shared_key(None)
    with pytest.raises(ValueError, match=r"cluster.shared_key_file: cannot read .*missing"):
        load_shared_key(str(tmp_path / "missing"))


def test_keyed_socket_may_bind_beyond_loopback_rule_and_close_is_idempotent(ctx: Context) -> None:
    with PullSocket(ctx, key=KEY) as pull:
        assert pull.bind_endpoint("127.0.0.1", 0).startswith("tcp://127.0.0.1:")
    pull.close()  # already closed by the context manager: no error
    with pytest.raises(zmq.ZMQError):
        pull.recv(timeout_s=0.0)


def test_context_close_closes_its_sockets() -> None:
    context = Context()
    pull = PullSocket(context)
    pull.bind_endpoint("127.0.0.1", 0)
    push = PushSocket(context, "tcp://127.0.0.1:1")
    start = time.monotonic()
    context.close()
    assert time.monotonic() - start < 2.0
    assert pull._sock.closed and push._sock.closed and context.zmq.closed


def test_context_io_threads_run_on_the_cores_asked_for() -> None:
    last = max(os.sched_getaffinity(0))
    with Context(io_cpus={last}) as context:
        PushSocket(context, "tcp://127.0.0.1:1")  # the first socket starts the I/O thread
        deadline = time.monotonic() + 5
        while not (io := threads_named("ZMQbg/IO")) and time.monotonic() < deadline:
            time.sleep(0.01)  # the thread names itself once it runs
        assert io and all(task_cpus(tid) == {last} for tid in io), [task_cpus(tid) for tid in io]
