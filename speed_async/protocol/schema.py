"""Declarative wire schemas: field specs, generic validation and the message registry.

A record is a frozen dataclass whose every field is annotated ``Annotated[<python type>, <spec>]``.
The spec says what the field may hold (an int range, a finite float range, a string, a bool, a 1-D
array of one dtype, a list of strings, a list of nested records) and how it travels: arrays become
``{"dtype": "<i4", "shape": [n], "data": <little-endian bytes>}`` maps and come back as read-only
``np.frombuffer`` views. Adding a field to a message is one annotated line.

Validation runs in ``__post_init__``, so every record that exists is valid, whether it was built by a
sender (a sender's bug fails at the sender) or decoded from the wire. Cross-field rules live in a
record's ``_check_consistency``.

This module imports neither torch nor vllm.
"""

import dataclasses
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar, dataclass_transform, get_type_hints

import numpy as np

SCHEMA_VERSION = 5
"""Version of the wire format and of every message schema; a frame with another version is rejected."""

REASONS = frozenset({"oversized", "malformed", "unknown_type", "bad_version", "bad_field", "bad_mac", "missing_mac"})
"""The machine-readable values of ``ProtocolError.reason``."""

INT64_MAX = 2**63 - 1
_SHORT_REPR = 48


class ProtocolError(ValueError):
    """A frame or message that breaks the protocol.

    ``reason`` is one of ``REASONS`` (for counters and tests); ``detail`` names the message type and
    field where known.
    """

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class FieldProblem(Exception):
    """What is wrong with one field value; the caller turns it into a ``ProtocolError`` naming the field."""


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters, safe to put into an error message about untrusted input."""
    text = repr(value)
    return text if len(text) <= _SHORT_REPR else text[: _SHORT_REPR - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    return type(value).__qualname__


def _range_text(ge: float | None, gt: float | None, le: float | None) -> str:
    parts = [f">= {ge}" if ge is not None else "", f"> {gt}" if gt is not None else ""]
    parts.append(f"<= {le}" if le is not None else "")
    return " and ".join(p for p in parts if p) or "any"


class FieldSpec:
    """How one field is checked and carried. Subclasses override ``check`` and, if the wire form differs
    from the Python value, ``to_wire`` / ``from_wire``."""

    def check(self, value: Any) -> None:
        """Raise ``FieldProblem`` if ``value`` is not allowed in this field."""
        raise NotImplementedError

    def to_wire(self, value: Any) -> Any:
        """The msgpack-ready form of a valid value."""
        return value

    def from_wire(self, raw: Any) -> Any:
        """The Python value for an unpacked wire value (``check`` runs afterwards, in ``__post_init__``)."""
        return raw


@dataclasses.dataclass(frozen=True)
class Int(FieldSpec):
    """A Python int (not a bool, not a numpy scalar) in ``[ge, le]``; ``le`` defaults to the int64 maximum."""

    ge: int = 0
    le: int = INT64_MAX

    def check(self, value: Any) -> None:
        if not _is_int(value):
            raise FieldProblem(f"expected int, got {_type_name(value)}")
        if not self.ge <= value <= self.le:
            raise FieldProblem(f"{short_repr(value)} out of range (allowed: {_range_text(self.ge, None, self.le)})")


@dataclasses.dataclass(frozen=True)
class Float(FieldSpec):
    """A finite number (int accepted, carried as float) with optional bounds ``>= ge`` / ``> gt``."""

    ge: float | None = None
    gt: float | None = None

    def check(self, value: Any) -> None:
        if not (isinstance(value, float) or _is_int(value)):
            raise FieldProblem(f"expected float, got {_type_name(value)}")
        in_range = (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
        if not (math.isfinite(value) and in_range):
            raise FieldProblem(f"{value!r} not allowed (allowed: finite, {_range_text(self.ge, self.gt, None)})")

    def to_wire(self, value: Any) -> Any:
        return float(value)

    def from_wire(self, raw: Any) -> Any:
        return float(raw) if _is_int(raw) else raw


@dataclasses.dataclass(frozen=True)
class Str(FieldSpec):
    """A str (its wire length is capped by the decoder's unpack limits)."""

    def check(self, value: Any) -> None:
        if not isinstance(value, str):
            raise FieldProblem(f"expected str, got {_type_name(value)}")


@dataclasses.dataclass(frozen=True)
class Bool(FieldSpec):
    """A bool (an int is not accepted)."""

    def check(self, value: Any) -> None:
        if not isinstance(value, bool):
            raise FieldProblem(f"expected bool, got {_type_name(value)}")


@dataclasses.dataclass(frozen=True)
class Array(FieldSpec):
    """A 1-D numpy array of exactly ``dtype`` (a little-endian numpy dtype string such as ``"<i4"``).

    ``min_len``: fewest elements; ``ge``: smallest allowed element; ``finite``: no NaN or inf.
    """

    dtype: str
    min_len: int = 0
    ge: float | None = None
    finite: bool = False

    def __post_init__(self) -> None:
        assert self.dtype.startswith("<") and np.dtype(self.dtype).str == self.dtype, self.dtype

    def check(self, value: Any) -> None:
        if not isinstance(value, np.ndarray):
            raise FieldProblem(f"expected numpy array of {self.dtype}, got {_type_name(value)}")
        if value.dtype.str != self.dtype:
            raise FieldProblem(f"dtype {value.dtype.str!r} not allowed (allowed: {self.dtype!r})")
        if value.ndim != 1 or len(value) < self.min_len:
            raise FieldProblem(f"shape {list(value.shape)} not allowed (allowed: 1-D, length >= {self.min_len})")
        if self.finite and not np.isfinite(value).all():
            raise FieldProblem("contains NaN or inf")
        if self.ge is not None and value.size and value.min() < self.ge:
            raise FieldProblem(f"element {value.min()} < {self.ge}")

    def to_wire(self, value: Any) -> Any:
        return {"dtype": self.dtype, "shape": [len(value)], "data": value.tobytes()}

    def from_wire(self, raw: Any) -> Any:
        if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data"}:
            raise FieldProblem("expected an array map with exactly the keys 'data', 'dtype', 'shape'")
        dtype, shape, data = raw["dtype"], raw["shape"], raw["data"]
        if dtype != self.dtype:
            raise FieldProblem(f"dtype {short_repr(dtype)} not allowed (allowed: {self.dtype!r})")
        if not (isinstance(shape, list) and len(shape) == 1 and _is_int(shape[0]) and shape[0] >= 0):
            raise FieldProblem(f"shape {short_repr(shape)} not allowed (allowed: [length], length >= 0)")
        if not isinstance(data, bytes):
            raise FieldProblem(f"data must be bin, got {_type_name(data)}")
        expected = shape[0] * np.dtype(dtype).itemsize
        if len(data) != expected:
            raise FieldProblem(f"shape {shape} of {dtype} needs {expected} bytes, data has {len(data)}")
        return np.frombuffer(data, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class StrList(FieldSpec):
    """A list (or tuple) of str; decoded as a list."""

    def check(self, value: Any) -> None:
        if not isinstance(value, list | tuple):
            raise FieldProblem(f"expected list of str, got {_type_name(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise FieldProblem(f"[{i}]: expected str, got {_type_name(item)}")

    def to_wire(self, value: Any) -> Any:
        return list(value)


@dataclasses.dataclass(frozen=True)
class Nested(FieldSpec):
    """A list (or tuple) of at least ``min_len`` records of class ``record``, each carried as a field map."""

    record: "type[Record]"
    min_len: int = 0

    def check(self, value: Any) -> None:
        if not isinstance(value, list | tuple):
            raise FieldProblem(f"expected list of {self.record.__name__}, got {_type_name(value)}")
        if len(value) < self.min_len:
            raise FieldProblem(f"{len(value)} items not allowed (allowed: >= {self.min_len})")
        for i, item in enumerate(value):
            if not isinstance(item, self.record):
                raise FieldProblem(f"[{i}]: expected {self.record.__name__}, got {_type_name(item)}")

    def to_wire(self, value: Any) -> Any:
        return [record_to_wire(item) for item in value]

    def from_wire(self, raw: Any) -> Any:
        if not isinstance(raw, list):
            raise FieldProblem(f"expected list of {self.record.__name__} maps, got {_type_name(raw)}")
        items = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise FieldProblem(f"[{i}]: expected a {self.record.__name__} map, got {_type_name(item)}")
            try:
                items.append(record_from_wire(self.record, item))
            except ProtocolError as e:
                raise FieldProblem(f"[{i}]: {e.detail}") from None
        return items


@dataclass_transform(frozen_default=True, eq_default=False)
class Record:
    """Base of wire records: each subclass becomes a frozen dataclass (``eq=False``: arrays have no
    scalar equality) whose ``SCHEMA`` maps field names to specs, read from the ``Annotated`` hints."""

    SCHEMA: ClassVar[Mapping[str, FieldSpec]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(frozen=True, eq=False)(cls)
        hints = get_type_hints(cls, include_extras=True)
        schema = {}
        for f in dataclasses.fields(cls):
            specs = [m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, FieldSpec)]
            assert len(specs) == 1, f"{cls.__name__}.{f.name} needs exactly one FieldSpec in Annotated[...]"
            schema[f.name] = specs[0]
        cls.SCHEMA = MappingProxyType(schema)

    def __post_init__(self) -> None:
        for name, spec in self.SCHEMA.items():
            try:
                spec.check(getattr(self, name))
            except FieldProblem as e:
                raise ProtocolError("bad_field", f"{type(self).__name__}.{name}: {e}") from None
        self._check_consistency()

    def _check_consistency(self) -> None:
        """Cross-field rules; override and call ``self._bad`` for a violation."""

    def _bad(self, field: str, problem: str) -> None:
        raise ProtocolError("bad_field", f"{type(self).__name__}.{field}: {problem}")


MESSAGE_TYPES: dict[str, "type[Message]"] = {}
"""Type tag -> message class, filled as message classes are defined."""


class Message(Record):
    """Base of top-level wire messages: ``class Hello(Message, tag="hello")`` registers ``TAG``."""

    TAG: ClassVar[str]

    def __init_subclass__(cls, *, tag: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        assert tag not in MESSAGE_TYPES, f"duplicate message tag {tag!r}"
        cls.TAG = tag
        MESSAGE_TYPES[tag] = cls


R = TypeVar("R", bound=Record)


def record_to_wire(record: Record) -> dict[str, Any]:
    """The msgpack-ready field map of a (valid) record."""
    return {name: spec.to_wire(getattr(record, name)) for name, spec in record.SCHEMA.items()}


def record_from_wire(cls: type[R], raw: dict[Any, Any]) -> R:
    """Build and validate a ``cls`` from an unpacked field map; ``ProtocolError`` names the bad field."""
    missing = [name for name in cls.SCHEMA if name not in raw]
    if missing:
        raise ProtocolError("bad_field", f"{cls.__name__}: missing field(s) {', '.join(missing)}")
    unknown = [short_repr(key) for key in raw if key not in cls.SCHEMA]
    if unknown:
        raise ProtocolError("bad_field", f"{cls.__name__}: unknown field(s) {', '.join(unknown[:5])}")
    values = {}
    for name, spec in cls.SCHEMA.items():
        try:
            values[name] = spec.from_wire(raw[name])
        except FieldProblem as e:
            raise ProtocolError("bad_field", f"{cls.__name__}.{name}: {e}") from None
    return cls(**values)
