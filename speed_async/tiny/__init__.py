"""The tiny default model: a byte-level BPE tokenizer and a small Qwen2 warm-started on the arithmetic task.

Use `ensure_tiny_model()` to get the cached model directory (built on first use, in a few minutes on a
2-core CPU). Importing this package imports torch and transformers only when those names are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from speed_async.tiny.warmstart import TinyRecipe, build_tiny, ensure_tiny_model

__all__ = ["TinyRecipe", "build_tiny", "ensure_tiny_model"]


def __getattr__(name: str) -> Any:
    """Lazy access to the warm-start API (it imports torch)."""
    if name in __all__:
        from speed_async.tiny import warmstart

        return getattr(warmstart, name)
    raise AttributeError(f"module 'speed_async.tiny' has no attribute {name!r}")
