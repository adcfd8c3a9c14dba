"""Build the tiny default model: tokenizer, random Qwen2, a short supervised warm start, an evaluation, a cache.

The warm start is deliberately short: the model learns the response format and most of the column steps,
but its distribution stays broad, so its temperature-1 accuracy sits well below its greedy accuracy and
its per-prompt pass rates spread from 0/8 to 8/8 across the difficulty ladder. That leaves room that RL
can reach in minutes.

Prompt format (what the sampler must feed, `render_prompt(..., chat_template=False)`):
``problem + INSTRUCTION_SUFFIX`` tokenized on its own, then the response tokens, then ``<|endoftext|>``.

The package ships the model this recipe built on an AVX2 machine (speed_async.tiny.store): that copy is
what `builtin:tiny` resolves to. ``store.build_cached()`` builds a recipe into ``<cache>/tiny-<recipe hash>``
once: into a temporary directory that is renamed into place, under an fcntl lock, so a crash leaves no half
model and concurrent callers build it once.

The warm start runs in a process of its own with ATen's vectorised kernels and MKL pinned to AVX2
(`pinned_numerics`), so that x86-64 machines with and without AVX-512 compute the same floats. Unpinned, 400
steps amplify the last-bit differences of AVX-512 kernels into another model (measured: 0.47 instead of 0.64
sampled accuracy); pinned, an AVX-512 machine built exactly the model (same held-out numbers and histogram)
that earlier sessions' machines had built. The pin does not cover every CPU: a machine with AVX-512-FP16 and
AMX built another model under it (0.671 / 0.850), which is why the built bytes are shipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from speed_async.data.arithmetic import load_split, solution_text
from speed_async.data.records import PromptRecord
from speed_async.data.templates import INSTRUCTION_SUFFIX
from speed_async.tiny.model import TinyModelSpec, build_model, num_parameters, padded_vocab_size, tiny_config
from speed_async.tiny.tokenizer import build_tokenizer

RECIPE_VERSION = "tiny-arith-v2"
"""Bump when the task, the tokenizer or the training code changes what a recipe builds (v2: numerics pinned to
AVX2, so that v1 caches built on AVX-512 machines, which hold another model, are not reused)."""
BUILD_TIMEOUT_S = 3600.0
"""Longest a build process may take (about 80 s on 2 idle cores)."""

_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that determines the built model; its hash names the cache directory."""

    seed: int = 0
    """Seed of the data split, the initialisation and the batch order."""
    vocab_size: int = 512
    """Upper bound of the BPE vocabulary (the task text saturates it earlier)."""
    model: TinyModelSpec = field(default_factory=TinyModelSpec)
    """Shape of the model."""
    steps: int = 400
    """Supervised optimizer steps."""
    batch_size: int = 32
    """Sequences per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay to 10%)."""
    warmup_steps: int = 30
    """Linear warm-up steps (capped at `steps`)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    eval_prompts: int = 200
    """Held-out prompts evaluated during the build (recorded in build_info.json)."""
    eval_n: int = 8
    """Samples per prompt at temperature 1 in that evaluation."""
    max_new_tokens: int = 64
    """Response length limit when evaluating."""
    version: str = RECIPE_VERSION
    """Recipe version string."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_prompts", "eval_n", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is not allowed; allowed: >= 1")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} is not allowed; allowed: >= 0")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} is not allowed; allowed: > 0")

    def digest(self) -> str:
        """12 hex digits of the sha256 of the recipe's JSON form."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class EvalResult:
    """Held-out evaluation: accuracies and the pass-rate histogram over `num_prompts` prompts."""

    num_prompts: int
    n: int
    sampled_accuracy: float
    """Mean reward of the n samples per prompt at temperature 1."""
    greedy_accuracy: float
    """Accuracy of one greedy response per prompt."""
    pass_histogram: list[int]
    """pass_histogram[k] = number of prompts with exactly k of n samples correct (n + 1 bins)."""
    sampled_accuracy_by_level: dict[int, float]


def pinned_numerics() -> dict[str, str]:
    """The environment the warm start runs under: on x86-64, ATen's vectorised kernels at AVX2 width and MKL's
    conditional numerical reproducibility at AVX2, so that every machine with AVX2 computes the same floats.

    Measured on an AVX-512 machine (2026-12-01): unpinned it built a model of 0.47 sampled / 0.55 greedy
    accuracy, pinned the 0.641 / 0.815 model that AVX2 machines build; 1 and 2 threads built the same bytes.
    Empty on other architectures (the build there is reproducible on the same kind of CPU only).
    """
    if platform.machine().lower() in ("x86_64", "amd64"):
        return {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
    return {}


def set_cpu_threads() -> int:
    """Let torch use every core this process may run on; returns the count."""
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    return cores


def prompt_text(problem: str) -> str:
    """The prompt the tiny model is trained on: the problem followed by the paper's instruction."""
    return problem + INSTRUCTION_SUFFIX


def extract_boxed(response: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in `response` (no nested braces), or None."""
    found = _BOXED_RE.findall(response)
    return found[-1].strip() if found else None


def _encode_examples(
    tokenizer: PreTrainedTokenizerFast, records: Sequence[PromptRecord]
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + eos) per record, prompt and response tokenized separately as in RL."""
    problems = [str(r.prompt) for r in records]
    prompts = tokenizer([prompt_text(p) for p in problems])["input_ids"]
    responses = tokenizer([solution_text(p) for p in problems])["input_ids"]
    return [(p, [*r, tokenizer.eos_token_id]) for p, r in zip(prompts, responses, strict=True)]


def _collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels that are -100 except on response tokens."""
    length = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (prompt, response) in enumerate(examples):
        seq = prompt + response
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(prompt) : len(seq)] = torch.tensor(response)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lr_factor(step: int, recipe: TinyRecipe) -> float:
    """Linear warm-up to 1 (over at most `steps` steps), then cosine decay to 0.1 at the last step."""
    warmup = min(recipe.warmup_steps, recipe.steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, recipe.steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item())


def supervised_warm_start(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, recipe: TinyRecipe
) -> list[float]:
    """Train `model` in place on the train split (loss on response tokens only); returns the loss per step."""
    train = load_split("train", seed=recipe.seed)
    rng = random.Random(recipe.seed)

    def next_batch(step: int) -> dict[str, torch.Tensor]:
        return _collate(_encode_examples(tokenizer, rng.sample(train, recipe.batch_size)), tokenizer.pad_token_id)

    return fit(model, recipe, next_batch)


def fit(
    model: Qwen2ForCausalLM,
    recipe: Any,
    next_batch: Callable[[int], dict[str, torch.Tensor]],
    on_step: Callable[[int, list[float]], None] | None = None,
) -> list[float]:
    """The warm starts' training loop (`supervised_warm_start`, `longstart`, `countdownstart`): AdamW with
    `_lr_factor`'s schedule over `recipe.steps` steps of `next_batch(step)`, gradients clipped at 1;
    `on_step(step, losses)` after each.
    `recipe` needs lr, weight_decay, steps and warmup_steps. Leaves the model in eval mode; the loss per step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
    model.train()
    losses: list[float] = []
    for step in range(recipe.steps):
        loss = model(**next_batch(step)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses)
    model.eval()
    return losses


@torch.no_grad()
def _generate(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: Sequence[str],
    *,
    n: int,
    greedy: bool,
    max_new_tokens: int,
    prompt: Callable[[str], str] = prompt_text,
) -> list[str]:
    """n responses per problem (problem-major order), each problem rendered by `prompt`, batched with left
    padding."""
    tokenizer.padding_side = "left"
    enc = tokenizer([prompt(p) for p in problems], return_tensors="pt", padding=True)
    out = model.generate(
        **enc,
        do_sample=not greedy,
        temperature=None if greedy else 1.0,
        top_p=None if greedy else 1.0,
        top_k=None if greedy else 0,
        num_return_sequences=n,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def evaluate(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    records: Sequence[PromptRecord],
    *,
    n: int = 8,
    max_new_tokens: int = 64,
    chunk_prompts: int = 50,
    seed: int = 0,
) -> EvalResult:
    """Sample `n` responses per record at temperature 1 and one greedy response; score by exact boxed answer.

    The check is the plain string match of the last ``\\boxed{...}`` content against the ground truth (the
    arithmetic answers are integers, where Math-Verify agrees with it).
    """
    torch.manual_seed(seed)
    model.eval()
    passes, greedy_hits = [], 0
    for start in range(0, len(records), chunk_prompts):
        chunk = records[start : start + chunk_prompts]
        problems = [str(r.prompt) for r in chunk]
        sampled = _generate(model, tokenizer, problems, n=n, greedy=False, max_new_tokens=max_new_tokens)
        greedy = _generate(model, tokenizer, problems, n=1, greedy=True, max_new_tokens=max_new_tokens)
        for i, record in enumerate(chunk):
            passes.append(sum(extract_boxed(s) == record.ground_truth for s in sampled[i * n : (i + 1) * n]))
            greedy_hits += extract_boxed(greedy[i]) == record.ground_truth
    histogram = [0] * (n + 1)
    by_level: dict[int, list[int]] = {}
    for record, k in zip(records, passes, strict=True):
        histogram[k] += 1
        by_level.setdefault(int(record.extra.get("level", 0)), []).append(k)
    return EvalResult(
        num_prompts=len(records),
        n=n,
        sampled_accuracy=sum(passes) / (n * len(records)),
        greedy_accuracy=greedy_hits / len(records),
        pass_histogram=histogram,
        sampled_accuracy_by_level={lv: sum(ks) / (n * len(ks)) for lv, ks in sorted(by_level.items())},
    )


def resolve_recipe(seed: int, steps: int | None, recipe: TinyRecipe | None) -> TinyRecipe:
    """`recipe` (default `TinyRecipe()`) with `seed` and, if given, `steps` replaced."""
    recipe = recipe or TinyRecipe()
    return dataclasses.replace(recipe, seed=seed, steps=recipe.steps if steps is None else steps)


def build_tiny(out_dir: Path, *, seed: int = 0, steps: int | None = None, recipe: TinyRecipe | None = None) -> Path:
    """Build the tiny model into `out_dir` (created; must not hold files) and return it.

    `recipe` gives every hyperparameter (default `TinyRecipe()`); `seed` and `steps` override its fields.
    Writes tokenizer.json, tokenizer_config.json, config.json, generation_config.json, model.safetensors
    (float32) and build_info.json (recipe, build seconds, parameters, held-out evaluation).
    """
    recipe = resolve_recipe(seed, steps, recipe)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"out_dir={str(out_dir)!r} is not empty; build_tiny needs a new or empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    pins = pinned_numerics()
    if any(os.environ.get(name) != value for name, value in pins.items()):
        # torch reads these once, at start-up: build in a fresh interpreter that has them.
        _build_in_subprocess(out_dir, recipe, pins)
        return out_dir
    started, started_cpu = time.monotonic(), time.process_time()
    threads = set_cpu_threads()
    tokenizer = build_tokenizer(out_dir, vocab_size=recipe.vocab_size, seed=recipe.seed)
    config = tiny_config(
        recipe.model,
        vocab_size=padded_vocab_size(len(tokenizer)),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = build_model(config, seed=recipe.seed)
    losses = supervised_warm_start(model, tokenizer, recipe)
    train_seconds = time.monotonic() - started
    held_out = load_split("test", seed=recipe.seed)[: recipe.eval_prompts]
    result = evaluate(
        model, tokenizer, held_out, n=recipe.eval_n, max_new_tokens=recipe.max_new_tokens, seed=recipe.seed
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)
    info: dict[str, Any] = {
        "recipe": dataclasses.asdict(recipe),
        "recipe_digest": recipe.digest(),
        "num_parameters": num_parameters(model),
        "torch_threads": threads,
        "numerics": {"env": pinned_numerics(), "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "train_seconds": round(train_seconds, 2),
        "build_seconds": round(time.monotonic() - started, 2),
        "build_cpu_seconds": round(time.process_time() - started_cpu, 2),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "eval": dataclasses.asdict(result),
    }
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def _build_in_subprocess(out_dir: Path, recipe: TinyRecipe, pins: dict[str, str]) -> None:
    """`build_tiny(out_dir, recipe=recipe)` in ``python -m speed_async.tiny.warmstart`` with `pins` set."""
    run_build_process(
        "speed_async.tiny.warmstart", "tiny-model", out_dir, [json.dumps(dataclasses.asdict(recipe))], pins
    )


def run_build_process(module: str, what: str, out_dir: Path, args: Sequence[str], pins: dict[str, str]) -> None:
    """``python -m <module> <out_dir> <args>`` with the environment `pins` set (the builds' pinned numerics).

    Raises RuntimeError naming the `what` build and `out_dir`, with the tail of its output, when it fails or runs
    past BUILD_TIMEOUT_S.
    """
    argv = [sys.executable, "-m", module, str(out_dir), *args]
    try:
        done = subprocess.run(
            argv, env={**os.environ, **pins}, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"the {what} build into {out_dir} ran past {BUILD_TIMEOUT_S:.0f} s") from err
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise RuntimeError(f"the {what} build into {out_dir} exited with code {done.returncode}:\n{tail}")


def recipe_from_dict(values: dict[str, Any]) -> TinyRecipe:
    """Inverse of ``dataclasses.asdict(recipe)``."""
    return TinyRecipe(**{**values, "model": TinyModelSpec(**values["model"])})


if __name__ == "__main__":
    # The build process of `_build_in_subprocess`: out_dir, recipe as JSON.
    build_tiny(Path(sys.argv[1]), recipe=recipe_from_dict(json.loads(sys.argv[2])))
