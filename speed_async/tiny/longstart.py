"""Build `builtin:tiny-long`: the shipped tiny model, warm-started further on the long-tail sums task.

The long-tail task (`speed_async.data.sums`) asks for the same column-by-column steps as the arithmetic task,
with up to 12 operands of up to 14 digits, so responses run from about 20 to over 400 tokens. The tiny model
(`builtin:tiny`) already writes column steps for two operands; this recipe continues its supervised warm start
on the sums (context raised to `max_position_embeddings`: RoPE has no learned positions, so the weights carry
over unchanged), each step on one level's prompts (levels drawn uniformly, so the rare long ones are learned
too), and evaluates it per level. The result answers short sums often, long ones rarely: a spread of pass rates
and of response lengths, which is what `benchmarks/long_tail.py` needs.

Like the tiny build it runs in a process of its own with AVX2-pinned numerics (`warmstart.pinned_numerics`);
the built bytes ship in speed_async/tiny/model_files_long (see `speed_async.tiny.store`).

    python -m speed_async.tiny.longstart OUT_DIR      # build with the default recipe
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2ForCausalLM

from speed_async.data import sums
from speed_async.data.records import PromptRecord
from speed_async.tiny.further import begin_build, build_main, finish_build
from speed_async.tiny.warmstart import _collate, evaluate, fit, prompt_text, set_cpu_threads

LONG_RECIPE_VERSION = "tiny-long-v1"
"""Bump when the sums task or the training code changes what the recipe builds."""


@dataclass(frozen=True)
class LongRecipe:
    """Everything that determines the `builtin:tiny-long` build (its hash is recorded with the shipped bytes)."""

    base_digest: str = "4aef685f8d8f"
    """Recipe digest of the model it starts from: the shipped `builtin:tiny` (checked before building)."""
    seed: int = 0
    """Seed of the level order and the batches."""
    max_position_embeddings: int = 1024
    """Context of the new model (the longest sum's prompt and response take about 650 tokens)."""
    steps: int = 500
    """Supervised optimizer steps, each on `batch_size` prompts of one level."""
    batch_size: int = 32
    """Sequences per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay to 10%)."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    eval_prompts: int = 200
    """Held-out sums evaluated at the end of the build (recorded in build_info.json)."""
    eval_n: int = 8
    """Samples per prompt at temperature 1 in that evaluation."""
    max_new_tokens: int = 480
    """Response length limit when evaluating (the longest target is 437 tokens)."""
    version: str = LONG_RECIPE_VERSION
    """Recipe version string."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_prompts", "eval_n", "max_new_tokens", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"LongRecipe.{name}={getattr(self, name)} is not allowed; allowed: >= 1")
        if self.lr <= 0:
            raise ValueError(f"LongRecipe.lr={self.lr} is not allowed; allowed: > 0")

    def digest(self) -> str:
        """12 hex digits of the sha256 of the recipe's JSON form."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _examples(tokenizer: PreTrainedTokenizerFast, records: list[PromptRecord]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + eos) per record, tokenized separately as in RL."""
    prompts = tokenizer([prompt_text(str(r.prompt)) for r in records])["input_ids"]
    answers = tokenizer([sums.solution_text(str(r.prompt)) for r in records])["input_ids"]
    return [(p, [*a, tokenizer.eos_token_id]) for p, a in zip(prompts, answers, strict=True)]


def warm_start(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, recipe: LongRecipe) -> list[float]:
    """Train `model` in place on the sums train split, one level per step; returns the loss per step."""
    pools: dict[int, list[PromptRecord]] = {}
    for record in sums.load_split("train", seed=recipe.seed):
        pools.setdefault(int(record.extra["level"]), []).append(record)
    rng = random.Random(f"tiny-long-{recipe.seed}")
    levels: list[int] = []

    def next_batch(step: int) -> dict[str, torch.Tensor]:
        levels.append(rng.choice(sorted(pools)))
        return _collate(_examples(tokenizer, rng.sample(pools[levels[-1]], recipe.batch_size)), tokenizer.pad_token_id)

    def progress(step: int, losses: list[float]) -> None:
        if step % 50 == 0:
            print(f"step {step} level {levels[-1]} loss {losses[-1]:.4f}", flush=True)

    return fit(model, recipe, next_batch, progress)


def build_tiny_long(out_dir: Path, base_dir: Path, recipe: LongRecipe | None = None) -> Path:
    """Build the long-tail model into `out_dir` (new or empty) from the tiny model in `base_dir`; returns it.

    Writes the tokenizer (the base's), config.json (context raised), generation_config.json, model.safetensors
    and build_info.json (recipe, timings, the held-out evaluation per level).
    """
    recipe = recipe or LongRecipe()
    if not begin_build(out_dir, base_dir, recipe, module="speed_async.tiny.longstart", what="tiny-long"):
        return Path(out_dir)
    started = time.monotonic(), time.process_time()
    threads = set_cpu_threads()
    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = Qwen2ForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    model.config.max_position_embeddings = recipe.max_position_embeddings
    tokenizer.model_max_length = recipe.max_position_embeddings
    losses = warm_start(model, tokenizer, recipe)
    train_seconds = time.monotonic() - started[0]
    # Evaluated level by level (generation stops when a chunk's longest response ends).
    held_out = sorted(sums.load_split("test", seed=recipe.seed)[: recipe.eval_prompts], key=lambda r: r.extra["level"])
    result = evaluate(
        model, tokenizer, held_out, n=recipe.eval_n, max_new_tokens=recipe.max_new_tokens, chunk_prompts=25
    )
    return finish_build(
        out_dir, base_dir, model, recipe, {"task": "builtin:sums"},
        started=started, train_seconds=train_seconds, threads=threads, losses=losses, result=result,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(build_main(None, "speed_async.tiny.longstart", LongRecipe, build_tiny_long))
