"""Typed ZeroMQ sockets that speak the protocol (frames made by ``encode``, checked by ``decode``).

```
  sampler                                         learner rank 0
  PushSocket (connect) --RolloutGroup, ...-->     PullSocket (bind)     blocks at the HWM: backpressure
  DealerSocket (connect, identity) <-------->     RouterSocket (bind)   work requests and answers
```
Sends wait at most ``timeout_s`` for room below the high-water mark, then raise ``TransportTimeout``
naming the endpoint. Receives wait at most ``timeout_s`` and return None when nothing valid came: a bad
frame (undecodable, unsigned or wrongly signed, multi-part, empty) is dropped, counted in
on. A frame above the size cap is rejected as ``oversized`` by ``decode``; one above ``HARD_CAP_FACTOR`` times
the cap never reaches memory: ZeroMQ cuts that peer's connection (``MAXMSGSIZE``; the peer may reconnect).
Bound sockets also count connections that fail ZeroMQ's handshake (raw TCP garbage, port scans) under
``rejected["handshake"]``, read from a socket monitor on every receive.

Sockets bind to loopback unless given a shared key: traffic between machines must be signed. A socket
belongs to one thread (ZeroMQ sockets are not thread-safe).
"""

import ipaddress
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import zmq
from zmq.utils.monitor import recv_monitor_message

from speed_async.protocol import DEFAULT_MAX_BYTES, Message, ProtocolError, decode, encode

logger = logging.getLogger(__name__)

DEFAULT_HWM = 64
"""Default send/receive high-water mark, in messages."""
LINGER_MS = 200
"""How long a closing socket may keep trying to deliver queued messages."""
LOG_FIRST_REJECTIONS = 10
"""Rejected frames logged at WARNING per socket; later ones are logged at DEBUG."""
HARD_CAP_FACTOR = 2
"""ZeroMQ drops (and disconnects) messages above this many times ``max_bytes``; between 1x and this they are
received and rejected (counted) as ``oversized``."""
HANDSHAKE = "handshake"
"""Key of ``rejected`` counting connections that failed ZeroMQ's handshake (bound sockets)."""
_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
SHARED_KEY_ENV = "SPEED_ASYNC_SHARED_KEY"
MIN_KEY_BYTES = 16

T = TypeVar("T")


class TransportError(RuntimeError):
    """A socket operation that failed; the message names the endpoint."""


class TransportTimeout(TransportError, TimeoutError):
    """A send that found no room below the high-water mark (or no peer) within its timeout."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); any other name counts as remote."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_shared_key(path: str | None) -> bytes | None:
    """The shared key from the file at ``path``, else from env ``SPEED_ASYNC_SHARED_KEY``, else None.

    Surrounding whitespace is stripped; a key shorter than 16 bytes is refused. The key is never logged.
    """
    if path is not None:
        try:
            key = Path(path).read_bytes().strip()
            mode = os.stat(path).st_mode
        except OSError as e:
            raise ValueError(f"cluster.shared_key_file: cannot read {path!r} ({e.strerror})") from None
        source = f"cluster.shared_key_file {path!r}"
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("%s is readable by group or others; consider chmod 600", source)
    else:
        value = os.environ.get(SHARED_KEY_ENV)
        if value is None:
            return None
        key = value.strip().encode()
        source = f"environment variable {SHARED_KEY_ENV}"
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{source}: shared key has {len(key)} bytes, at least {MIN_KEY_BYTES} are required")
    return key


class Context:
    """Owns one ZeroMQ context; ``close`` closes every socket made with it, then the context.

    ``io_cpus``: the cores its I/O threads run on (default: the process's); a sampler keeps them off its engine's
    core (see `speed_async.sampler.scoring`)."""

    def __init__(self, io_cpus: set[int] | None = None) -> None:
        self.zmq = zmq.Context()
        for cpu in sorted(io_cpus or ()):
            self.zmq.set(zmq.THREAD_AFFINITY_CPU_ADD, cpu)  # before the first socket starts the I/O thread

    def close(self) -> None:
        """Close all sockets of this context (each lingers at most ``LINGER_MS``) and terminate it."""
        self.zmq.destroy(linger=LINGER_MS)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _Socket:
    """Common part: options, frame size cap, key, send with a timeout, validating receive loop."""

    def __init__(self, ctx: Context, kind: int, *, key: bytes | None, hwm: int, max_bytes: int) -> None:
        if hwm < 1:
            raise ValueError(f"hwm: {hwm} not allowed (allowed: >= 1)")
        self._sock = ctx.zmq.socket(kind)
        self._sock.setsockopt(zmq.LINGER, LINGER_MS)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt(zmq.MAXMSGSIZE, HARD_CAP_FACTOR * max_bytes)
        self.key = key
        self.max_bytes = max_bytes
        self.endpoint = ""
        self.rejected: Counter[str] = Counter()

    def close(self) -> None:
        """Close the socket (idempotent); queued outgoing messages get ``LINGER_MS`` to leave."""
        if not self._sock.closed:
            self._sock.close(linger=LINGER_MS)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _connect(self, endpoint: str) -> None:
        if not endpoint.startswith(("tcp://", "ipc://")):
            raise ValueError(f"endpoint: {endpoint!r} not allowed (allowed: tcp://host:port or ipc://path)")
        if endpoint.startswith("tcp://["):
            self._sock.setsockopt(zmq.IPV6, 1)
        self._sock.connect(endpoint)
        self.endpoint = endpoint

    def _frame(self, msg: Message) -> bytes:
        frame = encode(msg, self.key)
        if len(frame) > self.max_bytes:
            raise ProtocolError(
                "oversized", f"{msg.TAG} frame of {len(frame)} bytes exceeds the cap of {self.max_bytes}"
            )
        return frame

    def _send(self, parts: list[bytes], what: str, timeout_s: float) -> None:
        self._sock.setsockopt(zmq.SNDTIMEO, max(0, round(timeout_s * 1000)))
        try:
            self._sock.send_multipart(parts)
        except zmq.Again:
            raise TransportTimeout(
                f"send of {what} to {self.endpoint} timed out after {timeout_s} s "
                "(high-water mark reached or no peer connected)"
            ) from None

    def _recv(self, timeout_s: float, parse: Callable[[list[bytes]], T]) -> T | None:
        self._poll_monitor()
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = max(0, round((deadline - time.monotonic()) * 1000))
            if not self._sock.poll(remaining_ms, zmq.POLLIN):
                return None
            parts = self._sock.recv_multipart(zmq.NOBLOCK)
            try:
                return parse(parts)
            except ProtocolError as e:
                self._reject(e)

    def _poll_monitor(self) -> None:
        """Count handshake failures seen by this socket's monitor (bound sockets only)."""

    def _decode_single(self, parts: list[bytes]) -> Message:
        if len(parts) != 1:
            raise ProtocolError("malformed", f"expected a single-part message, got {len(parts)} parts")
        return decode(parts[0], key=self.key, max_bytes=self.max_bytes)

    def _reject(self, error: ProtocolError) -> None:
        self.rejected[error.reason] += 1
        total = sum(self.rejected.values())
        level = logging.WARNING if total <= LOG_FIRST_REJECTIONS else logging.DEBUG
        logger.log(level, "%s: dropped a frame (%s); %d dropped on this socket so far", self.endpoint, error, total)


class _BoundSocket(_Socket):
    """Binding for receiving sockets: tcp on loopback by default, a shared key for anything else."""

    _monitor: zmq.Socket | None = None

    def _poll_monitor(self) -> None:
        if self._monitor is None:
            return
        while True:
            try:
                recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            self.rejected[HANDSHAKE] += 1
            total = sum(self.rejected.values())
            level = logging.WARNING if total <= LOG_FIRST_REJECTIONS else logging.DEBUG
            logger.log(level, "%s: a connection failed the ZeroMQ handshake; %d dropped so far", self.endpoint, total)

    def close(self) -> None:
        """Close the monitor, then the socket (idempotent)."""
        if self._monitor is not None and not self._sock.closed:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        super().close()

    def bind_endpoint(self, host: str, port: int) -> str:
        """Bind to ``tcp://host:port`` (port 0: a free port) and return the real endpoint.

        A host that is not loopback requires the socket to have a shared key.
        """
        if not 0 <= port <= 65535:
            raise ValueError(f"port: {port} not allowed (allowed: 0 .. 65535, 0 = pick a free port)")
        if self.key is None and not is_loopback(host):
            raise ValueError(
                f"socket binds to {host}, which is not loopback: that requires a shared key "
                f"(cluster.shared_key_file or {SHARED_KEY_ENV}) so that remote peers are authenticated"
            )
        address = host
        if ":" in host:
            self._sock.setsockopt(zmq.IPV6, 1)
            address = f"[{host}]"
        return self._bind(f"tcp://{address}:{port or '*'}")

    def bind_ipc(self, path: str) -> str:
        """Bind to the Unix socket ``ipc://path`` (local only, allowed without a key); return the endpoint."""
        return self._bind(f"ipc://{path}")

    def _bind(self, address: str) -> str:
        try:
            self._sock.bind(address)
        except zmq.ZMQError as e:
            raise TransportError(f"cannot bind {address}: {e}") from None
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self._monitor is None:
            self._monitor = self._sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        return self.endpoint


class PushSocket(_Socket):
    """Sending end of a stream (sampler -> learner); connects to a ``PullSocket``."""

    def __init__(
        self,
        ctx: Context,
        endpoint: str,
        *,
        key: bytes | None = None,
        hwm: int = DEFAULT_HWM,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        super().__init__(ctx, zmq.PUSH, key=key, hwm=hwm, max_bytes=max_bytes)
        self._connect(endpoint)

    def send(self, msg: Message, timeout_s: float) -> None:
        """Queue ``msg``; raise ``TransportTimeout`` if the high-water mark blocks it longer than ``timeout_s``."""
        self._send([self._frame(msg)], msg.TAG, timeout_s)


class PullSocket(_BoundSocket):
    """Receiving end of a stream; bind with ``bind_endpoint`` or ``bind_ipc``."""

    def __init__(
        self,
        ctx: Context,
        *,
        key: bytes | None = None,
        hwm: int = DEFAULT_HWM,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        super().__init__(ctx, zmq.PULL, key=key, hwm=hwm, max_bytes=max_bytes)

    def recv(self, timeout_s: float) -> Message | None:
        """The next valid message, or None if none arrives within ``timeout_s``."""
        return self._recv(timeout_s, self._decode_single)


class RouterSocket(_BoundSocket):
    """Server end of request/reply (the dispatcher); peers are told apart by their identity."""

    def __init__(
        self,
        ctx: Context,
        *,
        key: bytes | None = None,
        hwm: int = DEFAULT_HWM,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        super().__init__(ctx, zmq.ROUTER, key=key, hwm=hwm, max_bytes=max_bytes)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)

    def recv(self, timeout_s: float) -> tuple[bytes, Message] | None:
        """The next valid message with its sender's identity, or None if none arrives within ``timeout_s``."""
        return self._recv(timeout_s, self._parse)

    def send_to(self, identity: bytes, msg: Message, timeout_s: float = 1.0) -> None:
        """Send ``msg`` to the peer ``identity``; ``TransportError`` if no such peer is connected."""
        try:
            self._send([identity, self._frame(msg)], f"{msg.TAG} for {identity!r}", timeout_s)
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            raise TransportError(f"no peer with identity {identity!r} is connected to {self.endpoint}") from None

    def _parse(self, parts: list[bytes]) -> tuple[bytes, Message]:
        identity, *rest = parts
        return identity, self._decode_single(rest)


class DealerSocket(_Socket):
    """Client end of request/reply (a sampler); connects with a fixed ``identity``."""

    def __init__(
        self,
        ctx: Context,
        endpoint: str,
        identity: bytes,
        *,
        key: bytes | None = None,
        hwm: int = DEFAULT_HWM,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if not identity or identity[0] == 0 or len(identity) > 255:
            raise ValueError(f"identity: {identity!r} not allowed (allowed: 1-255 bytes, not starting with 0x00)")
        super().__init__(ctx, zmq.DEALER, key=key, hwm=hwm, max_bytes=max_bytes)
        self._sock.setsockopt(zmq.ROUTING_ID, identity)
        self.identity = identity
        self._connect(endpoint)

    def send(self, msg: Message, timeout_s: float) -> None:
        """Send ``msg`` to the router; ``TransportTimeout`` if it blocks longer than ``timeout_s``."""
        self._send([self._frame(msg)], msg.TAG, timeout_s)

    def recv(self, timeout_s: float) -> Message | None:
        """The next valid message from the router, or None if none arrives within ``timeout_s``."""
        return self._recv(timeout_s, self._decode_single)
