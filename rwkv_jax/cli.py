"""The `rwkv-jax` command line: one subcommand per job.

    rwkv-jax train preset=tiny version=7 steps=200 out=runs/x     # key=value overrides a preset
    rwkv-jax train --resume out=runs/x preset=tiny version=7       # continue from the last checkpoint
    rwkv-jax eval --checkpoint runs/x --text some.txt              # perplexity and bits per byte
    rwkv-jax generate --checkpoint model.pth --prompt "..."        # streamed sampling; `chat` for a REPL
    rwkv-jax convert model.pth out_dir --to hf                     # official / hf / fla / orbax

Each subcommand registers itself in `SUBCOMMANDS` with a function that adds its arguments and
one that runs it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

PRESET_HELP = "presets: {}; fields: see rwkv_jax.train.config.TrainConfig"


def _add_train(parser: argparse.ArgumentParser) -> None:
    from rwkv_jax.train.config import PRESETS

    parser.description = "Train (or fine-tune, with init_from=FILE.pth) an RWKV model."
    parser.epilog = PRESET_HELP.format(", ".join(PRESETS))
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="preset=NAME first, then any TrainConfig field, e.g. version=7 steps=200 out=runs/x")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out")


def _run_train(args: argparse.Namespace) -> int:
    from rwkv_jax.train import sharding

    # Before anything touches a device: multi-host runs must join the cluster first.
    sharding.maybe_initialize_distributed()
    from rwkv_jax.train.config import ConfigError, TrainConfig
    from rwkv_jax.train.loop import NonFiniteLossError, train

    try:
        cfg = TrainConfig.from_args(args.overrides)
        if args.resume:
            cfg = cfg.replace(resume=True)
        summary = train(cfg)
    except ConfigError as error:
        args.parser.error(str(error))
    except NonFiniteLossError as error:
        print(f"rwkv-jax train: {error}", file=sys.stderr)
        return 1
    if summary["last"]:
        print(f"done: step {summary['last']['step']}, loss {summary['last']['loss']:.4f}; checkpoints in {cfg.out}")
    return 0


def _add_eval(parser: argparse.ArgumentParser) -> None:
    parser.description = "Perplexity and bits per byte of a text file under a training checkpoint."
    parser.add_argument("--checkpoint", required=True, help="a run directory written by `rwkv-jax train`")
    parser.add_argument("--text", required=True, help="a UTF-8 text file")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--best", action="store_true", help="use the best checkpoint by validation loss")
    which.add_argument("--step", type=int, help="use this step (default: the latest)")
    parser.add_argument("--max-batches", type=int, help="score at most this many batches")


def _run_eval(args: argparse.Namespace) -> int:
    from rwkv_jax.train.config import ConfigError
    from rwkv_jax.train.loop import evaluate

    try:
        result = evaluate(args.checkpoint, args.text, best=args.best, step=args.step, max_batches=args.max_batches)
    except (ConfigError, FileNotFoundError) as error:
        args.parser.error(str(error))
    print(f"step {result['step']}: loss {result['loss']:.4f} nats/token | perplexity {result['perplexity']:.3f} | "
          f"{result['bpb']:.4f} bits/byte | {int(result['tokens'])} tokens")
    return 0


def _lazy(module: str, name: str) -> Callable:
    """`module.name`, imported when called, so `rwkv-jax --help` does not import JAX."""
    def call(*args):
        import importlib

        return getattr(importlib.import_module(module), name)(*args)
    return call


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": ("train or fine-tune a model", _add_train, _run_train),
    "eval": ("score a text file with a training run's checkpoint", _add_eval, _run_eval),
    "ppl": ("perplexity and bits per byte of a text file under any checkpoint file",
            _lazy("rwkv_jax.commands", "add_ppl_arguments"), _lazy("rwkv_jax.commands", "run_ppl")),
    "generate": ("sample a continuation of a prompt, streamed",
                 _lazy("rwkv_jax.commands", "add_generate_arguments"), _lazy("rwkv_jax.commands", "run_generate")),
    "chat": ("chat with a model, keeping its state between turns",
             _lazy("rwkv_jax.commands", "add_chat_arguments"), _lazy("rwkv_jax.commands", "run_chat")),
    "convert": ("convert a checkpoint between the official, HF, fla and orbax layouts",
                _lazy("rwkv_jax.io.convert", "add_convert_arguments"), _lazy("rwkv_jax.io.convert", "run_convert")),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkv-jax", description="RWKV language models in JAX.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run, parser=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args lets `train` take key=value overrides on both sides of its flags
    # (`train --resume out=x`); anything else left over is an error as usual.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train" and not any(item.startswith("-") for item in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
