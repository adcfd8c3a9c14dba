"""Prompt sources, templates and ordering: formats, bad rows, rendering, length limits, resumable order."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speed_async.data import (
    INSTRUCTION_SUFFIX,
    BadRow,
    DataError,
    LoadResult,
    OverlongPrompt,
    PromptCursor,
    PromptEncoder,
    PromptRecord,
    concat_sources,
    epoch_permutation,
    read_prompt_file,
    render_prompt,
)


def write_jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def verl_row(prompt: Any = None, ground_truth: Any = "4", **overrides: Any) -> dict[str, Any]:
    row = {
        "data_source": "dapo",
        "prompt": [{"role": "user", "content": "What is 2+2?"}] if prompt is None else prompt,
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {"index": 0},
    }
    row.update(overrides)
    return row


# ---------------------------------------------------------------- sources: good files


def test_jsonl_round_trip(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mini.jsonl",
        [
            json.dumps({"problem": "What is 1+1?", "answer": "2", "solution": "ignored"}),
            json.dumps({"problem": "p1", "answer": 7, "id": "x7"}),
            "",  # blank line: skipped, but it keeps the line numbering
            json.dumps({"problem": "p3", "answer": 0.5, "data_source": "custom"}),
        ],
    )
    result = read_prompt_file(path)
    assert result.skipped == []
    assert result.records == [
        PromptRecord(0, "mini", "What is 1+1?", "2", source=path, row=0, extra={}),
        PromptRecord(1, "mini", "p1", "7", source=path, row=1, extra={"id": "x7"}),  # int answer -> "7"
        PromptRecord(3, "custom", "p3", "0.5", source=path, row=3, extra={}),  # float answer -> "0.5"
    ]
    overridden = read_prompt_file(path, data_source="train_mix")
    assert {r.data_source for r in overridden.records} == {"train_mix"}


def test_parquet_round_trip_chat_and_plain(tmp_path: Path) -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    path = write_parquet(tmp_path / "train.parquet", [verl_row(chat), verl_row(chat, data_source="other")])
    result = read_prompt_file(path)
    assert result.skipped == []
    first, second = result.records
    assert first == PromptRecord(
        0,
        "dapo",
        tuple(chat),
        "4",
        source=path,
        row=0,
        extra={"ability": "math", "extra_info": {"index": 0}},
    )
    assert (second.prompt_id, second.row, second.data_source) == (1, 1, "other")

    plain = write_parquet(tmp_path / "base.parquet", [verl_row("Compute 6*7.", ground_truth=42)])
    (record,) = read_prompt_file(plain).records
    assert (record.prompt, record.ground_truth) == ("Compute 6*7.", "42")  # int64 column -> "42"


def test_real_math500_file(shared_eval_dir: Path) -> None:
    result = read_prompt_file(str(shared_eval_dir / "math500.jsonl"))
    assert len(result.records) == 500 and result.skipped == []
    assert {r.data_source for r in result.records} == {"math500"}
    assert [r.prompt_id for r in result.records] == list(range(500))
    first = result.records[0]
    assert first.prompt.startswith("Convert the point $(0,3)$")
    assert first.ground_truth == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_concat_sources_renumbers_globally(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [json.dumps({"problem": f"a{i}", "answer": i}) for i in range(2)])
    b = write_jsonl(tmp_path / "b.jsonl", ["", json.dumps({"problem": "b1", "answer": "1"})])
    records = concat_sources([read_prompt_file(a), read_prompt_file(b)])
    # a gives rows 0, 1; b's only record is on line 1 (line 0 blank) -> global ids 0, 1, 2.
    assert [(r.prompt_id, r.source, r.row) for r in records] == [(0, a, 0), (1, a, 1), (2, b, 1)]


def test_builtin_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_split(split: str, seed: int = 0) -> list[PromptRecord]:
        calls.append(split)
        return [PromptRecord(0, "arithmetic", "1+2=", "3", source="arithmetic/train/seed0", row=0)]

    fake = types.ModuleType("speed_async.data.arithmetic")
    fake.load_split = load_split  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "speed_async.data.arithmetic", fake)
    assert read_prompt_file("builtin:arithmetic/train") == LoadResult(records=load_split("train"), skipped=[])
    (record,) = read_prompt_file("builtin:arithmetic/test", data_source="arith").records
    assert record.data_source == "arith" and calls == ["train", "train", "test"]
    with pytest.raises(
        DataError, match=r"builtin:gsm8k/train: unknown builtin source.*arithmetic/<train\|test\|hard>.*countdown"
    ):
        read_prompt_file("builtin:gsm8k/train")


# ---------------------------------------------------------------- sources: bad input

GOOD_LINE = json.dumps({"problem": "What is 1+1?", "answer": "2"})
BAD_JSONL = [
    ('{"problem": "p"}', "answer", "missing"),
    ('{"problem": "p", "answer": null}', "answer", "missing"),
    ('{"problem": "p", "answer": ["1"]}', "answer", "got list"),
    ('{"problem": "p", "answer": true}', "answer", "got bool"),
    ('{"problem": "p", "answer": NaN}', "answer", "finite"),
    ('{"problem": "p", "answer": "  "}', "answer", "empty"),
    ('{"question": "p", "answer": "1"}', "problem", "missing"),
    ('{"problem": " \\n ", "answer": "1"}', "problem", "empty"),
    ('{"problem": 3, "answer": "1"}', "problem", "got int"),
    ('{"problem": "p", "answer": "1", "data_source": ""}', "data_source", "empty"),
    ('{"problem": "p", "answer": "1"', "<row>", "invalid JSON"),
    ("[1, 2]", "<row>", "expected a JSON object"),
]


@pytest.mark.parametrize(("line", "field", "reason"), BAD_JSONL)
def test_bad_jsonl_row(tmp_path: Path, line: str, field: str, reason: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_LINE, line, GOOD_LINE])
    with pytest.raises(DataError) as info:
        read_prompt_file(path)
    err = info.value
    assert (err.source, err.row, err.field) == (path, 1, field)
    assert str(err).startswith(f"{path}, row 1, field {field!r}: ") and reason in str(err)

    result = read_prompt_file(path, on_bad_row="skip")
    assert [r.row for r in result.records] == [0, 2]
    assert result.skipped == [BadRow(path, 1, field, err.reason)]


def test_skip_counts_every_bad_row(tmp_path: Path) -> None:
    lines = [GOOD_LINE] + [line for line, _, _ in BAD_JSONL] + [GOOD_LINE]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    result = read_prompt_file(path, on_bad_row="skip")
    # line 0 good, lines 1..12 the 12 bad cases, line 13 good.
    assert [r.row for r in result.records] == [0, 13]
    assert [b.row for b in result.skipped] == list(range(1, 13))
    assert [b.field for b in result.skipped] == [field for _, field, _ in BAD_JSONL]


BAD_VERL = [
    (verl_row([{"role": None, "content": "x"}]), "prompt[0].role", "missing"),
    (verl_row([{"role": "user", "content": None}]), "prompt[0].content", "missing"),
    (verl_row([{"role": "system", "content": "x"}]), "prompt", "no message with role 'user'"),
    (verl_row([{"role": "user", "content": "   "}]), "prompt[0].content", "empty"),
    (verl_row([]), "prompt", "non-empty list"),
    (verl_row(ground_truth=None), "reward_model.ground_truth", "missing"),
    (verl_row(reward_model={"style": "model", "ground_truth": "4"}), "reward_model.style", "'rule'"),
    (verl_row(reward_model=None), "reward_model", "missing"),
    (verl_row(data_source=None), "data_source", "missing"),
]


@pytest.mark.parametrize(("bad", "field", "reason"), BAD_VERL)
def test_bad_parquet_row(tmp_path: Path, bad: dict[str, Any], field: str, reason: str) -> None:
    path = write_parquet(tmp_path / "bad.parquet", [verl_row(), bad, verl_row()])
    with pytest.raises(DataError) as info:
        read_prompt_file(path)
    assert (info.value.source, info.value.row, info.value.field) == (path, 1, field)
    assert reason in info.value.reason

    result = read_prompt_file(path, on_bad_row="skip")
    assert [r.row for r in result.records] == [0, 2]
    assert [(b.row, b.field) for b in result.skipped] == [(1, field)]


def test_parquet_wrong_types(tmp_path: Path) -> None:
    # A column's type is fixed per file, so a list ground truth (or a non-string prompt) makes every row bad.
    listed = write_parquet(tmp_path / "listed.parquet", [verl_row(ground_truth=["1", "2"])] * 2)
    with pytest.raises(DataError, match=r"row 0, field 'reward_model.ground_truth': expected a string or a number"):
        read_prompt_file(listed)
    result = read_prompt_file(listed, on_bad_row="skip")
    assert result.records == [] and len(result.skipped) == 2
    numeric = write_parquet(tmp_path / "numeric.parquet", [verl_row(prompt=5)])
    with pytest.raises(DataError, match=r"field 'prompt': expected a string or a non-empty list"):
        read_prompt_file(numeric)


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found; allowed: '\.jsonl'.*'\.parquet'"):
        read_prompt_file(missing)
    csv = tmp_path / "data.csv"
    csv.write_text("problem,answer\n")
    with pytest.raises(DataError, match=r"data\.csv: unknown format '\.csv'; allowed: '\.jsonl'.*'\.parquet'"):
        read_prompt_file(str(csv))
    garbage = tmp_path / "broken.parquet"
    garbage.write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match=r"broken\.parquet: cannot read as parquet"):
        read_prompt_file(str(garbage))
    with pytest.raises(ValueError, match="on_bad_row must be 'error' or 'skip', got 'warn'"):
        read_prompt_file(missing, on_bad_row="warn")  # type: ignore[arg-type]


# ---------------------------------------------------------------- templates


class CharTokenizer:
    """Character-level fake: one id per character (its code point), BOS id 1 when special tokens are on."""

    name_or_path = "char-fake"
    chat_template: str | None = "<{role}>{content}\\n ... <assistant>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool
    ) -> str:
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


def record(prompt: Any, row: int = 0) -> PromptRecord:
    return PromptRecord(row, "test", prompt, "1", source="mem.jsonl", row=row)


CHAT = (
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A"},
    {"role": "user", "content": "U2"},
)


def test_instruction_suffix_is_the_papers() -> None:
    assert INSTRUCTION_SUFFIX == " Let's think step by step and output the final answer within \\boxed{}."
    assert render_prompt(record("What is 2+2?")).endswith(
        "2+2? Let's think step by step and output the final answer within \\boxed{}."
    )


def test_render_plain_and_chat() -> None:
    assert render_prompt(record("P"), suffix=" X") == "P X"
    # No chat template: contents joined with "\n", suffix on the LAST user message only.
    assert render_prompt(record(CHAT), suffix=" X") == "S\nU1\nA\nU2 X"
    tok = CharTokenizer()
    assert render_prompt(record(CHAT), tokenizer=tok, suffix=" X", chat_template=True) == (
        "<system>S\n<user>U1\n<assistant>A\n<user>U2 X\n<assistant>"
    )
    # A plain prompt under a chat template becomes one user message.
    assert render_prompt(record("P"), tokenizer=tok, suffix=" X", chat_template=True) == "<user>P X\n<assistant>"
    assert CHAT[3]["content"] == "U2"  # the record's messages are not modified


def test_chat_template_missing() -> None:
    no_template = CharTokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match=r"data\.chat_template=True but tokenizer 'char-fake' has no chat template"):
        render_prompt(record("P"), tokenizer=no_template, chat_template=True)
    with pytest.raises(ValueError, match=r"data\.chat_template=True but tokenizer 'NoneType'"):
        render_prompt(record("P"), chat_template=True)
    with pytest.raises(ValueError, match=r"mem\.jsonl, row 0: chat prompt has no message with role 'user'"):
        render_prompt(record(({"role": "system", "content": "S"},)))


def test_encoder_token_ids() -> None:
    plain = PromptEncoder(CharTokenizer(), max_prompt_length=10, suffix="")
    assert plain.encode(record("ab")) == [1, 97, 98]  # BOS + 'a' + 'b'
    chat = PromptEncoder(CharTokenizer(), max_prompt_length=100, suffix="", chat_template=True)
    # "<user>ab\n<assistant>": 6 + 2 + 1 + 11 = 20 characters, no BOS (the template owns special tokens).
    ids = chat.encode(record("ab"))
    assert ids is not None and len(ids) == 20 and ids[:2] == [ord("<"), ord("u")]


def test_overlong_error_and_skip() -> None:
    # limit 4; plain prompts get BOS + one id per character: "abc" -> 4 tokens (at the limit, kept),
    # "abcd" -> 5 tokens (over).
    strict = PromptEncoder(CharTokenizer(), max_prompt_length=4, on_overlong="error", suffix="")
    assert strict.encode(record("abc")) == [1, 97, 98, 99]
    with pytest.raises(
        DataError, match=r"mem\.jsonl, row 7, field 'prompt': prompt has 5 tokens, over max_prompt_length 4"
    ):
        strict.encode(record("abcd", row=7))
    assert strict.overlong == [OverlongPrompt("mem.jsonl", 7, 5)]

    lenient = PromptEncoder(CharTokenizer(), max_prompt_length=4, on_overlong="skip", suffix="")
    records = [record(p, row=i) for i, p in enumerate(["ab", "abcdef", "abc", "abcdefgh"])]
    encoded, overlong = lenient.encode_all(records)
    # token counts 3, 7, 4, 9 -> rows 0 and 2 kept, rows 1 and 3 reported; nothing is truncated.
    assert [(r.row, ids) for r, ids in encoded] == [(0, [1, 97, 98]), (2, [1, 97, 98, 99])]
    assert overlong == [("mem.jsonl", 1, 7), ("mem.jsonl", 3, 9)]
    _, again = lenient.encode_all(records[:2])
    assert again == [("mem.jsonl", 1, 7)]  # only this call's entries...
    assert len(lenient.overlong) == 3  # ...while `overlong` keeps all of them


def test_encoder_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_prompt_length must be an integer >= 1, got 0"):
        PromptEncoder(CharTokenizer(), max_prompt_length=0)
    with pytest.raises(ValueError, match="on_overlong must be 'error' or 'skip', got 'truncate'"):
        PromptEncoder(CharTokenizer(), max_prompt_length=8, on_overlong="truncate")  # type: ignore[arg-type]


# ---------------------------------------------------------------- ordering


def test_epoch_permutation() -> None:
    perm = epoch_permutation(50, seed=7, epoch=0)
    assert sorted(perm) == list(range(50))
    assert perm == epoch_permutation(50, seed=7, epoch=0)
    # The documented construction, reached another way: default_rng(seq) is Generator(PCG64(SeedSequence(seq))).
    assert perm == np.random.default_rng([7, 0]).permutation(50).tolist()
    assert perm != epoch_permutation(50, seed=7, epoch=1)  # equal by chance with probability 1/50!
    assert perm != epoch_permutation(50, seed=8, epoch=0)
    assert epoch_permutation(0, seed=0, epoch=0) == []
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        epoch_permutation(5, seed=-1, epoch=0)


def test_cursor_walks_epochs() -> None:
    cursor = PromptCursor(5, seed=3)
    assert cursor.peek_remaining_in_epoch() == epoch_permutation(5, 3, 0)
    first = [cursor.next() for _ in range(5)]
    assert first == [(0, i) for i in epoch_permutation(5, 3, 0)]
    assert cursor.peek_remaining_in_epoch() == [] and cursor.epoch == 0  # the epoch end is visible
    assert cursor.next() == (1, epoch_permutation(5, 3, 1)[0])
    assert cursor.peek_remaining_in_epoch() == epoch_permutation(5, 3, 1)[1:]


@pytest.mark.parametrize("drawn", [0, 7, 10, 11])  # start, mid-epoch 1, end of epoch 1, start of epoch 2
def test_cursor_resume(drawn: int) -> None:
    reference = PromptCursor(5, seed=3)
    expected = [reference.next() for _ in range(drawn + 12)]
    cursor = PromptCursor(5, seed=3)
    for _ in range(drawn):
        cursor.next()
    state = json.loads(json.dumps(cursor.state_dict()))  # as a checkpoint would store it
    resumed = PromptCursor(5, seed=3)
    resumed.load_state_dict(state)
    assert resumed.peek_remaining_in_epoch() == cursor.peek_remaining_in_epoch()
    assert [resumed.next() for _ in range(12)] == expected[drawn:]


def test_cursor_state_validation() -> None:
    state = PromptCursor(5, seed=3).state_dict()
    with pytest.raises(ValueError, match="cursor state has num_prompts=5 but this cursor has 6"):
        PromptCursor(6, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="cursor state has seed=3 but this cursor has 4"):
        PromptCursor(5, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"position must be an integer in \[0, 5\], got 6"):
        PromptCursor(5, seed=3).load_state_dict({**state, "position": 6})
    with pytest.raises(ValueError, match="num_prompts must be an integer >= 1, got 0"):
        PromptCursor(0, seed=3)
