"""ZeroMQ transport: typed sockets that send and receive validated protocol messages."""

from speed_async.transport.sockets import (
    DEFAULT_HWM,
    HANDSHAKE,
    HARD_CAP_FACTOR,
    LINGER_MS,
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

__all__ = [
    "DEFAULT_HWM",
    "HANDSHAKE",
    "HARD_CAP_FACTOR",
    "LINGER_MS",
    "SHARED_KEY_ENV",
    "Context",
    "DealerSocket",
    "PullSocket",
    "PushSocket",
    "RouterSocket",
    "TransportError",
    "TransportTimeout",
    "is_loopback",
    "load_shared_key",
]
