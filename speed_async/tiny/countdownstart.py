"""Build `builtin:tiny-countdown`: the shipped tiny model, warm-started further on the Countdown task.

The Countdown task (`speed_async.data.countdown`) asks for the operations of a solution, each with its result,
then the expression in ``<answer>`` tags (``7*3=21, 21-5=16. <answer>(7*3)-5</answer>``). The tiny model
(`builtin:tiny`) already writes digits and column sums; this recipe continues its supervised warm start on the
Countdown train split, the prompt being the problem with `countdown.INSTRUCTION` (what
`configs/tiny-cpu-countdown.toml` appends as data.prompt_suffix). Short on purpose: the model learns the format
and the operations, but has to guess the order and the first operators of a solution (only the last one can be
worked out from the target), so its per-prompt pass rates spread between 0 and 1, which leaves RL room to
improve them. The evaluation scores with the task's reward (`speed_async.rewards.countdown`).

Like the tiny build it runs in a process of its own with AVX2-pinned numerics (`warmstart.pinned_numerics`);
the built bytes ship in speed_async/tiny/model_files_countdown (see `speed_async.tiny.store`).

    python -m speed_async.tiny.countdownstart OUT_DIR      # build with the default recipe
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2ForCausalLM

from speed_async.data import countdown
from speed_async.data.records import PromptRecord
from speed_async.rewards.countdown import score_countdown
from speed_async.tiny.further import begin_build, build_main, finish_build
from speed_async.tiny.warmstart import _collate, _generate, fit, set_cpu_threads

COUNTDOWN_RECIPE_VERSION = "tiny-countdown-v1"
"""Bump when the Countdown task or the training code changes what the recipe builds."""
PROGRESS_EVERY = 50
"""Steps between the build's progress lines."""


@dataclass(frozen=True)
class CountdownRecipe:
    """Everything that determines the `builtin:tiny-countdown` build (its hash is recorded with the shipped bytes)."""

    base_digest: str = "4aef685f8d8f"
    """Recipe digest of the model it starts from: the shipped `builtin:tiny` (checked before building)."""
    seed: int = 0
    """Seed of the data split, the batch order and the evaluation's sampling."""
    steps: int = 600
    """Supervised optimizer steps on the Countdown train split."""
    batch_size: int = 32
    """Sequences per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay to 10%)."""
    warmup_steps: int = 30
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    eval_prompts: int = 200
    """Held-out problems evaluated at the end of the build (recorded in build_info.json)."""
    eval_n: int = 8
    """Samples per prompt at temperature 1 in that evaluation."""
    max_new_tokens: int = 64
    """Response length limit when evaluating (the longest target is 50 tokens; configs/tiny-cpu-countdown.toml
    generates up to 64)."""
    version: str = COUNTDOWN_RECIPE_VERSION
    """Recipe version string."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_prompts", "eval_n", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"CountdownRecipe.{name}={getattr(self, name)} is not allowed; allowed: >= 1")
        if self.lr <= 0:
            raise ValueError(f"CountdownRecipe.lr={self.lr} is not allowed; allowed: > 0")

    def digest(self) -> str:
        """12 hex digits of the sha256 of the recipe's JSON form."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class CountdownEval:
    """Held-out evaluation with the Countdown reward over `num_prompts` problems."""

    num_prompts: int
    n: int
    sampled_accuracy: float
    """Mean reward of the n samples per prompt at temperature 1."""
    greedy_accuracy: float
    """Accuracy of one greedy response per prompt."""
    valid_answers: float
    """Share of the sampled responses whose answer is a well-formed expression over the given numbers."""
    pass_histogram: list[int]
    """pass_histogram[k] = number of prompts with exactly k of n samples correct (n + 1 bins)."""
    sampled_accuracy_by_level: dict[int, float]


def prompt_text(problem: str) -> str:
    """The prompt the model is trained and evaluated on: the problem with data.prompt_suffix =
    `countdown.INSTRUCTION`, as configs/tiny-cpu-countdown.toml prompts it."""
    return problem + countdown.INSTRUCTION


def _examples(tokenizer: PreTrainedTokenizerFast, records: Sequence[PromptRecord]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + eos) per record, tokenized separately as in RL."""
    prompts = tokenizer([prompt_text(str(r.prompt)) for r in records])["input_ids"]
    responses = tokenizer([str(r.extra["solution"]) for r in records])["input_ids"]
    return [(p, [*r, tokenizer.eos_token_id]) for p, r in zip(prompts, responses, strict=True)]


def warm_start(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, recipe: CountdownRecipe) -> list[float]:
    """Train `model` in place on the Countdown train split (loss on response tokens); returns the loss per step."""
    train = countdown.load_split("train", seed=recipe.seed)
    rng = random.Random(f"tiny-countdown-{recipe.seed}")
    started = time.monotonic()

    def next_batch(step: int) -> dict[str, torch.Tensor]:
        return _collate(_examples(tokenizer, rng.sample(train, recipe.batch_size)), tokenizer.pad_token_id)

    def progress(step: int, losses: list[float]) -> None:
        if (step + 1) % PROGRESS_EVERY == 0:
            recent = sum(losses[-PROGRESS_EVERY:]) / PROGRESS_EVERY
            print(f"step {step + 1}/{recipe.steps} loss {recent:.4f} ({time.monotonic() - started:.0f} s)", flush=True)

    return fit(model, recipe, next_batch, progress)


def evaluate(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    records: Sequence[PromptRecord],
    *,
    n: int = 8,
    max_new_tokens: int = 64,
    chunk_prompts: int = 50,
    seed: int = 0,
) -> CountdownEval:
    """Sample `n` responses per record at temperature 1 and one greedy response; score with the Countdown reward."""
    torch.manual_seed(seed)
    model.eval()
    passes, greedy_hits, valid = [], 0, 0.0
    for start in range(0, len(records), chunk_prompts):
        chunk = records[start : start + chunk_prompts]
        problems = [str(r.prompt) for r in chunk]
        sampled = _generate(
            model, tokenizer, problems, n=n, greedy=False, max_new_tokens=max_new_tokens, prompt=prompt_text
        )
        greedy = _generate(
            model, tokenizer, problems, n=1, greedy=True, max_new_tokens=max_new_tokens, prompt=prompt_text
        )
        for i, record in enumerate(chunk):
            scores = [score_countdown(s, record.ground_truth, record.extra) for s in sampled[i * n : (i + 1) * n]]
            passes.append(int(sum(s["score"] for s in scores)))
            valid += sum(s["valid"] for s in scores)
            greedy_hits += int(score_countdown(greedy[i], record.ground_truth, record.extra)["score"])
    by_level: dict[int, list[int]] = {}
    for record, k in zip(records, passes, strict=True):
        by_level.setdefault(int(record.extra["level"]), []).append(k)
    return CountdownEval(
        num_prompts=len(records),
        n=n,
        sampled_accuracy=sum(passes) / (n * len(records)),
        greedy_accuracy=greedy_hits / len(records),
        valid_answers=valid / (n * len(records)),
        pass_histogram=[passes.count(k) for k in range(n + 1)],
        sampled_accuracy_by_level={lv: sum(ks) / (n * len(ks)) for lv, ks in sorted(by_level.items())},
    )


def machine() -> dict[str, Any]:
    """Where a build runs: the CPU's model name, architecture and core count (recorded in build_info.json)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "arch": platform.machine(), "cores": os.cpu_count()}


def build_tiny_countdown(out_dir: Path, base_dir: Path, recipe: CountdownRecipe | None = None) -> Path:
    """Build the Countdown model into `out_dir` (new or empty) from the tiny model in `base_dir`; returns it.

    Writes the tokenizer (the base's), config.json, generation_config.json, model.safetensors and
    build_info.json (recipe, machine, date, timings, the held-out evaluation per level).
    """
    recipe = recipe or CountdownRecipe()
    if not begin_build(out_dir, base_dir, recipe, module="speed_async.tiny.countdownstart", what="tiny-countdown"):
        return Path(out_dir)
    started = time.monotonic(), time.process_time()
    threads = set_cpu_threads()
    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = Qwen2ForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    losses = warm_start(model, tokenizer, recipe)
    train_seconds = time.monotonic() - started[0]
    print(f"trained in {train_seconds:.0f} s; evaluating", flush=True)
    held_out = countdown.load_split("test", seed=recipe.seed)[: recipe.eval_prompts]
    result = evaluate(
        model, tokenizer, held_out, n=recipe.eval_n, max_new_tokens=recipe.max_new_tokens, seed=recipe.seed
    )
    described = {
        "task": "builtin:countdown",
        "prompt_suffix": countdown.INSTRUCTION,
        "machine": machine(),
        "built_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return finish_build(
        out_dir, base_dir, model, recipe, described,
        started=started, train_seconds=train_seconds, threads=threads, losses=losses, result=result,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(build_main(None, "speed_async.tiny.countdownstart", CountdownRecipe, build_tiny_countdown))
