"""Shared fixtures. Environment defaults for vLLM on the 2-core CPU machines (../shared/docs/ENVIRONMENT.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_EVAL = REPO.parent / "shared" / "data" / "eval"

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SPEED_ASYNC_CACHE", str(REPO / ".cache"))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded tiny Qwen2 model, built once (a few minutes) and cached under SPEED_ASYNC_CACHE."""
    from speed_async.tiny import ensure_tiny_model

    return ensure_tiny_model(Path(os.environ["SPEED_ASYNC_CACHE"]))


@pytest.fixture(scope="session")
def shared_eval_dir() -> Path:
    """../shared/data/eval beside the checkout (MATH500, AIME, AMC JSONL); used by path, never copied."""
    if not SHARED_EVAL.is_dir():
        pytest.fail(f"shared eval data not found at {SHARED_EVAL}")
    return SHARED_EVAL
