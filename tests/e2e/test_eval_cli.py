"""`speed-async eval` end to end on CPU: the tiny model, real vLLM, real Math-Verify workers, checked through
the printed table, the JSON summary line and the --out file, as a user would; bad inputs are one error line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import role_env

pytestmark = pytest.mark.e2e


def _eval(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "speed_async", "eval", *args]
    return subprocess.run(argv, env=role_env(), capture_output=True, text=True, timeout=timeout, check=False)


def _check_result(out: Path, source: str, prompts: int, n: int, stdout: str) -> dict:
    result = json.loads(out.read_text())
    entry = result["sources"][source]
    assert entry["prompts"] == prompts and entry["n"] == n and entry["overlong"] == 0
    per_prompt = [p for p in result["per_prompt"] if p["source"] == source]
    assert [p["row"] for p in per_prompt] == list(range(prompts))
    assert all(len(p["scores"]) == n and set(p["scores"]) <= {0.0, 1.0} for p in per_prompt)
    # mean@n: the mean over prompts of each prompt's mean score.
    assert entry["acc"] == pytest.approx(sum(sum(p["scores"]) / n for p in per_prompt) / prompts)
    assert result["reward_stats"]["scored"] == prompts * n and result["generated_tokens"] > 0
    # vLLM logs to stdout too; the table starts at its header line.
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == ["source", "prompts", "n", "acc", "overlong"])
    table, summary = lines[start : start + 2], json.loads(lines[start + 2])
    assert table[1].split() == [source, str(prompts), str(n), f"{entry['acc']:.4f}", "0"]
    assert summary["acc"] == {source: entry["acc"]} and summary["n"] == n
    assert lines[start + 3] == f"results: {out}"
    return result


def test_eval_on_the_arithmetic_test_split(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "arith.json"
    result = _eval(
        "--model", str(tiny_model_dir), "--data", "builtin:arithmetic/test", "--n", "2", "--max-prompts", "16",
        "--max-tokens", "48", "--enforce-eager", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    doc = _check_result(out, "arithmetic", 16, 2, result.stdout)
    assert doc["settings"]["temperature"] == 1.0 and doc["model"] == str(tiny_model_dir.resolve())


def test_eval_on_amc2023_works_although_the_tiny_model_scores_about_zero(
    tiny_model_dir: Path, shared_eval_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "amc.json"
    data = shared_eval_dir / "amc2023.jsonl"
    result = _eval(
        "--model", str(tiny_model_dir), "--data", str(data), "--n", "2", "--max-prompts", "4",
        "--max-tokens", "48", "--enforce-eager", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    doc = _check_result(out, "amc2023", 4, 2, result.stdout)
    assert doc["sources"]["amc2023"]["files"] == [str(data)]


def test_bad_inputs_are_one_error_line_and_exit_2(tiny_model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": 3, "answer": "4"}\n')
    cases = [
        (["--model", str(tmp_path / "missing"), "--data", "builtin:arithmetic/test"], "not a directory"),
        (["--model", str(tmp_path), "--data", "builtin:arithmetic/test"], "no config.json"),
        (["--model", str(tiny_model_dir), "--data", str(tmp_path / "none.jsonl")], "file not found"),
        (["--model", str(tiny_model_dir), "--data", str(bad)], "row 1, field 'problem'"),
        (["--model", str(tiny_model_dir), "--data", "builtin:arithmetic/test", "--max-tokens", "4096"], "no room"),
    ]
    for args, message in cases:
        result = _eval(*args, "--n", "2", timeout=120)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("speed-async eval: error: ") and message in lines[0], lines
