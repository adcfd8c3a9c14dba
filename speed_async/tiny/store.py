"""Where the tiny models come from: the copies shipped in the package (`builtin:tiny`, `builtin:tiny-long`,
`builtin:tiny-countdown`), or a build from a recipe.

```
 speed_async/tiny/model_files/          the model built by the pinned default recipe on an AVX2 machine: tokenizer,
                                        config, float32 safetensors weights and its build_info.json (about 5 MB)
 speed_async/tiny/manifest.json         {"recipe_digest": ..., "files": {name: sha256}} of those files
 speed_async/tiny/model_files_long/     `builtin:tiny-long`: that model warm-started further on the long-tail sums
 speed_async/tiny/manifest_long.json    (speed_async.tiny.longstart), and its manifest
 speed_async/tiny/model_files_countdown/    `builtin:tiny-countdown`: that model warm-started further on the
 speed_async/tiny/manifest_countdown.json   Countdown task (speed_async.tiny.countdownstart), and its manifest
```
`ensure_tiny_model()` returns the shipped directory after checking every file against the manifest, so that
`make run` and `make test` start from the same bytes on every machine: a build, pinned to AVX2 arithmetic or
not, gives other weights on some CPUs (an AVX-512-FP16/AMX machine built a 0.671 / 0.850 model from the recipe
of the shipped 0.641 / 0.815 one). A file that does not match is an error naming it and how to fix it.
Other recipes (tests, experiments) and `speed-async make-tiny` build from the recipe into the cache
(`<cache>/tiny-<recipe digest>`, see `build_cached`). Reading the shipped copy imports no torch.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from speed_async.tiny.warmstart import TinyRecipe

SHIPPED_DIR = Path(__file__).resolve().parent / "model_files"
MANIFEST = SHIPPED_DIR.parent / "manifest.json"
SHIPPED_LONG_DIR = SHIPPED_DIR.parent / "model_files_long"
MANIFEST_LONG = SHIPPED_DIR.parent / "manifest_long.json"
SHIPPED_COUNTDOWN_DIR = SHIPPED_DIR.parent / "model_files_countdown"
MANIFEST_COUNTDOWN = SHIPPED_DIR.parent / "manifest_countdown.json"
BUILTIN_MODELS: dict[str, tuple[Path, Path]] = {
    "builtin:tiny": (SHIPPED_DIR, MANIFEST),
    "builtin:tiny-long": (SHIPPED_LONG_DIR, MANIFEST_LONG),
    "builtin:tiny-countdown": (SHIPPED_COUNTDOWN_DIR, MANIFEST_COUNTDOWN),
}
"""The shipped models by name: (directory, manifest)."""
_REBUILD: dict[Path, str] = {
    MANIFEST: "speed-async make-tiny --out DIR",
    MANIFEST_LONG: "python -m speed_async.tiny.longstart DIR",
    MANIFEST_COUNTDOWN: "python -m speed_async.tiny.countdownstart DIR",
}
"""How to rebuild each shipped model from its recipe, by manifest."""
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
"""The files that make the model (build_info.json, also shipped and checked, records how it was built)."""


def default_cache_dir() -> Path:
    """``$SPEED_ASYNC_CACHE`` if set, else ``~/.cache/speed_async``."""
    return Path(os.environ.get("SPEED_ASYNC_CACHE") or Path.home() / ".cache" / "speed_async")


def file_digests(model_dir: Path, names: tuple[str, ...] | None = None) -> dict[str, str]:
    """{file name: sha256 hex} of `names` (default: every regular file) in `model_dir`."""
    model_dir = Path(model_dir)
    names = names if names is not None else tuple(sorted(p.name for p in model_dir.iterdir() if p.is_file()))
    out = {}
    for name in names:
        digest = hashlib.sha256()
        with (model_dir / name).open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
        out[name] = digest.hexdigest()
    return out


def read_manifest(path: Path = MANIFEST) -> dict:
    """The shipped manifest; ValueError naming it when it is missing or not one."""
    fix = "the installed package is damaged: reinstall speed-async (or `git checkout speed_async/tiny` in a checkout)"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} cannot be read ({err}): {fix}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "recipe_digest" not in manifest:
        raise ValueError(f"{path} is not a model manifest (no files and recipe_digest): {fix}")
    return manifest


def verify_model_dir(model_dir: Path, manifest: dict, manifest_path: Path = MANIFEST) -> None:
    """Check every file the manifest (read from `manifest_path`) names against its sha256; ValueError naming the
    first one that is missing or differs, and what to do."""
    for name, want in sorted(manifest["files"].items()):
        path = Path(model_dir) / name
        if not path.is_file():
            got = "is missing"
        else:
            digest = file_digests(Path(model_dir), (name,))[name]
            if digest == want:
                continue
            got = f"has sha256 {digest}, the manifest {manifest_path} says {want}"
        shipped = next((d.name for d, m in BUILTIN_MODELS.values() if m == Path(manifest_path)), SHIPPED_DIR.name)
        rebuild = _REBUILD.get(Path(manifest_path), _REBUILD[MANIFEST])
        raise ValueError(
            f"the shipped tiny model's file {path} {got}: the installed copy is damaged or was changed. Reinstall "
            f"speed-async (in a checkout: `git checkout speed_async/tiny/{shipped}`), or rebuild a model from the "
            f"recipe with `{rebuild}` and set model.path=DIR (a rebuild may differ on another CPU)"
        )


def shipped_model_dir(name: str = "builtin:tiny") -> Path:
    """The directory of shipped model `name` (a key of BUILTIN_MODELS), checked file by file against its manifest."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"model {name!r} is not a shipped model; allowed: {sorted(BUILTIN_MODELS)}")
    model_dir, manifest_path = BUILTIN_MODELS[name]
    verify_model_dir(model_dir, read_manifest(manifest_path), manifest_path)
    return model_dir


def resolve_builtin(path: str) -> Path | None:
    """The checked directory of a shipped model named `path` (`builtin:tiny`, `builtin:tiny-long`,
    `builtin:tiny-countdown`); None for a path that does not start with ``builtin:``; ValueError naming the allowed
    names for an unknown ``builtin:`` one."""
    if not path.startswith("builtin:"):
        return None
    return shipped_model_dir(path)


def ensure_tiny_model(
    cache_dir: Path | None = None,
    seed: int = 0,
    *,
    steps: int | None = None,
    recipe: TinyRecipe | None = None,
    lock_timeout_s: float = 1800.0,
) -> Path:
    """The tiny model of `recipe` (default `TinyRecipe()`; `seed` and `steps` override its fields): the shipped
    copy when it is the recipe the shipped model was built from (checked by digest; `cache_dir` is then not
    used), otherwise the build cached in `cache_dir` (see `build_cached`)."""
    manifest = read_manifest()
    if recipe is None and seed == 0 and steps is None:
        return shipped_model_dir()  # the default recipe: decided without importing torch
    from speed_async.tiny import warmstart

    resolved = warmstart.resolve_recipe(seed, steps, recipe)
    if resolved.digest() == manifest["recipe_digest"]:
        return shipped_model_dir()
    return build_cached(cache_dir, recipe=resolved, lock_timeout_s=lock_timeout_s)


def build_cached(cache_dir: Path | None = None, *, recipe: TinyRecipe, lock_timeout_s: float = 1800.0) -> Path:
    """The model directory ``<cache>/tiny-<recipe digest>``, built from `recipe` first if it is missing.

    `cache_dir` defaults to `default_cache_dir()`. Safe against crashes (temporary directory renamed into
    place) and against concurrent callers (an fcntl lock per recipe: a caller waits up to `lock_timeout_s`
    for another one's build, then raises TimeoutError naming the lock file).
    """
    from speed_async.tiny import warmstart

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / f"tiny-{recipe.digest()}"
    if (final / "build_info.json").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    lock_path = cache / f"tiny-{recipe.digest()}.lock"
    with open(lock_path, "w") as lock:
        _lock(lock, lock_path, lock_timeout_s)
        if (final / "build_info.json").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-tiny-{recipe.digest()}-", dir=cache))
        try:
            warmstart.build_tiny(tmp, recipe=recipe, seed=recipe.seed)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def compare_with_shipped(model_dir: Path) -> list[str]:
    """The model files (MODEL_FILES) in which `model_dir` differs from the shipped model; [] when it holds the
    same bytes."""
    shipped = read_manifest()["files"]
    present = tuple(name for name in MODEL_FILES if (Path(model_dir) / name).is_file())
    built = file_digests(Path(model_dir), present)
    return [name for name in MODEL_FILES if built.get(name) != shipped.get(name)]


def write_manifest(model_dir: Path, recipe_digest: str, path: Path = MANIFEST) -> None:
    """Record the sha256 of every file of `model_dir` as the shipped manifest (when the shipped model is
    replaced by a new build: copy it into SHIPPED_DIR first)."""
    manifest = {"recipe_digest": recipe_digest, "files": file_digests(Path(model_dir))}
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _lock(lock: IO[str], path: Path, timeout_s: float) -> None:
    """Take the exclusive fcntl lock on `lock`, polling; TimeoutError naming `path` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"another process has held {path} for over {timeout_s:.0f} s: it builds the tiny model there "
                    "(or hangs doing so; the lock goes when that process ends)"
                ) from None
            time.sleep(0.5)
