"""Test helpers that start real role processes (vLLM samplers, torchrun learners) and track them by PID."""

from __future__ import annotations

from pathlib import Path

from launcher.standalone import kill_group, role_env, start_sampler

REPO = Path(__file__).resolve().parents[2]
__all__ = ["REPO", "kill_group", "log_tail", "role_env", "start_sampler"]


def log_tail(path: Path, lines: int = 40) -> str:
    """The end of a role's log, for assertion messages."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"
