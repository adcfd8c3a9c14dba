"""`speed-async` entry point. Thin: parses arguments and defers torch / vLLM imports to the chosen command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

EPILOG = """examples:
  speed-async train --config configs/tiny-cpu.toml rollout.n=8 pipeline.max_staleness=2
  torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint node0:29500 \\
      -m speed_async train --config my.toml cluster.num_learner_ranks=4 cluster.bind_host=0.0.0.0
  speed-async make-tiny --out /tmp/tiny        # rebuild the shipped tiny model from its recipe
  speed-async config --config configs/tiny-cpu.toml --explain
  speed-async eval --model runs/x/final_model --data builtin:arithmetic/test --n 4 --max-tokens 64
  speed-async plot runs/a runs/b --out accuracy.png
"""


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (defaults apply to what it leaves out)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. rollout.n=8")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command (no heavy imports)."""
    parser = argparse.ArgumentParser(
        prog="speed-async",
        description="Asynchronous SPEED-RL: vLLM samplers screen prompts and stream scored groups to an FSDP2 "
        "learner under a staleness bound.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="run a training job on this machine (or, under torchrun, one worker of a multi-node run)"
    )
    _add_config_args(train)
    train.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue RUN_DIR from its newest complete checkpoint (its resolved_config.json; only "
        "trainer.total_steps=N may be given, to raise it)",
    )

    config = sub.add_parser("config", help="validate a config and print the resolved tree")
    _add_config_args(config)
    config.add_argument(
        "--explain",
        action="store_true",
        help="print every key with its documentation and the layer that set it (default, file, command line)",
    )

    tiny = sub.add_parser(
        "make-tiny",
        help="rebuild the embedded tiny Qwen2 model and tokenizer from its recipe (builtin:tiny is the shipped copy)",
    )
    tiny.add_argument("--out", type=Path, help="a new directory to build into (default: the cache, built once)")
    tiny.add_argument("--seed", type=int, default=0)

    _add_eval_parser(sub)
    plot = sub.add_parser("plot", help="plot held-out accuracy against wall-clock and RL steps for several runs")
    plot.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (metrics.jsonl)")
    plot.add_argument("--out", type=Path, required=True, help="the figure to write, e.g. accuracy.png")
    return parser


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="mean@k accuracy of a saved HF model per data source (vLLM + Math-Verify)")
    ev.add_argument(
        "--model",
        required=True,
        help="a saved HF model directory (e.g. <run>/final_model) or a shipped model: builtin:tiny, builtin:tiny-long, "
        "builtin:tiny-countdown",
    )
    ev.add_argument(
        "--data",
        required=True,
        action="extend",
        nargs="+",
        metavar="FILE",
        help="problem/answer .jsonl, VeRL .parquet, builtin:arithmetic/<split> or builtin:countdown/<split>; "
        "repeat for several",
    )
    ev.add_argument("--n", type=int, required=True, help="samples per prompt (accuracy is mean@n)")
    ev.add_argument("--max-prompts", type=int, default=0, help="first M prompts of each file (default 0: all)")
    ev.add_argument("--max-tokens", type=int, default=1024, help="most tokens per response (default 1024)")
    ev.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    ev.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default 1.0)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the vLLM engine's sampler (default 0)")
    ev.add_argument("--chunk-size", type=int, default=128, help="prompts per vLLM generate call (default 128)")
    ev.add_argument("--chat-template", action="store_true", help="render prompts with the tokenizer's chat template")
    ev.add_argument(
        "--prompt-suffix",
        default=None,
        help="appended to every problem (default: the paper's math instruction; as data.prompt_suffix)",
    )
    ev.add_argument("--dtype", default="auto", help="vLLM dtype: auto, float32, bfloat16, float16 (default auto)")
    ev.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    ev.add_argument("--enforce-eager", action="store_true", help="no torch.compile in vLLM (faster start on CPU)")
    ev.add_argument("--reward-workers", type=int, default=2, help="Math-Verify worker processes (default 2)")
    ev.add_argument("--reward-timeout-s", type=float, default=5.0, help="per-response scoring limit (default 5)")
    ev.add_argument("--out", type=Path, help="write the full results (per source and per prompt) as JSON")


def _load(args: argparse.Namespace):
    from speed_async.config import load_config

    return load_config(args.config, args.overrides)


def _cmd_config(args: argparse.Namespace) -> int:
    import json

    from speed_async.config import config_to_dict, field_docs
    from speed_async.config.loader import explain_config

    if not args.explain:
        print(json.dumps(config_to_dict(_load(args)), indent=2))
        return 0
    config, origins = explain_config(args.config, args.overrides)
    docs = field_docs()
    for section, values in config_to_dict(config).items():
        print(f"[{section}]")
        for key, value in values.items():
            print(f"  {key} = {json.dumps(value)}    ({origins.get(f'{section}.{key}', 'default')})")
            print(f"      {docs.get(f'{section}.{key}', '')}")
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from speed_async.tiny import store, warmstart

    recipe = warmstart.resolve_recipe(args.seed, None, None)
    path = warmstart.build_tiny(args.out, recipe=recipe) if args.out else store.build_cached(recipe=recipe)
    print(f"tiny model built from its recipe: {path}")
    if recipe.digest() == store.read_manifest()["recipe_digest"]:
        differ = store.compare_with_shipped(path)
        print(
            f"it differs from the shipped model (builtin:tiny) in {', '.join(differ)}: this CPU's arithmetic is "
            "not the build machine's; set model.path to use it"
            if differ
            else "the same bytes as the shipped model (builtin:tiny)"
        )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from launcher.cluster import run_worker, under_torchrun
    from launcher.train import resume_config, run_train

    resume = args.resume is not None
    config = resume_config(args.resume, args.config, args.overrides) if resume else _load(args)
    if under_torchrun():
        # One worker of a multi-node run: the role comes from torchrun's global rank (launcher.cluster).
        return run_worker(config, resume=resume)
    return run_train(config, resume=resume)


def _cmd_eval(args: argparse.Namespace) -> int:
    from launcher.evaluate import EvalSettings, run_eval

    settings = EvalSettings(
        n=args.n,
        max_prompts=args.max_prompts,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        chunk_size=args.chunk_size,
        chat_template=args.chat_template,
        **({"prompt_suffix": args.prompt_suffix} if args.prompt_suffix is not None else {}),
        dtype=args.dtype,
        device=args.device,
        enforce_eager=args.enforce_eager,
        reward_workers=args.reward_workers,
        reward_timeout_s=args.reward_timeout_s,
    )
    return run_eval(args.model, args.data, settings, args.out)


def _cmd_plot(args: argparse.Namespace) -> int:
    from launcher.plot import plot_runs

    if not plot_runs(args.run_dirs, args.out):
        raise ValueError(
            f"no evaluation records (eval/<source>/acc) in the metrics.jsonl of {list(map(str, args.run_dirs))}"
        )
    print(f"plot: {args.out}")
    return 0


COMMANDS = {
    "train": _cmd_train,
    "config": _cmd_config,
    "make-tiny": _cmd_make_tiny,
    "eval": _cmd_eval,
    "plot": _cmd_plot,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `speed-async` command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ValueError as err:
        # Configuration and input errors: one clear line, no traceback.
        print(f"speed-async {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
