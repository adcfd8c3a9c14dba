"""`speed-async plot`: accuracy against wall-clock and RL steps for several runs, from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.plot import plot_runs
from speed_async.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(run_dir: Path, accs: list[float], *, with_eval: bool = True) -> Path:
    """A run directory whose metrics.jsonl has 2 RL steps per eval, evals at steps 0, 2, 4, ..."""
    run_dir.mkdir(parents=True)
    records = []
    for i, acc in enumerate(accs):
        step = 2 * i
        records.append({"step": step, "time/wall": 30.0 * step, "time/step": 15.0, "policy_version": step})
        if with_eval:
            records.append({"step": step, "time/wall": 30.0 * step + 5, "eval/arithmetic/acc": acc})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_two_runs_on_one_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _fake_run(tmp_path / "k0", [0.10, 0.15, 0.22])
    b = _fake_run(tmp_path / "k2", [0.10, 0.18, 0.25, 0.30])
    out = tmp_path / "figs" / "accuracy.png"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000
    assert capsys.readouterr().out.strip() == f"plot: {out}"


def test_run_dir_without_metrics_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _fake_run(tmp_path / "good", [0.1, 0.2])
    (tmp_path / "empty").mkdir()
    out = tmp_path / "accuracy.png"
    with pytest.raises(ValueError, match=r"empty: no metrics\.jsonl in it"):
        plot_runs([good, tmp_path / "empty"], out)
    assert main(["plot", str(good), str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"speed-async plot: error: {tmp_path / 'nowhere'}: not a directory; expected a run directory "
        "written by `speed-async train`"
    ]
    assert not out.exists()


def test_runs_without_any_evaluation_are_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _fake_run(tmp_path / "noeval", [0.1, 0.2], with_eval=False)
    assert main(["plot", str(run), "--out", str(tmp_path / "a.png")]) == 2
    assert "no evaluation records" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()
