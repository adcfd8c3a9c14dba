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


def _check_result(out: Path, prompts: dict[str, int], n: int, stdout: str) -> dict:
    """The --out file, the table (a row per source, sorted) and the JSON summary line agree with each other."""
    result = json.loads(out.read_text())
    assert set(result["sources"]) == set(prompts)
    for source, count in prompts.items():
        entry = result["sources"][source]
        assert entry["prompts"] == count and entry["n"] == n and entry["overlong"] == 0
        per_prompt = [p for p in result["per_prompt"] if p["source"] == source]
        assert [p["row"] for p in per_prompt] == list(range(count))
        assert all(len(p["scores"]) == n and set(p["scores"]) <= {0.0, 1.0} for p in per_prompt)
        # mean@n: the mean over prompts of each prompt's mean score.
        assert entry["acc"] == pytest.approx(sum(sum(p["scores"]) / n for p in per_prompt) / count)
    assert result["reward_stats"]["scored"] == sum(prompts.values()) * n and result["generated_tokens"] > 0
    # vLLM logs to stdout too; the table starts at its header line.
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == ["source", "prompts", "n", "acc", "overlong"])
    end = start + 1 + len(prompts)
    accs = {source: result["sources"][source]["acc"] for source in prompts}
    expected = [[s, str(prompts[s]), str(n), f"{accs[s]:.4f}", "0"] for s in sorted(prompts)]
    assert [line.split() for line in lines[start + 1 : end]] == expected
    summary = json.loads(lines[end])
    assert summary["acc"] == accs and summary["n"] == n
    assert lines[end + 1] == f"results: {out}"
    return result


def test_eval_on_the_arithmetic_split_and_amc2023_in_one_run(
    tiny_model_dir: Path, shared_eval_dir: Path, tmp_path: Path
) -> None:
    # AMC 2023 works although the tiny model scores about zero on it; each file keeps its own source.
    out = tmp_path / "eval.json"
    amc = shared_eval_dir / "amc2023.jsonl"
    result = _eval(
        "--model", str(tiny_model_dir), "--data", "builtin:arithmetic/test", str(amc), "--n", "2",
        "--max-prompts", "8", "--max-tokens", "48", "--enforce-eager", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    doc = _check_result(out, {"arithmetic": 8, "amc2023": 8}, 2, result.stdout)
    assert doc["settings"]["temperature"] == 1.0 and doc["model"] == str(tiny_model_dir.resolve())
    assert doc["sources"]["amc2023"]["files"] == [str(amc)]


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
