"""`speed-async` entry point. Thin: parses arguments and defers torch / vLLM imports to the chosen command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

EPILOG = """examples:
  speed-async train --config configs/tiny-cpu.toml rollout.n=8 pipeline.max_staleness=2
  speed-async make-tiny --out /tmp/tiny
  speed-async config --config configs/tiny-cpu.toml --explain
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

    train = sub.add_parser("train", help="run a training job on this machine")
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
    config.add_argument("--explain", action="store_true", help="print every key with its documentation")

    tiny = sub.add_parser("make-tiny", help="build the embedded tiny Qwen2 model and tokenizer (warm-started)")
    tiny.add_argument("--out", type=Path, help="output directory (default: the shared cache)")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def _load(args: argparse.Namespace):
    from speed_async.config import load_config

    return load_config(args.config, args.overrides)


def _cmd_config(args: argparse.Namespace) -> int:
    import json

    from speed_async.config import config_to_dict, field_docs

    config = _load(args)
    tree = config_to_dict(config)
    if not args.explain:
        print(json.dumps(tree, indent=2))
        return 0
    docs = field_docs()
    for section, values in tree.items():
        print(f"[{section}]")
        for key, value in values.items():
            print(f"  {key} = {json.dumps(value)}")
            print(f"      {docs.get(f'{section}.{key}', '')}")
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from speed_async.tiny import build_tiny, ensure_tiny_model

    path = build_tiny(args.out, seed=args.seed) if args.out else ensure_tiny_model(seed=args.seed)
    print(f"tiny model ready: {path}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    if args.resume is not None:
        from launcher.train import resume_config, run_train

        return run_train(resume_config(args.resume, args.config, args.overrides), resume=True)
    config = _load(args)
    from launcher.train import run_train

    return run_train(config)


COMMANDS = {"train": _cmd_train, "config": _cmd_config, "make-tiny": _cmd_make_tiny}


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
