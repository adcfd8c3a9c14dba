"""What the further warm starts share (`longstart`, `countdownstart`): a build that continues the shipped
`builtin:tiny` into a new directory, in a process with pinned numerics, recorded in build_info.json.

A recipe here is a frozen dataclass with `seed`, `base_digest` (the recipe digest of the model it starts from)
and a `digest()` method. `begin_build` checks the directories and, when this process's numerics are not the
pinned ones, runs the whole build in a fresh ``python -m <module>`` that has them; `finish_build` writes the
model, the base's tokenizer and build_info.json; `build_main` is each module's command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2ForCausalLM

from speed_async.tiny.warmstart import pinned_numerics, run_build_process


def begin_build(out_dir: Path, base_dir: Path, recipe: Any, *, module: str, what: str) -> bool:
    """Check that `out_dir` is new or empty and that `base_dir` was built by `recipe.base_digest`, then create
    `out_dir`. Returns True when the build is to run in this process; False when it has already run, in a
    ``python -m <module> OUT_DIR --base ... --recipe ...`` process with the pinned numerics (torch reads them
    once, at start-up)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"out_dir={str(out_dir)!r} is not empty; the {what} build needs a new or empty directory")
    base_info = json.loads((Path(base_dir) / "build_info.json").read_text())
    if base_info["recipe_digest"] != recipe.base_digest:
        raise ValueError(
            f"base model {base_dir} was built by recipe {base_info['recipe_digest']}, "
            f"{type(recipe).__name__}.base_digest is {recipe.base_digest}: start from the shipped builtin:tiny"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    pins = pinned_numerics()
    if all(os.environ.get(name) == value for name, value in pins.items()):
        return True
    args = ["--base", str(base_dir), "--recipe", json.dumps(dataclasses.asdict(recipe))]
    run_build_process(module, what, out_dir, args, pins)
    return False


def finish_build(
    out_dir: Path,
    base_dir: Path,
    model: Qwen2ForCausalLM,
    recipe: Any,
    described: dict[str, Any],
    *,
    started: tuple[float, float],
    train_seconds: float,
    threads: int,
    losses: list[float],
    result: Any,
) -> Path:
    """Save `model` and the base's tokenizer (byte for byte) into `out_dir` and write build_info.json: the recipe,
    `described` (what the build is: task, prompt, machine, ...), then the numerics, timings (`started`: the
    monotonic and process clocks at the build's start), final loss and the evaluation `result` (a dataclass)."""
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(base_dir) / name, out_dir / name)
    info: dict[str, Any] = {
        "recipe": dataclasses.asdict(recipe),
        "recipe_digest": recipe.digest(),
        **described,
        "torch_threads": threads,
        "numerics": {"env": pinned_numerics(), "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "train_seconds": round(train_seconds, 2),
        "build_seconds": round(time.monotonic() - started[0], 2),
        "build_cpu_seconds": round(time.process_time() - started[1], 2),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "eval": dataclasses.asdict(result),
    }
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def build_main(argv: list[str] | None, module: str, recipe_type: type, build: Callable[..., Path]) -> int:
    """The command line of a further warm start: build into OUT_DIR from --base (default: the shipped
    builtin:tiny) with --recipe (JSON; default: the recipe's defaults)."""
    import argparse

    from speed_async.tiny.store import shipped_model_dir

    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=build_main.__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--base", type=Path, default=None)
    parser.add_argument("--recipe", default=None)
    args = parser.parse_args(argv)
    recipe = recipe_type(**json.loads(args.recipe)) if args.recipe else recipe_type()
    build(args.out_dir, args.base or shipped_model_dir(), recipe)
    print(f"built {args.out_dir}")
    return 0
