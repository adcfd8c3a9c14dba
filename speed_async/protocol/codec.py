"""Frames on the wire: ``encode`` / ``decode`` with a size cap, tight msgpack limits and optional HMAC.

```
frame = msgpack [tag: str, schema_version: int, body: bin, mac: bin | nil]
body  = msgpack {field name: value}      arrays: {"dtype": "<i4", "shape": [n], "data": bin}
mac   = HMAC-SHA256(key, packb(tag) || packb(schema_version) || body)   (nil when sent without a key)
```
The msgpack encodings of tag and version are self-delimiting, so the MAC input is unambiguous.

``decode`` checks, in order: the size cap (before unpacking), the frame structure (unpacked with small
limits, no ext types), the MAC when a key is given, the schema version, the type tag, then the body
(unpacked with limits that bound every allocation a declared length can cause) field by field. Every
failure is a ``ProtocolError``; no other exception escapes for any input bytes.
"""

import hashlib
import hmac
from typing import Any

import msgpack

from speed_async.protocol import messages as _messages  # noqa: F401  (fills MESSAGE_TYPES)
from speed_async.protocol.schema import (
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    Message,
    ProtocolError,
    record_from_wire,
    record_to_wire,
    short_repr,
)

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
"""Largest frame accepted by default (a 64 x 32k-token group with log-probs is about 16 MiB)."""

MAX_TAG_LEN = 64
MAX_STR_LEN = 1024 * 1024
MAX_LIST_LEN = 4096
"""Most elements in any msgpack array of a body (responses per group, items per assignment); also bounds
the list the unpacker allocates up front for a declared length."""
MAX_MAP_LEN = 64


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"ext type {code} not allowed")


def _unpack(data: bytes, where: str, **limits: int) -> Any:
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, ext_hook=_no_ext, max_ext_len=0, use_list=True, **limits
        )
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError("malformed", f"{where}: not valid msgpack within limits ({short_repr(str(e))})") from None


def _mac(key: bytes, tag: str, version: int, body: bytes) -> bytes:
    header = msgpack.packb(tag) + msgpack.packb(version)
    return hmac.new(key, header + body, hashlib.sha256).digest()


def encode(msg: Message, key: bytes | None = None) -> bytes:
    """The frame of ``msg``, signed with HMAC-SHA256 when ``key`` is given."""
    if not isinstance(msg, Message):
        raise TypeError(f"encode: expected a protocol Message, got {type(msg).__qualname__}")
    body = msgpack.packb(record_to_wire(msg), use_bin_type=True)
    mac = None if key is None else _mac(key, msg.TAG, SCHEMA_VERSION, body)
    return msgpack.packb([msg.TAG, SCHEMA_VERSION, body, mac], use_bin_type=True)


def decode(frame: bytes, *, key: bytes | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """The validated message in ``frame``; raises ``ProtocolError`` (with ``.reason``) for anything else.

    With ``key``, a frame without a MAC or with a wrong one is rejected; without ``key`` a MAC is ignored.
    """
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise ProtocolError("malformed", f"frame is {type(frame).__qualname__}, expected bytes")
    if len(frame) > max_bytes:
        raise ProtocolError("oversized", f"frame of {len(frame)} bytes exceeds the cap of {max_bytes}")
    if len(frame) == 0:
        raise ProtocolError("malformed", "empty frame")
    outer = _unpack(frame, "frame", max_array_len=4, max_map_len=0, max_str_len=MAX_TAG_LEN, max_bin_len=len(frame))
    if not (isinstance(outer, list) and len(outer) == 4):
        raise ProtocolError("malformed", "frame: expected [tag, schema_version, body, mac]")
    tag, version, body, mac = outer
    if not (isinstance(tag, str) and type(version) is int and isinstance(body, bytes)):
        raise ProtocolError("malformed", "frame: expected [tag: str, schema_version: int, body: bin, mac]")
    if not (mac is None or isinstance(mac, bytes)):
        raise ProtocolError("malformed", f"frame for {short_repr(tag)}: mac must be bin or nil")
    if key is not None:
        if mac is None:
            raise ProtocolError("missing_mac", f"frame for {short_repr(tag)} is unsigned, a shared key is in use")
        if not hmac.compare_digest(mac, _mac(key, tag, version, body)):
            raise ProtocolError("bad_mac", f"frame for {short_repr(tag)}: MAC does not match the shared key")
    if version != SCHEMA_VERSION:
        raise ProtocolError(
            "bad_version",
            f"frame for {short_repr(tag)} has schema version {version}, expected {SCHEMA_VERSION}",
        )
    cls = MESSAGE_TYPES.get(tag)
    if cls is None:
        raise ProtocolError("unknown_type", f"unknown message type {short_repr(tag)}")
    fields = _unpack(
        body,
        cls.__name__,
        max_array_len=MAX_LIST_LEN,
        max_map_len=MAX_MAP_LEN,
        max_str_len=MAX_STR_LEN,
        max_bin_len=len(body),
    )
    if not isinstance(fields, dict):
        raise ProtocolError("malformed", f"{cls.__name__}: body must be a map of fields")
    return record_from_wire(cls, fields)
