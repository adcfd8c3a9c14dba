"""`speed-async eval`: mean@k accuracy of a saved HF model, per data source, on problem/answer files.

The same pieces as training's evaluation: `read_prompt_file` reads the sources, `PromptEncoder` renders each
problem with the instruction suffix (`--prompt-suffix`, default the paper's; never truncating), the vLLM
`Engine` samples `n` responses per prompt in one generate call per chunk of prompts, and a `RewardPool` scores
them under a time limit: with the data source's builtin reward function (`countdown`), else Math-Verify. A
prompt's accuracy is the mean score of its `n` samples; a source's accuracy (mean@n) is the mean over its
prompts, as in `eval/<source>/acc` of a training run.

Prompts longer than the model's context minus `max_tokens` cannot be sampled; they are left out and counted
per source (`overlong`), never truncated.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
"""vLLM settings for the CPU machines (../shared/docs/ENVIRONMENT.md); values already set are kept."""


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate; every field is a command-line option of `speed-async eval`."""

    n: int
    """Samples per prompt (accuracy is mean@n), >= 1."""
    max_prompts: int = 0
    """At most this many prompts per data file (its first rows); 0 means all."""
    max_tokens: int = 1024
    """Most tokens per response, >= 1."""
    temperature: float = 1.0
    """Sampling temperature, > 0 (the paper evaluates at 1.0)."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]."""
    seed: int = 0
    """Seed of the vLLM engine's sampler, >= 0. Requests carry no per-request seed: on vLLM CPU a seeded
    request whose prompt is prefilled in parts (a call over the scheduler's token budget) fails with
    "CPU Generator does not use offset"."""
    chunk_size: int = 128
    """Prompts per vLLM generate call, >= 1."""
    chat_template: bool = False
    """Render prompts with the tokenizer's chat template (as data.chat_template)."""
    prompt_suffix: str = " Let's think step by step and output the final answer within \\boxed{}."
    """Appended to every problem (as data.prompt_suffix; default: the paper's instruction)."""
    dtype: str = "auto"
    """vLLM dtype: float32, bfloat16, float16, or auto (bfloat16 on CUDA and on AMX CPUs, else float32)."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when torch sees a GPU)."""
    enforce_eager: bool = False
    """Skip torch.compile in vLLM (starts faster on CPU, generates slower)."""
    reward_workers: int = 2
    """Math-Verify worker processes, >= 1."""
    reward_timeout_s: float = 5.0
    """Per-response scoring limit in seconds (a response over it scores 0), > 0."""

    def __post_init__(self) -> None:
        checks = [
            ("--n", self.n, self.n >= 1, ">= 1"),
            ("--max-prompts", self.max_prompts, self.max_prompts >= 0, ">= 0 (0 means all)"),
            ("--max-tokens", self.max_tokens, self.max_tokens >= 1, ">= 1"),
            ("--temperature", self.temperature, self.temperature > 0, "> 0"),
            ("--top-p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
            ("--seed", self.seed, self.seed >= 0, ">= 0"),
            ("--chunk-size", self.chunk_size, self.chunk_size >= 1, ">= 1"),
            ("--dtype", self.dtype, self.dtype in ("auto", "float32", "bfloat16", "float16"), "auto|float32|..."),
            ("--device", self.device, self.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
            ("--reward-workers", self.reward_workers, self.reward_workers >= 1, ">= 1"),
            ("--reward-timeout-s", self.reward_timeout_s, self.reward_timeout_s > 0, "> 0"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} = {value!r} is invalid: allowed {allowed}")


def resolve_model_dir(model: str) -> Path:
    """`builtin:tiny` / `builtin:tiny-long` / `builtin:tiny-countdown` -> the shipped model; otherwise a directory
    holding an HF config.json."""
    if model.startswith("builtin:"):
        from speed_async.tiny.store import BUILTIN_MODELS, resolve_builtin

        if model not in BUILTIN_MODELS:
            raise ValueError(f"--model {model}: allowed builtin models: {sorted(BUILTIN_MODELS)}")
        return Path(str(resolve_builtin(model)))
    path = Path(model)
    if not path.is_dir():
        raise ValueError(
            f"--model {model}: not a directory (a saved HF model such as <run>/final_model, or builtin:tiny)"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {model}: no config.json in it, so it is not a saved Hugging Face model")
    return path


def context_limit(model_dir: Path) -> int:
    """The model's context length (max_position_embeddings of its config.json)."""
    config = json.loads((model_dir / "config.json").read_text())
    limit = config.get("max_position_embeddings")
    if not isinstance(limit, int) or limit < 2:
        raise ValueError(f"{model_dir / 'config.json'}: max_position_embeddings = {limit!r}; need an integer >= 2")
    return limit


def read_sources(files: Sequence[str], max_prompts: int) -> list[tuple[str, list[Any]]]:
    """(file, its first `max_prompts` records, or all of them) for each file; a bad file or row raises."""
    from speed_async.data.sources import read_prompt_file

    if not files:
        raise ValueError("--data: give at least one file (problem/answer .jsonl, VeRL .parquet or builtin:...)")
    loaded = []
    for name in files:
        records = read_prompt_file(name).records
        if not records:
            raise ValueError(f"--data {name}: no prompts in it")
        loaded.append((name, records[:max_prompts] if max_prompts else records))
    return loaded


def evaluate(model: str, files: Sequence[str], settings: EvalSettings) -> dict[str, Any]:
    """Sample, score and summarise; returns the result document (see `format_table` for its summary).

    Inputs are checked (model directory, every data file and row, the context) before anything heavy starts.
    """
    model_dir = resolve_model_dir(model)
    loaded = read_sources(files, settings.max_prompts)
    limit = context_limit(model_dir)
    if settings.max_tokens >= limit:
        raise ValueError(
            f"--max-tokens = {settings.max_tokens} leaves no room for a prompt in the model's context of {limit} tokens"
        )
    from transformers import AutoTokenizer

    from speed_async.data.templates import PromptEncoder

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    encoder = PromptEncoder(
        tokenizer,
        max_prompt_length=limit - settings.max_tokens,
        on_overlong="skip",
        suffix=settings.prompt_suffix,
        chat_template=settings.chat_template,
    )
    sources: dict[str, dict[str, Any]] = {}
    work = []
    for name, records in loaded:
        encoded, overlong = encoder.encode_all(records)
        source_of_row = {record.row: record.data_source for record in records}
        for source in dict.fromkeys(source_of_row.values()):
            entry = sources.setdefault(source, {"files": [], "prompts": 0, "overlong": 0})
            entry["files"].append(name)
        for item in overlong:
            sources[source_of_row[item.row]]["overlong"] += 1
        work += encoded
    if not work:
        raise ValueError(
            f"no prompt of {list(files)} fits the model's context of {limit} tokens with --max-tokens "
            f"{settings.max_tokens}; lower --max-tokens"
        )
    per_prompt, generated, reward_stats, timings = _sample_and_score(model_dir, work, tokenizer, settings, limit)
    for item in per_prompt:
        sources[item["source"]]["prompts"] += 1
    for source, entry in sources.items():
        means = [sum(p["scores"]) / len(p["scores"]) for p in per_prompt if p["source"] == source]
        entry["acc"] = sum(means) / len(means) if means else None
        entry["n"] = settings.n
    return {
        "model": str(model_dir.resolve()),
        "settings": asdict(settings),
        "sources": sources,
        "generated_tokens": generated,
        "reward_stats": reward_stats,
        "timings": timings,
        "per_prompt": per_prompt,
    }


def _sample_and_score(
    model_dir: Path, work: list[tuple[Any, list[int]]], tokenizer: Any, settings: EvalSettings, limit: int
) -> tuple[list[dict[str, Any]], int, dict[str, int], dict[str, float]]:
    """One generate call and one scoring batch per chunk: ([{source, row, scores}], generated tokens, the
    reward pool's stats (scored, timeouts, too_long, errors, worker_restarts), seconds spent starting the
    engine and reward workers, generating and scoring)."""
    import torch

    from speed_async.data.records import encode_extra
    from speed_async.rewards import RewardItem, RewardPool, effective_functions
    from speed_async.sampler.engine import Engine, SamplingSettings

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        for key, value in CPU_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
    max_model_len = min(limit, max(len(ids) for _, ids in work) + settings.max_tokens)
    per_prompt: list[dict[str, Any]] = []
    generated = 0
    timings = {"startup_s": 0.0, "generation_s": 0.0, "scoring_s": 0.0}
    start = time.perf_counter()
    pool = RewardPool(
        num_workers=settings.reward_workers, timeout_s=settings.reward_timeout_s, functions=effective_functions({})
    )
    with pool as rewards:
        engine = Engine(
            str(model_dir),
            device=device,
            dtype=settings.dtype,
            seed=settings.seed,
            max_model_len=max_model_len,
            enforce_eager=settings.enforce_eager,
        )
        timings["startup_s"] = time.perf_counter() - start
        sampling = SamplingSettings(
            temperature=settings.temperature, top_p=settings.top_p, max_tokens=settings.max_tokens, seed=None
        )
        try:
            for first in range(0, len(work), settings.chunk_size):
                chunk = work[first : first + settings.chunk_size]
                start = time.perf_counter()
                completions = engine.generate([ids for _, ids in chunk], [settings.n] * len(chunk), sampling)
                timings["generation_s"] += time.perf_counter() - start
                items = [
                    RewardItem(
                        tokenizer.decode(c.token_ids, skip_special_tokens=True),
                        record.ground_truth,
                        record.data_source,
                        encode_extra(record.extra),
                    )
                    for (record, _), group in zip(chunk, completions, strict=True)
                    for c in group
                ]
                start = time.perf_counter()
                scores = rewards.score_batch(items)
                timings["scoring_s"] += time.perf_counter() - start
                generated += sum(len(c.token_ids) for group in completions for c in group)
                for i, (record, _) in enumerate(chunk):
                    mine = scores[i * settings.n : (i + 1) * settings.n]
                    per_prompt.append({"source": record.data_source, "row": record.row, "scores": mine})
        finally:
            engine.close()
        return per_prompt, generated, rewards.stats(), {k: round(v, 3) for k, v in timings.items()}


def format_table(result: dict[str, Any]) -> str:
    """source | prompts | n | acc | overlong, one line per data source."""
    lines = [f"{'source':<24} {'prompts':>8} {'n':>4} {'acc':>7} {'overlong':>9}"]
    for source, entry in sorted(result["sources"].items()):
        acc = "-" if entry["acc"] is None else f"{entry['acc']:.4f}"
        lines.append(f"{source:<24} {entry['prompts']:>8} {entry['n']:>4} {acc:>7} {entry['overlong']:>9}")
    return "\n".join(lines)


def run_eval(model: str, files: Sequence[str], settings: EvalSettings, out: Path | None) -> int:
    """Evaluate, print the table and one JSON summary line, write the full result to `out`; returns 0."""
    result = evaluate(model, files, settings)
    print(format_table(result))
    summary = {source: entry["acc"] for source, entry in result["sources"].items()}
    print(
        json.dumps(
            {"acc": summary, "n": settings.n, "generated_tokens": result["generated_tokens"], **result["timings"]}
        )
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"results: {out}")
    return 0
