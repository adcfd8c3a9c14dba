"""The wire protocol: typed messages, msgpack frames, validation and optional HMAC authentication.

No torch, no vllm (a test walks the imports). ``encode`` / ``decode`` are the only way bytes become
messages and back; see ``codec`` for the frame layout and ``schema`` for how fields are declared.
"""

from speed_async.protocol.codec import DEFAULT_MAX_BYTES, decode, encode
from speed_async.protocol.messages import (
    SAMPLER_ACTIVITIES,
    ContinueDecision,
    EvalAssignment,
    EvalResult,
    GroupDropped,
    Heartbeat,
    Hello,
    JoinSyncGroup,
    NoWork,
    Rejoin,
    Response,
    RewardStats,
    RolloutGroup,
    ScreenReport,
    Shutdown,
    SyncDone,
    SyncFailed,
    UpdateWeights,
    WorkAssignment,
    WorkItem,
    WorkRequest,
)
from speed_async.protocol.schema import MESSAGE_TYPES, REASONS, SCHEMA_VERSION, Message, ProtocolError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MESSAGE_TYPES",
    "REASONS",
    "SAMPLER_ACTIVITIES",
    "SCHEMA_VERSION",
    "ContinueDecision",
    "EvalAssignment",
    "EvalResult",
    "GroupDropped",
    "Heartbeat",
    "Hello",
    "JoinSyncGroup",
    "Message",
    "NoWork",
    "ProtocolError",
    "Rejoin",
    "Response",
    "RewardStats",
    "RolloutGroup",
    "ScreenReport",
    "Shutdown",
    "SyncDone",
    "SyncFailed",
    "UpdateWeights",
    "WorkAssignment",
    "WorkItem",
    "WorkRequest",
    "decode",
    "encode",
]
