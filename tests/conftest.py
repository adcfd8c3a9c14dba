"""Shared fixtures. Environment defaults for vLLM on the 2-core CPU machines (../shared/docs/ENVIRONMENT.md)."""

from __future__ import annotations

import os
import sys
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
# Every test process (and the learners, samplers and reward workers they start) caches the bytecode of what it
# imports, also when pytest runs outside `make test` with PYTHONDONTWRITEBYTECODE set: see the Makefile.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded tiny Qwen2 model: the copy shipped in the package (the bytes `builtin:tiny` is on every
    machine), checked against its sha256 manifest; nothing is built."""
    from speed_async.tiny.store import shipped_model_dir

    return shipped_model_dir()


@pytest.fixture(scope="session")
def shared_eval_dir() -> Path:
    """../shared/data/eval beside the checkout (MATH500, AIME, AMC JSONL); used by path, never copied."""
    if not SHARED_EVAL.is_dir():
        pytest.fail(f"shared eval data not found at {SHARED_EVAL}")
    return SHARED_EVAL


# The order test files go out in under `make test` (`-n 2 --dist loadfile`: each worker takes a whole file,
# then the next one in this order). The longest file first; then the unit tests, which do not need the tiny
# model, so the second worker runs them while the first builds it (about 2.5 min in CI from a clean clone);
# then the other end-to-end files, longest first (seconds measured in CI), so that no long file starts last.
FIRST = ("e2e/test_resume.py",)
LAST = (
    "e2e/test_faults.py",
    "e2e/test_train.py",
    "e2e/test_sampler.py",
    "e2e/test_multinode.py",
    "distributed/test_weight_sync.py",
    "e2e/test_eval_cli.py",
    "e2e/test_engine.py",
    "distributed/test_learner.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Stable reorder: FIRST, then every file not named, as collected, then LAST in its order."""

    def key(item: pytest.Item) -> tuple[int, int]:
        path = Path(str(item.fspath)).relative_to(REPO / "tests").as_posix()
        if path in FIRST:
            return (0, FIRST.index(path))
        return (2, LAST.index(path)) if path in LAST else (1, 0)

    items.sort(key=key)
