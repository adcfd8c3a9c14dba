"""Wire protocol: round trips, the exact frame layout, validation, HMAC, and fuzzed frames."""

import hashlib
import hmac
import random
from typing import Any

import msgpack
import numpy as np
import pytest

from speed_async.protocol import (
    MESSAGE_TYPES,
    REASONS,
    SCHEMA_VERSION,
    ContinueDecision,
    EvalAssignment,
    EvalResult,
    GroupDropped,
    Heartbeat,
    Hello,
    JoinSyncGroup,
    Message,
    NoWork,
    ProtocolError,
    Rejoin,
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
    decode,
    encode,
)
from speed_async.protocol.schema import Array, Bool, Float, Int, Nested, Record, Str, StrList

KEY = b"0123456789abcdef0123456789abcdef"


def i32(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int32)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def work_item(prompt_id: int = 7, num_continue: int = 20) -> WorkItem:
    return WorkItem(
        prompt_id=prompt_id,
        epoch=1,
        data_source="dapo",
        prompt_token_ids=i32(11, 12, 13),
        ground_truth="42",
        num_screen=4,
        num_continue=num_continue,
        extra='{"numbers": [3, 7]}',
    )


def rollout_group(**overrides: Any) -> RolloutGroup:
    # 3 responses of lengths 2, 0, 3: tokens [5 6 | | 7 8 9]; the second was cut to nothing.
    fields: dict[str, Any] = dict(
        sampler_id=2,
        prompt_id=7,
        epoch=1,
        data_source="dapo",
        prompt_token_ids=i32(11, 12, 13),
        response_token_ids=i32(5, 6, 7, 8, 9),
        response_lengths=i32(2, 0, 3),
        response_logprobs=f32(-0.5, -1.0, -0.25, -2.0, -0.125),
        rewards=f32(1.0, 0.0, -0.5),
        scores=f32(1.0, 0.0, 0.0),
        finish_reasons=["stop", "length", "stop"],
        version_min=i32(3, 4, 4),
        version_max=i32(4, 4, 5),
        num_screen=2,
    )
    fields.update(overrides)
    return RolloutGroup(**fields)


def examples() -> dict[str, Message]:
    """One message of every type, with non-default values everywhere."""
    msgs: list[Message] = [
        Hello(sampler_id=3, pid=4242, hostname="node-1"),
        WorkRequest(sampler_id=3, version=5, max_prompts=8),
        WorkAssignment(items=[work_item(7), work_item(8, num_continue=0)], version=5),
        NoWork(retry_after_s=0.25, reason="staleness bound"),
        ScreenReport(sampler_id=3, prompt_id=7, epoch=1, version=5, rewards=f32(0, 1, 1, 0), qualified=True),
        ContinueDecision(prompt_id=7, epoch=1, go=True),
        rollout_group(),
        GroupDropped(sampler_id=3, prompt_id=9, epoch=1, version=5, reason="all_equal", rewards=f32(1, 1, 1, 1)),
        JoinSyncGroup(generation=2, master_addr="10.0.0.1", master_port=29500, world_size=3, rank=2, timeout_s=60.0),
        UpdateWeights(version=6, generation=2, num_buckets=4),
        SyncDone(sampler_id=3, version=6, seconds=1.5),
        Heartbeat(sampler_id=3, version=6, num_pending=17, state="generating", times=np.arange(7, dtype="<f8")),
        Shutdown(reason="done"),
        SyncFailed(sampler_id=3, generation=2, version=6, error="bucket 0 of 1 timed out"),
        Rejoin(reason="declared lost after 120 s of silence"),
        RewardStats(
            sampler_id=3,
            data_source="countdown",
            responses=10,
            failed_error=1,
            failed_invalid=2,
            failed_timeout=1,
            metric_names=["score", "valid"],
            metric_sums=np.array([4.0, 6.0], dtype="<f4"),
            metric_counts=np.array([10, 6], dtype="<i4"),
        ),
        EvalAssignment(items=[work_item(30, num_continue=0)], version=6),
        EvalResult(
            sampler_id=3,
            prompt_id=30,
            data_source="math500",
            version=6,
            scores=f32(1, 0),
            response_lengths=i32(9, 12),
            seconds=0.25,
        ),
    ]
    return {m.TAG: m for m in msgs}


def assert_same(a: Record, b: Record) -> None:
    assert type(a) is type(b)
    for name in type(a).SCHEMA:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray), name
            assert y.dtype == x.dtype and y.shape == x.shape, name
            np.testing.assert_array_equal(x, y, err_msg=name)
        elif isinstance(x, list) and x and isinstance(x[0], Record):
            assert len(x) == len(y), name
            for u, v in zip(x, y, strict=True):
                assert_same(u, v)
        else:
            assert x == y and type(x) is type(y), name


def frame(tag: str, body: Any, *, version: int = SCHEMA_VERSION, mac: Any = None) -> bytes:
    return msgpack.packb([tag, version, msgpack.packb(body), mac])


def wire_fields(msg: Message) -> dict[str, Any]:
    return msgpack.unpackb(msgpack.unpackb(encode(msg))[2])


def reason_of(data: bytes, **kwargs: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(data, **kwargs)
    return info.value.reason


# ---- round trips -----------------------------------------------------------------------------------


def test_examples_cover_every_message_type() -> None:
    assert set(examples()) == set(MESSAGE_TYPES)


@pytest.mark.parametrize("tag", sorted(MESSAGE_TYPES))
@pytest.mark.parametrize("key", [None, KEY])
def test_round_trip_every_message_type(tag: str, key: bytes | None) -> None:
    msg = examples()[tag]
    back = decode(encode(msg, key), key=key)
    assert_same(msg, back)


def test_decoded_arrays_are_numpy_views_with_wire_dtypes() -> None:
    back = decode(encode(rollout_group()))
    assert isinstance(back, RolloutGroup)
    assert back.response_token_ids.dtype.str == "<i4" and back.response_logprobs.dtype.str == "<f4"
    assert not back.response_token_ids.flags.writeable  # np.frombuffer over the received bytes
    assert isinstance(back.finish_reasons, list)


def test_exact_frame_layout_of_a_small_message() -> None:
    # body = fixmap(1) 0x81, fixstr(6) 0xa6 "reason", fixstr(1) 0xa1 "x"  -> 1 + 7 + 2 = 10 bytes
    body = b"\x81\xa6reason\xa1x"
    # frame = fixarray(4) 0x94, fixstr(8) 0xa8 "shutdown", the version as a positive fixint (5: 0x05),
    # bin8 0xc4 0x0a + body, nil 0xc0
    version = bytes([SCHEMA_VERSION])
    assert version == b"\x05"
    assert encode(Shutdown(reason="x")) == b"\x94\xa8shutdown" + version + b"\xc4\x0a" + body + b"\xc0"
    # mac = HMAC-SHA256(key, packb("shutdown") || packb(version) || body); bin8 0xc4 0x20 + 32 bytes
    mac = hmac.new(KEY, b"\xa8shutdown" + version + body, hashlib.sha256).digest()
    assert encode(Shutdown(reason="x"), KEY) == b"\x94\xa8shutdown" + version + b"\xc4\x0a" + body + b"\xc4\x20" + mac


def test_arrays_travel_as_little_endian_bytes_with_dtype_and_shape() -> None:
    fields = wire_fields(rollout_group())
    # lengths 2, 0, 3 as int32 little-endian: 02 00 00 00 | 00 00 00 00 | 03 00 00 00
    assert fields["response_lengths"] == {
        "dtype": "<i4",
        "shape": [3],
        "data": b"\x02\x00\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00",
    }
    # -0.5 as float32 is 0xbf000000 -> little-endian 00 00 00 bf
    assert fields["response_logprobs"]["data"][:4] == b"\x00\x00\x00\xbf"


def test_rollout_group_responses_and_group_version() -> None:
    group = rollout_group()
    responses = list(group.responses())
    # offsets from lengths 2, 0, 3: [0:2], [2:2], [2:5]
    assert [r.token_ids.tolist() for r in responses] == [[5, 6], [], [7, 8, 9]]
    assert [r.logprobs.tolist() for r in responses] == [[-0.5, -1.0], [], [-0.25, -2.0, -0.125]]
    assert [(r.reward, r.score, r.finish_reason) for r in responses] == [
        (1.0, 1.0, "stop"),
        (0.0, 0.0, "length"),
        (-0.5, 0.0, "stop"),
    ]
    assert [(r.version_min, r.version_max) for r in responses] == [(3, 4), (4, 4), (4, 5)]
    assert group.num_responses == 3
    assert group.group_version == 3  # min(version_min) = min(3, 4, 4)


# ---- validation at construction (a sender's bug fails at the sender) -------------------------------


@pytest.mark.parametrize(
    ("build", "where"),
    [
        (lambda: Hello(sampler_id=-1, pid=1, hostname="h"), "Hello.sampler_id"),
        (lambda: Hello(sampler_id=True, pid=1, hostname="h"), "Hello.sampler_id"),
        (lambda: Hello(sampler_id=np.int64(1), pid=1, hostname="h"), "Hello.sampler_id"),
        (lambda: Hello(sampler_id=2**63, pid=1, hostname="h"), "Hello.sampler_id"),
        (lambda: Hello(sampler_id=1, pid=1, hostname=b"h"), "Hello.hostname"),
        (lambda: WorkRequest(sampler_id=0, version=0, max_prompts=0), "WorkRequest.max_prompts"),
        (lambda: NoWork(retry_after_s=-0.1, reason=""), "NoWork.retry_after_s"),
        (lambda: NoWork(retry_after_s=float("nan"), reason=""), "NoWork.retry_after_s"),
        (lambda: NoWork(retry_after_s=float("inf"), reason=""), "NoWork.retry_after_s"),
        (lambda: WorkAssignment(items=[], version=0), "WorkAssignment.items"),
        (lambda: WorkAssignment(items=[Shutdown(reason="x")], version=0), "WorkAssignment.items"),
        (
            lambda: ScreenReport(sampler_id=0, prompt_id=0, epoch=0, version=0, rewards=f32(1), qualified=1),
            "ScreenReport.qualified",
        ),
        (
            lambda: ScreenReport(sampler_id=0, prompt_id=0, epoch=0, version=0, rewards=f32(), qualified=True),
            "ScreenReport.rewards",
        ),
        (
            lambda: JoinSyncGroup(generation=0, master_addr="a", master_port=1, world_size=2, rank=2, timeout_s=1),
            "JoinSyncGroup.rank",
        ),
        (
            lambda: JoinSyncGroup(generation=0, master_addr="a", master_port=0, world_size=2, rank=1, timeout_s=1),
            "JoinSyncGroup.master_port",
        ),
        (
            lambda: JoinSyncGroup(generation=0, master_addr="a", master_port=1, world_size=2, rank=1, timeout_s=0),
            "JoinSyncGroup.timeout_s",
        ),
        (lambda: rollout_group(prompt_token_ids=[11, 12]), "RolloutGroup.prompt_token_ids"),
        (lambda: rollout_group(prompt_token_ids=i32()), "RolloutGroup.prompt_token_ids"),
        (lambda: rollout_group(prompt_token_ids=i32(1, -2)), "RolloutGroup.prompt_token_ids"),
        (lambda: rollout_group(prompt_token_ids=np.array([1], np.int64)), "RolloutGroup.prompt_token_ids"),
        (lambda: rollout_group(prompt_token_ids=np.array([1], ">i4")), "RolloutGroup.prompt_token_ids"),
        (lambda: rollout_group(prompt_token_ids=np.ones((1, 2), np.int32)), "RolloutGroup.prompt_token_ids"),
        (lambda: rollout_group(rewards=f32(1, float("nan"), 0)), "RolloutGroup.rewards"),
        (lambda: rollout_group(finish_reasons=["stop", 1, "stop"]), "RolloutGroup.finish_reasons"),
        # cross-field rules
        (lambda: rollout_group(response_token_ids=i32(5, 6, 7, 8)), "RolloutGroup.response_token_ids"),
        (lambda: rollout_group(response_logprobs=f32(-1, -1, -1, -1)), "RolloutGroup.response_logprobs"),
        (lambda: rollout_group(rewards=f32(1, 0)), "RolloutGroup.rewards"),
        (lambda: rollout_group(scores=f32(1, 0, 0, 0)), "RolloutGroup.scores"),
        (lambda: rollout_group(finish_reasons=["stop"]), "RolloutGroup.finish_reasons"),
        (lambda: rollout_group(version_max=i32(4, 4)), "RolloutGroup.version_max"),
        (lambda: rollout_group(version_max=i32(4, 3, 5)), "RolloutGroup.version_min"),
        (lambda: rollout_group(num_screen=4), "RolloutGroup.num_screen"),
        (
            lambda: rollout_group(
                response_lengths=i32(),
                response_token_ids=i32(),
                response_logprobs=f32(),
                rewards=f32(),
                scores=f32(),
                finish_reasons=[],
                version_min=i32(),
                version_max=i32(),
            ),
            "RolloutGroup.response_lengths",
        ),
    ],
)
def test_invalid_messages_are_refused_at_construction(build: Any, where: str) -> None:
    with pytest.raises(ProtocolError) as info:
        build()
    assert info.value.reason == "bad_field"
    assert where in str(info.value)


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(TypeError, match="WorkItem"):
        encode(work_item())  # type: ignore[arg-type]


# ---- validation on decode ----------------------------------------------------------------------------


def test_decode_field_errors_name_type_and_field() -> None:
    good = wire_fields(examples()["hello"])
    cases = [
        ({k: v for k, v in good.items() if k != "pid"}, "Hello: missing field(s) pid"),
        ({**good, "extra": 1}, "Hello: unknown field(s) 'extra'"),
        ({**good, "pid": "1"}, "Hello.pid: expected int, got str"),
        ({**good, "pid": -1}, "Hello.pid: -1 out of range"),
        ({**good, "pid": True}, "Hello.pid: expected int, got bool"),
        ({**good, "pid": 1.0}, "Hello.pid: expected int, got float"),
    ]
    for body, text in cases:
        with pytest.raises(ProtocolError, match="bad_field") as info:
            decode(frame("hello", body))
        assert text in str(info.value)


def test_decode_array_errors() -> None:
    good = wire_fields(rollout_group())
    arr = good["rewards"]
    cases = [
        ({**arr, "dtype": "<f8", "data": arr["data"] * 2}, "dtype '<f8' not allowed (allowed: '<f4')"),
        ({**arr, "dtype": "|O"}, "dtype '|O' not allowed"),
        ({**arr, "shape": [4]}, "shape [4] of <f4 needs 16 bytes, data has 12"),
        ({**arr, "shape": [1, 3]}, "shape [1, 3] not allowed"),
        ({**arr, "shape": [-3]}, "shape [-3] not allowed"),
        ({**arr, "data": "abcdefghijkl"}, "data must be bin"),
        ({**arr, "extra": 1}, "expected an array map"),
        ([1.0, 0.0, -0.5], "expected an array map"),
    ]
    for value, text in cases:
        with pytest.raises(ProtocolError, match="bad_field") as info:
            decode(frame("rollout_group", {**good, "rewards": value}))
        assert "RolloutGroup.rewards: " + text in str(info.value)


def test_decode_checks_consistency_and_nested_items() -> None:
    fields = wire_fields(rollout_group())
    fields["num_screen"] = 9
    with pytest.raises(ProtocolError, match=r"RolloutGroup.num_screen: 9 > number of responses 3"):
        decode(frame("rollout_group", fields))
    fields = wire_fields(examples()["work_assignment"])
    fields["items"][1]["num_screen"] = 0
    with pytest.raises(ProtocolError, match=r"WorkAssignment.items: \[1\]: WorkItem.num_screen: 0 out of range"):
        decode(frame("work_assignment", fields))


def test_decode_int_fields_accepted_as_floats() -> None:
    fields = wire_fields(examples()["no_work"])
    fields["retry_after_s"] = 2  # a peer may pack a whole float as int
    back = decode(frame("no_work", fields))
    assert isinstance(back, NoWork) and back.retry_after_s == 2.0 and type(back.retry_after_s) is float


def test_frame_level_errors() -> None:
    body = wire_fields(examples()["shutdown"])
    assert reason_of(frame("shutdown", body, version=SCHEMA_VERSION + 1)) == "bad_version"
    assert reason_of(frame("shutdown", body, version=1)) == "bad_version", "version 1 had no EvalResult.seconds"
    assert reason_of(frame("shutdown", body, version=0)) == "bad_version"
    assert reason_of(frame("launch_missiles", body)) == "unknown_type"
    assert reason_of(msgpack.packb(["shutdown", SCHEMA_VERSION, msgpack.packb(body)])) == "malformed"
    assert reason_of(msgpack.packb(["shutdown", True, msgpack.packb(body), None])) == "malformed"
    assert reason_of(msgpack.packb(["shutdown", SCHEMA_VERSION, msgpack.packb(body), "mac"])) == "malformed"
    assert reason_of(msgpack.packb({"shutdown": 1})) == "malformed"
    assert reason_of(frame("shutdown", [1, 2])) == "malformed"
    assert reason_of(b"") == "malformed"
    assert reason_of("text") == "malformed"  # type: ignore[arg-type]
    good = encode(examples()["shutdown"])
    assert reason_of(good + b"\x00") == "malformed"  # trailing bytes
    assert reason_of(good, max_bytes=len(good) - 1) == "oversized"
    assert decode(good, max_bytes=len(good)).TAG == "shutdown"


def test_ext_types_and_invalid_utf8_are_malformed() -> None:
    body = wire_fields(examples()["shutdown"])
    ext = msgpack.ExtType(5, b"abcd")
    assert reason_of(frame("shutdown", {"reason": ext})) == "malformed"
    assert reason_of(msgpack.packb(["shutdown", SCHEMA_VERSION, msgpack.packb(body), ext])) == "malformed"
    # fixext4 with type -1 is a msgpack timestamp: an ext type too
    assert reason_of(frame("shutdown", {"reason": msgpack.Timestamp(1, 0)})) == "malformed"
    raw_body = b"\x81\xa6reason\xa2\xff\xfe"  # str of 2 invalid UTF-8 bytes
    assert reason_of(msgpack.packb(["shutdown", SCHEMA_VERSION, raw_body, None])) == "malformed"


def test_huge_declared_lengths_and_depth_bombs_are_malformed() -> None:
    def outer(body: bytes) -> bytes:
        return msgpack.packb(["shutdown", SCHEMA_VERSION, body, None])

    # array32 / map32 / str32 / bin32 headers declaring 2**32 - 1 elements or bytes, with no data behind
    for header in (b"\xdd", b"\xdf", b"\xdb", b"\xc6"):
        assert reason_of(header + b"\xff\xff\xff\xff") == "malformed"
        assert reason_of(outer(b"\x81\xa6reason" + header + b"\xff\xff\xff\xff")) == "malformed"
    # array16 of 65535 nested 1000 deep would pre-allocate 1000 lists of 64 Ki slots without limits
    assert reason_of(outer(b"\x81\xa6reason" + b"\xdc\xff\xff" * 1000)) == "malformed"
    # 100k nested 1-element arrays: deeper than the unpacker's stack
    assert reason_of(outer(b"\x81\xa6reason" + b"\x91" * 100_000 + b"\xc0")) == "malformed"
    assert reason_of(b"\x91" * 100_000 + b"\xc0") == "malformed"


# ---- HMAC ------------------------------------------------------------------------------------------------


def test_hmac_accepts_the_right_key_and_rejects_the_rest() -> None:
    msg = examples()["rollout_group"]
    signed = encode(msg, KEY)
    assert_same(decode(signed, key=KEY), msg)
    assert reason_of(signed, key=b"another key of 32 bytes........") == "bad_mac"
    assert reason_of(encode(msg), key=KEY) == "missing_mac"
    # A receiver without a key ignores the MAC.
    assert_same(decode(signed), msg)
    # Replacing the body (e.g. rewards) keeps a syntactically valid frame but breaks the MAC.
    tag, version, body, mac = msgpack.unpackb(signed)
    forged = wire_fields(rollout_group(rewards=f32(1, 1, 1)))
    assert reason_of(msgpack.packb([tag, version, msgpack.packb(forged), mac]), key=KEY) == "bad_mac"
    # The tag and version are covered too.
    assert reason_of(msgpack.packb([tag, version + 1, body, mac]), key=KEY) == "bad_mac"
    assert reason_of(msgpack.packb(["shutdown", version, body, mac]), key=KEY) == "bad_mac"


# ---- fuzzing -----------------------------------------------------------------------------------------


# Values that are invalid for every field of a spec kind (all example arrays are non-empty).
INVALID: dict[type, list[Any]] = {
    Int: [None, True, "1", 1.5, -1, 2**64 - 1, [], {}],
    Float: [None, True, "1", float("nan"), float("inf"), -1.0, []],
    Str: [None, 1, b"x", [], {}],
    Bool: [None, 0, 1, "true", []],
    StrList: [None, "stop", [1], {}, b""],
    Nested: [None, [], [1], [{}], {}],
    Array: [None, [1, 2], b"\x00" * 4, {}, "x"],
}
INVALID_ARRAY_PARTS: dict[str, list[Any]] = {
    "dtype": [None, 1, "<f8", "<i8", ">i4", "|O", "x" * 100],
    "shape": [None, [], [-1], [1, 2], "3", [2**40], [True]],
    "data": [None, "abcd", b"", b"\x00" * 3, []],
}


def _mutated_body(rng: random.Random, tag: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The field map of ``tag`` with one field made invalid, dropped, or one unknown field added."""
    body = dict(fields)
    name = rng.choice(sorted(body))
    spec = MESSAGE_TYPES[tag].SCHEMA[name]
    action = rng.randrange(4)
    if action == 0:
        del body[name]
    elif action == 1:
        body["zz_" + name] = rng.choice(INVALID[Int])
    elif action == 2 and isinstance(spec, Array):
        part = rng.choice(sorted(INVALID_ARRAY_PARTS))
        body[name] = {**body[name], part: rng.choice(INVALID_ARRAY_PARTS[part])}
    else:
        body[name] = rng.choice(INVALID[type(spec)])
    return body


def test_fuzzed_frames_only_ever_raise_protocol_error() -> None:
    rng = random.Random(20261125)
    valid = {tag: encode(msg) for tag, msg in examples().items()}
    signed = {tag: encode(msg, KEY) for tag, msg in examples().items()}
    fields = {tag: wire_fields(msg) for tag, msg in examples().items()}
    tags = sorted(valid)
    reasons: set[str] = set()
    decoded_ok = 0
    for case in range(4000):
        kind = case % 8
        tag = rng.choice(tags)
        key = None
        if kind == 0:  # random bytes
            data = rng.randbytes(rng.randrange(0, 200))
        elif kind == 1:  # bit flips of a valid frame: may still be a valid message
            buf = bytearray(valid[tag])
            for _ in range(rng.randrange(1, 4)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            data = bytes(buf)
        elif kind == 2:  # bit flip of a signed frame, checked with the key: never accepted
            buf = bytearray(signed[tag])
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            data, key = bytes(buf), KEY
        elif kind == 3:  # truncation
            data = valid[tag][: rng.randrange(len(valid[tag]))]
        elif kind == 4:  # wrong types, missing and extra fields, corrupted arrays
            data = frame(tag, _mutated_body(rng, tag, fields[tag]))
        elif kind == 5:  # wrong schema version / unknown tag / random tag
            choice = rng.randrange(3)
            version = rng.choice([0, SCHEMA_VERSION + 1, -1, 2**40]) if choice == 0 else SCHEMA_VERSION
            bad_tag = tag if choice == 0 else rng.choice(["", "hello2", "x" * 100, "WorkItem"])
            data = frame(bad_tag, fields[tag], version=version)
        elif kind == 6:  # random bytes spliced into a valid frame
            buf = valid[tag]
            at = rng.randrange(len(buf))
            data = buf[:at] + rng.randbytes(rng.randrange(1, 16)) + buf[at + rng.randrange(0, 8) :]
        else:  # nested containers of random depth in a field, or oversized
            if rng.random() < 0.5:
                data = frame(tag, {**fields[tag], rng.choice(sorted(fields[tag])): [[[[[[]]]]]] * rng.randrange(50)})
            else:
                data = valid[tag]
                reasons.add(reason_of(data, max_bytes=len(data) - rng.randrange(1, len(data))))
                continue
        try:
            msg = decode(data, key=key)
        except ProtocolError as e:
            assert e.reason in REASONS
            reasons.add(e.reason)
            continue
        assert kind in (1, 6), f"case {case} (kind {kind}) decoded: {msg!r}"
        assert isinstance(msg, Message)
        decoded_ok += 1
    # Every reason but missing_mac is reachable here (that one has its own test).
    assert reasons == REASONS - {"missing_mac"}
    assert decoded_ok > 0  # bit flips inside array bytes or string values still decode
