"""The peer arm of `benchmarks/vs_trl.py`: TRL's synchronous `GRPOTrainer` on the embedded task, timed like a
speed-async run.

One process trains (HF `generate`, or TRL's colocated vLLM with `--use-vllm`), with the settings speed-async's
config file gives (prompts per step, samples per prompt, learning rate and warm-up, AdamW weight decay, gradient
clip, response length, temperature) and in the precision the config gives the learner (`model.train_dtype`,
`auto` resolved as speed-async's learner resolves it: `bf16=True`, HF's autocast, with the same attention choice);
beta 0 (no reference model), one optimizer step per batch (TRL then takes
pi_old from the training forward). A callback writes a snapshot of the model (HF format) every `--eval-every`
steps and at the end; the time spent writing snapshots is left out of the training clock, and the run stops at
the first step end past `--budget-s` seconds of training. Then the snapshots are evaluated with
`speed-async eval`'s evaluator (the vLLM engine, the same prompts, samples per prompt, temperature and response
length as speed-async's in-run evaluation), in a process of their own. Writes `<out>/trl_curve.json`:

    {"evals": [{"step", "train_s", "acc"}, ...], "steps": [{"step", "train_s", "step_s", "reward", ...}], ...}

    python benchmarks/trl_peer.py --out DIR [--config configs/tiny-cpu-hardmix.toml] [--use-vllm] [--seed 0]

TRL is an optional extra: `pip install -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INSTALL_HINT = 'TRL is not installed: pip install -e ".[bench]" (or: pip install "trl>=1.16" datasets)'


def require_trl() -> None:
    """Exit with the install command when TRL is missing."""
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit(INSTALL_HINT)


def _train_rows(config: Any) -> list[dict[str, str]]:
    """{"prompt", "answer"} of every training prompt, rendered exactly as speed-async renders them."""
    from speed_async.data.sources import read_prompt_file
    from speed_async.data.templates import render_prompt

    rows = []
    for name in config.data.train_files:
        for record in read_prompt_file(name).records:
            text = render_prompt(record, suffix=config.data.prompt_suffix, chat_template=config.data.chat_template)
            rows.append({"prompt": text, "answer": record.ground_truth})
    return rows


def math_reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """speed-async's reward (Math-Verify, gold answer in \\boxed{}), called by TRL in its main thread."""
    from speed_async.rewards.math_verify_reward import score_math

    return [score_math(text, gold) for text, gold in zip(completions, answer, strict=True)]


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train with TRL until the budget; returns the step log and the snapshot list."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from speed_async.config import load_config
    from speed_async.learner.model import attention_implementation, compute_dtype

    config = load_config(ROOT / args.config, args.set)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    snaps = out / "snapshots"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = compute_dtype(config.model, device) == "bfloat16"
    attention = attention_implementation(config.model, device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=attention)
    rollout, optim = config.rollout, config.optim
    n = rollout.n + rollout.n_continue if config.curriculum.mode == "speed" else rollout.n
    n = args.num_generations or n
    batch = config.data.train_batch_size
    settings = GRPOConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=batch * n,
        num_generations=n,
        max_completion_length=rollout.max_response_length,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        learning_rate=optim.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=optim.warmup_steps,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.beta1,
        adam_beta2=optim.beta2,
        max_grad_norm=optim.grad_clip,
        beta=0.0,
        num_iterations=1,
        max_steps=args.max_steps,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=bf16,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_vllm=args.use_vllm,
        vllm_mode="colocate",
        vllm_max_model_length=config.data.max_prompt_length + rollout.max_response_length,
        vllm_gpu_memory_utilization=rollout.gpu_memory_utilization,
    )
    clock = _Clock(args.budget_s, args.eval_every, snaps, tokenizer)
    clock.snapshot(model, 0, 0.0)  # version 0: the model before training
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=math_reward,
        args=settings,
        train_dataset=Dataset.from_list(_train_rows(config)),
        processing_class=tokenizer,
        callbacks=[clock.callback(TrainerCallback)],
    )
    clock.start()
    trainer.train()
    precision = {"bf16": bf16, "attn_implementation": attention}
    return {"steps": clock.steps, "snapshots": clock.snapshots, "threads": torch.get_num_threads(), "n": n, **precision}


class _Clock:
    """Training time (snapshot writing left out), per-step records, snapshots and the budget stop."""

    def __init__(self, budget_s: float, eval_every: int, snaps: Path, tokenizer: Any) -> None:
        self.budget_s, self.eval_every, self.snaps, self.tokenizer = budget_s, eval_every, snaps, tokenizer
        self.t0 = self.last = 0.0
        self.excluded = 0.0
        self.steps: list[dict[str, float]] = []
        self.snapshots: list[dict[str, Any]] = []

    def start(self) -> None:
        self.t0 = self.last = time.perf_counter()

    def train_s(self) -> float:
        return time.perf_counter() - self.t0 - self.excluded

    def snapshot(self, model: Any, step: int, train_s: float) -> None:
        start = time.perf_counter()
        path = self.snaps / f"step-{step}"
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.snapshots.append({"step": step, "train_s": train_s, "path": str(path)})
        self.excluded += time.perf_counter() - start

    def callback(self, base: type) -> Any:
        clock = self

        class Callback(base):  # type: ignore[misc, valid-type]
            def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
                now = time.perf_counter()
                train_s = clock.train_s()
                clock.steps.append({"step": state.global_step, "train_s": train_s, "step_s": now - clock.last})
                over = train_s >= clock.budget_s
                if over or state.global_step % clock.eval_every == 0:
                    clock.snapshot(model, state.global_step, train_s)
                if over:
                    control.should_training_stop = True
                clock.last = time.perf_counter()

            def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **_: Any) -> None:
                if logs and clock.steps and "reward" in logs:
                    keep = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length")
                    clock.steps[-1].update({k: float(logs[k]) for k in keep if k in logs})

        return Callback()


def evaluate_snapshots(snapshots: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Accuracy (mean@n) of each snapshot with speed-async's evaluator; run in a process of its own."""
    from launcher.evaluate import EvalSettings, evaluate
    from speed_async.config import load_config

    config = load_config(ROOT / args.config, args.set)
    settings = EvalSettings(
        n=config.trainer.eval_n if args.eval_n is None else args.eval_n,
        max_prompts=config.trainer.eval_max_prompts if args.eval_prompts is None else args.eval_prompts,
        max_tokens=config.rollout.max_response_length,
        temperature=config.rollout.temperature,
        top_p=config.rollout.top_p,
        seed=args.seed,
        dtype=config.model.engine_dtype,
        device="auto",
        enforce_eager=True,
        reward_workers=1,
    )
    evals = []
    for snap in snapshots:
        start = time.perf_counter()
        result = evaluate(snap["path"], list(config.data.eval_files), settings)
        source = next(iter(result["sources"].values()))
        evals.append({**snap, "acc": float(source["acc"]), "eval_s": time.perf_counter() - start})
        print(f"trl eval step {snap['step']}: {evals[-1]['acc']:.3f}", flush=True)
    return evals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for snapshots and trl_curve.json")
    parser.add_argument("--config", default="configs/tiny-cpu-hardmix.toml", help="speed-async config to mirror")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=150.0, help="seconds of training")
    parser.add_argument("--max-steps", type=int, default=100000)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-n", type=int, default=None, help="default: the config's trainer.eval_n")
    parser.add_argument("--eval-prompts", type=int, default=None, help="default: trainer.eval_max_prompts")
    parser.add_argument("--num-generations", type=int, default=0, help="default: n + n_continue (SPEED) or n")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--use-vllm", action="store_true", help="TRL's colocated vLLM instead of HF generate")
    parser.add_argument("--evaluate-only", action="store_true", help="(internal) evaluate <out>/trl_train.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.evaluate_only:
        trained = json.loads((args.out / "trl_train.json").read_text())
        trained["evals"] = evaluate_snapshots(trained["snapshots"], args)
        (args.out / "trl_curve.json").write_text(json.dumps(trained, indent=1))
        return 0
    require_trl()
    if args.use_vllm:  # its engine gets a speed-async sampler's huge pages (its trainer's tensors too: TRL's favour)
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    trained = train(args)
    (args.out / "trl_train.json").write_text(json.dumps(trained, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
