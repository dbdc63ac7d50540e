"""One entry point for every checkpoint layout: detect, load, save, and the `rwkv-jax convert` command.

Layouts (`FORMATS`):

- "official": a BlinkDL `.pth` state_dict, RWKV-1..7 (incl. 5.0/5.1, state-tuned files, v7 files
  without layer-0 v0/v1/v2), `rwkv_jax.io.official`;
- "hf": a Hugging Face directory (config.json + model.safetensors / pytorch_model.bin / shards),
  transformers `RwkvForCausalLM` (RWKV-4) or the RWKV org's RWKV-5/6 remote code, `rwkv_jax.io.hf`;
- "fla": a flash-linear-attention RWKV-6/7 directory, `rwkv_jax.io.fla`;
- "orbax": our parameter-only orbax checkpoint + config.json, `rwkv_jax.io.orbax_params`.

Loading detects the layout from the files and key names (a single `.safetensors` / `.bin` file is
read with the config.json next to it, when there is one); unknown or inconsistent layouts raise
`CheckpointError` naming the offending keys.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from rwkv_jax.config import DTYPES, RWKVConfig
from rwkv_jax.io.fla import is_fla_layout, params_from_fla, save_fla
from rwkv_jax.io.hf import is_hf_layout, params_from_hf, read_config, read_weights, save_hf
from rwkv_jax.io.official import (CheckpointError, Params, infer_config, params_from_official, save_pth,
                                  split_model_file)
from rwkv_jax.io.orbax_params import is_orbax_params_dir, load_params, save_params
from rwkv_jax.io.pth import PthError
from rwkv_jax.io.state_files import state_from_time_state
from rwkv_jax.state import State

FORMATS = ("official", "hf", "fla", "orbax")


def _read(path: Path) -> tuple[str, dict[str, Any] | None]:
    """(format, tensors) of a checkpoint; tensors is None for our orbax directories."""
    if not path.exists():
        raise FileNotFoundError(path)
    if path.is_dir() and is_orbax_params_dir(path):
        return "orbax", None
    tensors = read_weights(path)
    if is_hf_layout(tensors):
        return "hf", tensors
    if is_fla_layout(tensors):
        return "fla", tensors
    if any(k.startswith(("blocks.", "emb.", "tok_emb.")) for k in tensors):
        return "official", tensors
    raise CheckpointError(f"{path}: no known RWKV layout (official 'blocks.N.', HF 'rwkv.blocks.N.', "
                          f"fla 'model.layers.N.'); first keys {sorted(tensors)[:6]}")


def detect_format(path: str | os.PathLike) -> str:
    """The layout of a checkpoint file or directory: one of `FORMATS`."""
    return _read(Path(path))[0]


def _load(path: Path, config_overrides: dict[str, Any]) -> tuple[str, RWKVConfig, Params, State | None]:
    fmt, tensors = _read(path)
    if fmt == "orbax":
        return (fmt, *load_params(path, **config_overrides), None)
    if fmt == "hf":
        return (fmt, *params_from_hf(tensors, read_config(path), **config_overrides), None)
    if fmt == "fla":
        return (fmt, *params_from_fla(tensors, read_config(path), **config_overrides), None)
    weights, time_state = split_model_file(tensors, path)
    cfg = infer_config(weights, **config_overrides)
    state = state_from_time_state(cfg, time_state) if time_state else None
    return fmt, cfg, params_from_official(cfg, weights), state


def load_checkpoint_with_state(path: str | os.PathLike, **config_overrides: Any
                               ) -> tuple[RWKVConfig, Params, State | None]:
    """`load_checkpoint` plus the tuned initial state of a state-tuned official file (None otherwise)."""
    return _load(Path(path), config_overrides)[1:]


def load_checkpoint(path: str | os.PathLike, **config_overrides: Any) -> tuple[RWKVConfig, Params]:
    """Load any supported checkpoint (see `FORMATS`) as `(cfg, params)`; `config_overrides` are
    runtime `RWKVConfig` fields (`wkv`, `dtype`, `chunk_size`)."""
    cfg, params, _ = load_checkpoint_with_state(path, **config_overrides)
    return cfg, params


def save_checkpoint(path: str | os.PathLike, cfg: RWKVConfig, params: Params, format: str | None = None,
                    safetensors: bool = True, state: State | None = None) -> str:
    """Write `cfg, params` as `format` (default: "official" for a `.pth` path, else "orbax");
    `safetensors=False` writes HF/fla weights as pytorch_model.bin; `state` (official only) is
    stored as state-tuning `time_state` keys. Returns the format written."""
    format = format or ("official" if str(path).endswith(".pth") else "orbax")
    if format == "official":
        save_pth(path, cfg, params, state=state)
    elif state is not None:
        raise CheckpointError(f"only the official format stores a tuned state (time_state), not {format!r}")
    elif format == "hf":
        save_hf(path, cfg, params, safetensors=safetensors)
    elif format == "fla":
        save_fla(path, cfg, params, safetensors=safetensors)
    elif format == "orbax":
        save_params(path, cfg, params)
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    return format


def cast_params(params: Params, dtype: str) -> Params:
    """Every floating parameter in `dtype` ("float32", "bfloat16", "float16")."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, DTYPES[dtype]), params)


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `rwkv-jax convert IN OUT [--to FORMAT] [--bin] [--dtype DTYPE]`."""
    parser.add_argument("input", metavar="IN", help="checkpoint to read: official .pth, HF or fla directory "
                        "(or its .safetensors/.bin file), or an rwkv-jax orbax directory; the layout is detected")
    parser.add_argument("output", metavar="OUT", help="where to write (a .pth file or a directory)")
    parser.add_argument("--to", choices=FORMATS, default=None,
                        help="output layout (default: official for a .pth OUT, else orbax)")
    parser.add_argument("--bin", action="store_true",
                        help="hf/fla: write pytorch_model.bin instead of model.safetensors")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="cast the parameters (default: keep the input's dtypes)")


def run_convert(args: argparse.Namespace) -> int:
    """Convert `args.input` to `args.output`; returns the exit code (1 with a message on stderr
    for unreadable or inconsistent checkpoints)."""
    try:
        source, cfg, params, state = _load(Path(args.input), {})
        if args.dtype:
            params, cfg = cast_params(params, args.dtype), cfg.replace(param_dtype=args.dtype)
        target = args.to or ("official" if str(args.output).endswith(".pth") else "orbax")
        carried = state if target == "official" else None
        written = save_checkpoint(args.output, cfg, params, format=target, safetensors=not args.bin, state=carried)
    except (ValueError, PthError, OSError) as error:  # CheckpointError is a ValueError
        print(f"rwkv-jax convert: {error}", file=sys.stderr)
        return 1
    version = cfg.v5_variant if cfg.version == 5 else cfg.version
    print(f"RWKV-{version} L{cfg.n_layer} D{cfg.n_embd} V{cfg.vocab_size} ({source}) "
          f"-> {args.output} ({written})")
    if state is not None and carried is None:
        print("note: the input's tuned time_state was not carried over (only the official layout stores it); "
              "load it from the input with rwkv_jax.io.state_files.load_state_pth", file=sys.stderr)
    return 0


__all__ = ["FORMATS", "add_convert_arguments", "cast_params", "detect_format", "load_checkpoint",
           "load_checkpoint_with_state", "run_convert", "save_checkpoint"]
