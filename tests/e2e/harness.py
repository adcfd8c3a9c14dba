"""Test helpers that start real role processes (vLLM samplers, torchrun learners) and track them by PID."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from launcher.standalone import kill_group, role_env, start_sampler
from speed_async.learner.checkpoint import latest_checkpoint, unpack_head_state

REPO = Path(__file__).resolve().parents[2]
__all__ = ["FATES", "REPO", "check_accounting", "kill_group", "log_tail", "role_env", "start_sampler"]
FATES = ("trained", "rejected", "dropped")
"""Ledger events that end a prompt's turn in an epoch."""


def log_tail(path: Path, lines: int = 40) -> str:
    """The end of a role's log, for assertion messages."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


Key = tuple[int, int]


def check_accounting(
    run_dir: Path, ledger: list[dict[str, Any]], steps: int, batch: int, k: int
) -> tuple[set[Key], set[Key], set[Key]]:
    """The ledger checks every end-to-end run must pass: `batch` groups trained per step for `steps` steps, no
    lag above `k`, at most one fate per prompt and epoch, a final checkpoint at `steps`, and every dispatched
    prompt either has a fate or was still pending (re-issue queue, ready groups, dispatched after the
    checkpoint). Returns (prompts with a fate, prompts pending at the end, dispatched prompts)."""
    trained = [e for e in ledger if e["event"] == "trained"]
    assert Counter(e["step"] for e in trained) == {s: batch for s in range(steps)}
    assert all(0 <= e["lag"] <= k for e in trained), "no group beyond the staleness bound is ever trained"
    fates = Counter((e["epoch"], e["prompt_id"]) for e in ledger if e["event"] in FATES)
    assert max(fates.values()) == 1, f"prompts with several fates: {[key for key, n in fates.items() if n > 1]}"
    version, final = latest_checkpoint(run_dir) or (0, run_dir)
    assert version == steps
    head = unpack_head_state((final / "head.msgpack").read_bytes())
    pending = {tuple(key) for key in head.dispatch["reissue"]} | {tuple(key) for key in head.dispatch["ready_keys"]}
    tail = (run_dir / "ledger.jsonl").read_bytes()[head.ledger_offset :].decode().splitlines()
    late = {(e["epoch"], e["prompt_id"]) for e in map(json.loads, tail) if e["event"] == "dispatched"}
    dispatched = {(e["epoch"], e["prompt_id"]) for e in ledger if e["event"] == "dispatched"}
    lost = dispatched - set(fates) - pending - late
    assert not lost, f"dispatched prompts with no fate that were not pending at the end: {sorted(lost)}"
    return set(fates), pending | late, dispatched
