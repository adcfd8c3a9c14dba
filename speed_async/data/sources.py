"""Read prompt sources into `PromptRecord`s: problem/answer JSONL, VeRL parquet, the arithmetic task.

Accepted sources (chosen by the name's extension or prefix):

- ``*.jsonl``: one JSON object per line with ``problem`` (string) and ``answer``; optional ``data_source``
  (string) and ``id`` (kept in ``extra["id"]``). Other keys are ignored. Blank lines are skipped.
- ``*.parquet``: VeRL rows with ``data_source`` (string), ``prompt`` (a list of ``{role, content}`` chat
  messages, or a plain string), ``reward_model: {style: "rule", ground_truth: <answer>}`` and the optional
  ``ability`` and ``extra_info`` (kept in ``extra``).
- ``builtin:arithmetic/<split>``, ``builtin:sums/<split>`` (the long-tail task), ``builtin:countdown/<split>``:
  ``load_split(split)`` of ``speed_async.data.arithmetic`` (train, test, hard), ``speed_async.data.sums`` or
  ``speed_async.data.countdown`` (train, test), its records as that module makes them (``data_source``
  replaced only when given).

Answers may be numbers in the files: an int or a finite float becomes its ``str()`` (``7`` -> ``"7"``,
``0.5`` -> ``"0.5"``, ``3.0`` -> ``"3.0"``; the reward compares answers mathematically, so ``"3.0"`` still
matches ``3``). Any other type (bool, list, object, null) is a bad row.

A row's ``row`` is its 0-based index in the file (for JSONL the line number minus one, so blank lines keep
the numbering) and its ``prompt_id`` is the same index; `concat_sources` renumbers ``prompt_id`` globally.
A bad row raises `DataError` naming file, row and field, or with ``on_bad_row="skip"`` becomes a `BadRow`
in `LoadResult.skipped` while every good row is kept.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from speed_async.data.records import ChatMessages, PromptRecord

BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS = ("arithmetic", "sums", "countdown")
FILE_FORMATS = (".jsonl", ".parquet")
ALLOWED_FORMATS = (
    "'.jsonl' (problem/answer), '.parquet' (VeRL rows), 'builtin:arithmetic/<train|test|hard>', "
    "'builtin:sums/<train|test>' or 'builtin:countdown/<train|test>'"
)
ROW = "<row>"
"""The field name used when a whole row is unusable (invalid JSON, not an object)."""

OnBadRow = Literal["error", "skip"]


class DataError(ValueError):
    """Bad prompt data: names the source (file path or builtin name), the 0-based row and the field.

    ``row`` and ``field`` are None for errors about the whole source (missing file, unknown format).
    """

    def __init__(self, source: str, reason: str, *, row: int | None = None, field: str | None = None) -> None:
        self.source = source
        self.row = row
        self.field = field
        self.reason = reason
        where = source if row is None else f"{source}, row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class BadRow:
    """A row left out under ``on_bad_row="skip"``: where it was and what was wrong with it."""

    source: str
    row: int
    field: str
    message: str


@dataclass(frozen=True)
class LoadResult:
    """The good records of one source and the rows that were skipped."""

    records: list[PromptRecord]
    skipped: list[BadRow]


def read_prompt_file(
    path: str | os.PathLike[str],
    *,
    data_source: str | None = None,
    on_bad_row: OnBadRow = "error",
) -> LoadResult:
    """Read one prompt source (see the module docstring for the formats).

    ``data_source`` overrides every record's data source; by default parquet rows use their own
    ``data_source`` field and JSONL rows theirs when present, else the file stem (``math500.jsonl`` ->
    ``"math500"``). Raises `DataError` for a missing file, an unknown format, or (``on_bad_row="error"``)
    the first bad row.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if data_source is not None and not data_source.strip():
        raise ValueError(f"data_source must be a non-empty string or None, got {data_source!r}")
    name = os.fspath(path)
    if name.startswith(BUILTIN_PREFIX):
        return _read_builtin(name, data_source)
    suffix = Path(name).suffix.lower()
    if suffix not in FILE_FORMATS:
        raise DataError(name, f"unknown format {suffix or '(no extension)'!r}; allowed: {ALLOWED_FORMATS}")
    if not Path(name).is_file():
        raise DataError(name, f"file not found; allowed: {ALLOWED_FORMATS}")
    rows, parse = (
        (_jsonl_lines(name), _parse_jsonl_row) if suffix == ".jsonl" else (_parquet_rows(name), _parse_verl_row)
    )
    records: list[PromptRecord] = []
    skipped: list[BadRow] = []
    for row, obj in rows:
        try:
            records.append(parse(obj, name, row, data_source))
        except DataError as err:
            if on_bad_row == "error":
                raise
            assert err.row is not None and err.field is not None, err
            skipped.append(BadRow(source=name, row=err.row, field=err.field, message=err.reason))
    return LoadResult(records=records, skipped=skipped)


def concat_sources(results: Sequence[LoadResult]) -> list[PromptRecord]:
    """All records of ``results`` in order, with ``prompt_id`` renumbered 0..N-1 (``source``/``row`` kept)."""
    records = [record for result in results for record in result.records]
    return [replace(record, prompt_id=i) for i, record in enumerate(records)]


def _read_builtin(name: str, data_source: str | None) -> LoadResult:
    dataset, _, split = name.removeprefix(BUILTIN_PREFIX).partition("/")
    if dataset not in BUILTIN_DATASETS or not split:
        raise DataError(name, f"unknown builtin source; allowed: {ALLOWED_FORMATS}")
    import importlib  # late: only runs that ask for a builtin task pay its import

    try:
        records = importlib.import_module(f"speed_async.data.{dataset}").load_split(split)
    except ValueError as err:
        raise DataError(name, f"{err}; allowed: {ALLOWED_FORMATS}") from None
    if data_source is not None:
        records = [replace(record, data_source=data_source) for record in records]
    return LoadResult(records=records, skipped=[])


def _jsonl_lines(path: str) -> list[tuple[int, bytes]]:
    """(row, raw line) for every non-blank line; row is the 0-based line number."""
    with open(path, "rb") as f:
        return [(row, line) for row, line in enumerate(f) if line.strip()]


def _parquet_rows(path: str) -> list[tuple[int, Any]]:
    import pyarrow as pa  # late: pyarrow costs a noticeable import time
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(path, f"cannot read as parquet ({exc}); allowed: {ALLOWED_FORMATS}") from exc
    return list(enumerate(table.to_pylist()))


def _parse_jsonl_row(line: bytes, path: str, row: int, data_source: str | None) -> PromptRecord:
    try:
        obj = json.loads(line)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise DataError(path, f"invalid JSON line ({exc})", row=row, field=ROW) from exc
    if not isinstance(obj, dict):
        raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", row=row, field=ROW)
    if data_source is None:
        has_own = "data_source" in obj
        data_source = _nonblank_str(obj["data_source"], path, row, "data_source") if has_own else Path(path).stem
    return PromptRecord(
        prompt_id=row,
        data_source=data_source,
        prompt=_nonblank_str(obj.get("problem"), path, row, "problem"),
        ground_truth=_answer(obj.get("answer"), path, row, "answer"),
        source=path,
        row=row,
        extra={"id": obj["id"]} if "id" in obj else {},
    )


def _parse_verl_row(obj: dict[str, Any], path: str, row: int, data_source: str | None) -> PromptRecord:
    if data_source is None:
        data_source = _nonblank_str(obj.get("data_source"), path, row, "data_source")
    prompt = obj.get("prompt")
    parsed_prompt = (
        _nonblank_str(prompt, path, row, "prompt") if isinstance(prompt, str) else _chat_messages(prompt, path, row)
    )
    reward_model = obj.get("reward_model")
    if not isinstance(reward_model, Mapping):
        raise DataError(
            path, _type_reason(reward_model, "a {style, ground_truth} struct"), row=row, field="reward_model"
        )
    if reward_model.get("style") != "rule":
        reason = f"only style 'rule' is supported, got {reward_model.get('style')!r}"
        raise DataError(path, reason, row=row, field="reward_model.style")
    extra = {key: obj[key] for key in ("ability", "extra_info") if obj.get(key) is not None}
    return PromptRecord(
        prompt_id=row,
        data_source=data_source,
        prompt=parsed_prompt,
        ground_truth=_answer(reward_model.get("ground_truth"), path, row, "reward_model.ground_truth"),
        source=path,
        row=row,
        extra=extra,
    )


def _chat_messages(value: Any, path: str, row: int) -> ChatMessages:
    """Validate chat messages: a non-empty list of {role, content} strings with a non-blank last user turn."""
    if not isinstance(value, list) or not value:
        raise DataError(
            path,
            _type_reason(value, "a string or a non-empty list of chat messages"),
            row=row,
            field="prompt",
        )
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise DataError(path, _type_reason(message, "a {role, content} mapping"), row=row, field=f"prompt[{i}]")
        role = message.get("role")
        content = message.get("content")
        if not isinstance(role, str) or not role:
            raise DataError(path, _type_reason(role, "a non-empty string"), row=row, field=f"prompt[{i}].role")
        if not isinstance(content, str):
            raise DataError(path, _type_reason(content, "a string"), row=row, field=f"prompt[{i}].content")
        messages.append({"role": role, "content": content})
    users = [i for i, message in enumerate(messages) if message["role"] == "user"]
    if not users:
        raise DataError(path, "chat prompt has no message with role 'user'", row=row, field="prompt")
    if not messages[users[-1]]["content"].strip():
        raise DataError(path, "the last user message is empty", row=row, field=f"prompt[{users[-1]}].content")
    return tuple(messages)


def _nonblank_str(value: Any, path: str, row: int, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(path, _type_reason(value, "a string"), row=row, field=field)
    if not value.strip():
        raise DataError(path, "empty or whitespace-only string", row=row, field=field)
    return value


def _answer(value: Any, path: str, row: int, field: str) -> str:
    """The gold answer as a string: str as is (non-blank), int or finite float through str()."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(path, _type_reason(value, "a string or a number"), row=row, field=field)
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(path, f"expected a finite number, got {value!r}", row=row, field=field)
    if isinstance(value, str):
        return _nonblank_str(value, path, row, field)
    return str(value)


def _type_reason(value: Any, expected: str) -> str:
    return "missing or null" if value is None else f"expected {expected}, got {type(value).__name__} {value!r:.60}"
