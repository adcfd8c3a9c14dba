"""The tiny default model: a byte-level BPE tokenizer and a small Qwen2 warm-started on the arithmetic task.

The package ships the built model (speed_async/tiny/model_files, checked by sha256 against manifest.json):
`ensure_tiny_model()` returns that directory, the same bytes on every machine. `build_tiny` (and
`speed-async make-tiny`) rebuilds it from the recipe. Importing this package imports torch and transformers
only when the build's names are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from speed_async.tiny.store import ensure_tiny_model, shipped_model_dir
    from speed_async.tiny.warmstart import TinyRecipe, build_tiny

__all__ = ["TinyRecipe", "build_tiny", "ensure_tiny_model", "shipped_model_dir"]
_HOME = {
    "TinyRecipe": "warmstart",
    "build_tiny": "warmstart",
    "ensure_tiny_model": "store",
    "shipped_model_dir": "store",
}


def __getattr__(name: str) -> Any:
    """Lazy access to the store (no torch) and the warm-start API (it imports torch)."""
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"speed_async.tiny.{_HOME[name]}"), name)
    raise AttributeError(f"module 'speed_async.tiny' has no attribute {name!r}")
