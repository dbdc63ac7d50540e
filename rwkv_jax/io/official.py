"""Official BlinkDL checkpoints (`.pth` state_dicts) <-> our config and parameter tree.

Our parameters carry the official names and stored shapes (see `rwkv_jax.layers`), so the
mapping is mechanical:

- `blocks/<path>` leaves have a leading layer axis; layer l is `blocks.{l}.<path with dots>`;
- a Linear's `kernel [in, out]` is the official `weight [out, in]` transposed; a norm's `scale`
  and the embedding's `embedding` are the official `weight`;
- `ln0` is the official `blocks.0.ln0` (the embedding LayerNorm lives in block 0 there).

RWKV-7 files may lack layer 0's `v0/v1/v2` (released models drop them: layer 0 has no value
residual); they load as zeros and are never used.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from rwkv_jax.config import RWKVConfig
from rwkv_jax.io.pth import PthError, read_pth, write_pth

Params = dict[str, Any]
LEAF_TO_OFFICIAL = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
OPTIONAL_LAYER0_KEYS = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
# Parameter order inside a block, as the official modules register them. The `rwkv` package
# detects the version and head count from the order it meets keys in (a v6 file whose
# `time_faaaa` precedes any `time_maa_*` key is run with the wrong head count), so save_pth
# writes keys in exactly this order.
_BLOCK_ORDER = {
    4: ("ln0", "ln1", "ln2", "att.time_decay", "att.time_first", "att.time_mix_k", "att.time_mix_v",
        "att.time_mix_r", "att.key", "att.value", "att.receptance", "att.output",
        "ffn.time_mix_k", "ffn.time_mix_r", "ffn.key", "ffn.receptance", "ffn.value"),
    5: ("ln0", "ln1", "ln2", "att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "att.time_mix_g",
        "att.time_decay", "att.time_faaaa", "att.receptance", "att.key", "att.value", "att.output",
        "att.gate", "att.ln_x", "ffn.time_mix_k", "ffn.time_mix_r", "ffn.key", "ffn.receptance", "ffn.value"),
    6: ("ln0", "ln1", "ln2", "att.time_maa_x", "att.time_maa_w", "att.time_maa_k", "att.time_maa_v",
        "att.time_maa_r", "att.time_maa_g", "att.time_maa_w1", "att.time_maa_w2", "att.time_decay",
        "att.time_decay_w1", "att.time_decay_w2", "att.time_faaaa", "att.receptance", "att.key",
        "att.value", "att.output", "att.gate", "att.ln_x", "ffn.time_maa_k", "ffn.time_maa_r",
        "ffn.key", "ffn.receptance", "ffn.value"),
    7: ("ln0", "ln1", "ln2", "att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g",
        "att.w0", "att.w1", "att.w2", "att.a0", "att.a1", "att.a2", "att.v0", "att.v1", "att.v2",
        "att.g1", "att.g2", "att.k_k", "att.k_a", "att.r_k", "att.receptance", "att.key", "att.value",
        "att.output", "att.ln_x", "ffn.x_k", "ffn.key", "ffn.value"),
}


class CheckpointError(ValueError):
    """A checkpoint that does not describe a model we can build (names the offending keys)."""


def _official_name(path: tuple[str, ...]) -> str:
    *head, leaf = path
    return ".".join([*head, LEAF_TO_OFFICIAL.get(leaf, leaf)])


def _to_official(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.T) if path[-1] == "kernel" else value


def params_to_official(cfg: RWKVConfig, params: Params) -> dict[str, np.ndarray]:
    """Our parameter tree -> official state_dict arrays (numpy, the parameters' own dtypes)."""
    official: dict[str, np.ndarray] = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value)
        if path[0] == "blocks":
            for layer in range(cfg.n_layer):
                official[_official_name(("blocks", str(layer), *path[1:]))] = _to_official(path, value[layer])
        elif path[0] == "ln0":
            official[_official_name(("blocks", "0", *path))] = value
        else:
            official[_official_name(path)] = _to_official(path, value)
    return official


def official_order(cfg: RWKVConfig, keys: Any) -> list[str]:
    """`keys` sorted as an official checkpoint lists them (emb, blocks by layer, ln_out, head)."""
    block_order = _BLOCK_ORDER[cfg.version]

    def rank(key: str) -> tuple:
        match = _BLOCK_KEY.match(key)
        if not match:
            return ({"emb.weight": 0, "ln_out.weight": 2, "ln_out.bias": 2, "head.weight": 3}[key], 0, 0, key)
        name = key[match.end():].rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key[match.end():]
        return (1, int(match.group(1)), block_order.index(name), key)

    return sorted(keys, key=rank)


def abstract_params(cfg: RWKVConfig) -> Params:
    """The parameter tree of `cfg` as `jax.ShapeDtypeStruct`s (nothing is computed)."""
    from rwkv_jax.model import RWKV  # local: the model imports this package's siblings

    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: RWKV(cfg).init(jax.random.PRNGKey(0), tokens))["params"]


def expected_official_shapes(cfg: RWKVConfig) -> dict[str, tuple[int, ...]]:
    """Official key -> stored shape for a model of `cfg`."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, leaf in traverse_util.flatten_dict(abstract_params(cfg)).items():
        shape = tuple(leaf.shape)
        if path[0] == "blocks":
            per_layer = shape[1:][::-1] if path[-1] == "kernel" else shape[1:]
            for layer in range(cfg.n_layer):
                shapes[_official_name(("blocks", str(layer), *path[1:]))] = per_layer
        elif path[0] == "ln0":
            shapes[_official_name(("blocks", "0", *path))] = shape
        else:
            shapes[_official_name(path)] = shape[::-1] if path[-1] == "kernel" else shape
    return shapes


def params_from_official(cfg: RWKVConfig, tensors: Mapping[str, np.ndarray]) -> Params:
    """Official state_dict arrays -> our parameter tree (jnp arrays, the file's dtypes).

    Raises CheckpointError naming every missing, unexpected or wrongly shaped key.
    """
    expected = expected_official_shapes(cfg)
    tensors = dict(tensors)
    if cfg.version == 7:
        for key in OPTIONAL_LAYER0_KEYS:
            if key not in tensors:
                tensors[key] = np.zeros(expected[key], _common_dtype(tensors))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(f"{k}: {tuple(tensors[k].shape)} (expected {expected[k]})"
                   for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if wrong:
            parts.append(f"shape mismatches {wrong}")
        raise CheckpointError(f"checkpoint does not match RWKV-{cfg.version} config "
                              f"(n_layer={cfg.n_layer}, n_embd={cfg.n_embd}): " + "; ".join(parts))

    flat: dict[tuple[str, ...], Any] = {}
    for path, leaf in traverse_util.flatten_dict(abstract_params(cfg)).items():
        if path[0] == "blocks":
            value = np.stack([tensors[_official_name(("blocks", str(l), *path[1:]))] for l in range(cfg.n_layer)])
            if path[-1] == "kernel":
                value = np.swapaxes(value, -1, -2)
        elif path[0] == "ln0":
            value = tensors[_official_name(("blocks", "0", *path))]
        else:
            value = tensors[_official_name(path)]
            if path[-1] == "kernel":
                value = value.T
        flat[path] = jnp.asarray(np.ascontiguousarray(value))
    return traverse_util.unflatten_dict(flat)


def _common_dtype(tensors: Mapping[str, np.ndarray]) -> np.dtype:
    dtypes = {np.dtype(v.dtype) for v in tensors.values()}
    return dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)


def _layer_count(tensors: Mapping[str, np.ndarray]) -> int:
    layers = [int(m.group(1)) for k in tensors if (m := _BLOCK_KEY.match(k))]
    if not layers:
        raise CheckpointError("checkpoint has no 'blocks.N.' keys: not an RWKV state_dict")
    return 1 + max(layers)


def _require(tensors: Mapping[str, np.ndarray], *keys: str) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise CheckpointError(f"checkpoint is missing {missing}, needed to infer the model config")


def infer_config(tensors: Mapping[str, np.ndarray], **overrides: Any) -> RWKVConfig:
    """Version and sizes from official key names and shapes (the `rwkv` package's rules, §13.3).

    `overrides` are extra `RWKVConfig` fields (e.g. `wkv`, `dtype`).
    """
    _require(tensors, "emb.weight", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight")
    vocab_size, n_embd = tensors["emb.weight"].shape
    sizes: dict[str, Any] = dict(n_layer=_layer_count(tensors), n_embd=int(n_embd), vocab_size=int(vocab_size),
                                 dim_att=int(tensors["blocks.0.att.key.weight"].shape[0]),
                                 dim_ffn=int(tensors["blocks.0.ffn.key.weight"].shape[0]))
    keys = set(tensors)
    if "blocks.0.att.r_k" in keys:
        version = 7
        n_head, head_size = tensors["blocks.0.att.r_k"].shape
        value_layer = 1 if "blocks.1.att.v1" in keys else 0
        for name in ("w", "a", "g"):
            _require(tensors, f"blocks.0.att.{name}1")
            sizes[f"d_{name}"] = int(tensors[f"blocks.0.att.{name}1"].shape[1])
        if f"blocks.{value_layer}.att.v1" in keys:
            sizes["d_v"] = int(tensors[f"blocks.{value_layer}.att.v1"].shape[1])
        sizes["head_size"] = int(head_size)
    elif any(".time_maa" in k for k in keys):
        version = 6
        _require(tensors, "blocks.0.att.time_faaaa", "blocks.0.att.time_maa_w1", "blocks.0.att.time_decay_w1")
        sizes["head_size"] = int(tensors["blocks.0.att.time_faaaa"].shape[1])
        sizes["d_mix"] = int(tensors["blocks.0.att.time_maa_w1"].shape[1]) // 5
        sizes["d_decay"] = int(tensors["blocks.0.att.time_decay_w1"].shape[1])
    elif any(".ln_x." in k for k in keys):
        version = 5
        _require(tensors, "blocks.0.att.time_decay")
        decay_shape = tensors["blocks.0.att.time_decay"].shape
        if len(decay_shape) != 2 or decay_shape[1] == 1 or "blocks.0.att.gate.weight" not in keys:
            raise CheckpointError(f"RWKV-5.0/5.1 checkpoints (per-head decay, time_decay shape {decay_shape}) "
                                  "are not supported yet; only RWKV-5.2 (x052) is")
        sizes["head_size"] = int(decay_shape[1])
    else:
        version = 4
        _require(tensors, "blocks.0.att.time_first", "blocks.0.att.time_decay")
    state_keys = sorted(k for k in keys if k.endswith(".time_state"))
    if state_keys:
        raise CheckpointError(f"state-tuned checkpoints (keys {state_keys[:3]}...) are not supported yet")
    dtypes = {np.dtype(v.dtype) for v in tensors.values()}
    param_dtype = "bfloat16" if dtypes == {np.dtype(ml_dtypes.bfloat16)} else "float32"
    try:
        return RWKVConfig(version=version, param_dtype=param_dtype, **{**sizes, **overrides})
    except ValueError as error:
        raise CheckpointError(f"checkpoint shapes give an invalid config: {error}") from error


def load_pth(path: str | os.PathLike, **config_overrides: Any) -> tuple[RWKVConfig, Params]:
    """Load an official BlinkDL `.pth` without torch; the config is inferred from the file.

    Returns `(cfg, params)`; parameters keep the file's dtype (bf16 files stay bf16; the model
    computes in `cfg.dtype`). Raises `PthError` for unreadable or unsafe files and
    `CheckpointError` for files that are not a consistent RWKV-4..7 state_dict.
    """
    tensors = read_pth(path)
    cfg = infer_config(tensors, **config_overrides)
    return cfg, params_from_official(cfg, tensors)


def save_pth(path: str | os.PathLike, cfg: RWKVConfig, params: Params) -> None:
    """Write an official-format `.pth` state_dict (loadable by `torch.load(weights_only=True)`
    and by the `rwkv` package), keeping each parameter's dtype."""
    official = params_to_official(cfg, params)
    expected = expected_official_shapes(cfg)
    mismatched = [k for k, v in official.items() if expected.get(k) != tuple(v.shape)]
    if mismatched or set(official) != set(expected):
        raise CheckpointError(f"parameters do not match the RWKV-{cfg.version} config: "
                              f"{sorted(mismatched) or sorted(set(official) ^ set(expected))}")
    write_pth(path, {key: official[key] for key in official_order(cfg, official)})


__all__ = ["CheckpointError", "PthError", "infer_config", "load_pth", "params_from_official",
           "params_to_official", "save_pth", "expected_official_shapes"]
