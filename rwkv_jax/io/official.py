"""Official BlinkDL checkpoints (`.pth` state_dicts) <-> our config and parameter tree.

Our parameters carry the official names and stored shapes (see `rwkv_jax.layers`), so the
mapping is mechanical:

- `blocks/<path>` leaves have a leading layer axis; layer l is `blocks.{l}.<path with dots>`;
- a Linear's `kernel [in, out]` is the official `weight [out, in]` transposed; a norm's `scale`
  and the embedding's `embedding` are the official `weight`;
- `ln0` is the official `blocks.0.ln0` (the embedding LayerNorm lives in block 0 there).

RWKV-1..3 keep their own official names in our tree too (v1: `tok_emb`, `blocks.{l}.attn.*`,
`blocks.{l}.mlp.*`, `ln_f`, `time_out`; v1-v3: `head_q`, `head_k`). Their state_dicts also hold
the `copy_mask` buffer, lower-triangular ones (TT, TT): `save_pth` writes it, loading checks it
when present and drops it (it is not a parameter).

RWKV-7 files may lack layer 0's `v0/v1/v2` (released models drop them: layer 0 has no value
residual); they load as zeros and are never used.

The official RWKV-1 trainer saves the whole pickled module (`torch.save(model)`), which needs the
original `src.model` classes to unpickle and which the safe reader refuses. Convert it once
where that code is importable: `torch.save(torch.load(f, weights_only=False).state_dict(), out)`.
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
COPY_MASK = "copy_mask"
# State-tuning files (and models merged with one) hold `blocks.{l}.att.time_state` (H, N, N): the
# tuned initial WKV state, not a parameter; see `rwkv_jax.io.state_files`.
TIME_STATE = "att.time_state"
# Keys outside the blocks, in the order official state_dicts list them: the root module's own
# parameters and buffers come before its children, the embedding before the blocks.
_LEADING_KEYS = ("time_out", COPY_MASK, "tok_emb.weight", "emb.weight")
_TRAILING_MODULES = ("ln_f", "ln_out", "head", "head_q", "head_k")
# Parameter order inside a block, as the official modules register them. The `rwkv` package
# detects the version and head count from the order it meets keys in (a v6 file whose
# `time_faaaa` precedes any `time_maa_*` key is run with the wrong head count), so save_pth
# writes keys in exactly this order.
_BLOCK_ORDER = {
    1: ("ln1", "ln2", "attn.time_w", "attn.time_alpha", "attn.time_beta", "attn.time_gamma", "attn.key",
        "attn.value", "attn.receptance", "attn.output", "mlp.key", "mlp.value", "mlp.weight", "mlp.receptance"),
    2: ("ln1", "ln2", "att.time_decay", "att.time_first", "att.time_mix", "att.key", "att.value",
        "att.receptance", "att.output", "ffn.time_mix", "ffn.key", "ffn.receptance", "ffn.value"),
    3: ("ln1", "ln2", "ln0", "att.time_decay", "att.time_first", "att.time_mix_k", "att.time_mix_v",
        "att.time_mix_r", "att.key", "att.value", "att.receptance", "att.output",
        "ffn.time_mix_k", "ffn.time_mix_r", "ffn.key", "ffn.receptance", "ffn.value"),
    4: ("ln0", "ln1", "ln2", "att.time_decay", "att.time_first", "att.time_mix_k", "att.time_mix_v",
        "att.time_mix_r", "att.key", "att.value", "att.receptance", "att.output",
        "ffn.time_mix_k", "ffn.time_mix_r", "ffn.key", "ffn.receptance", "ffn.value"),
    5: ("ln0", "ln1", "ln2", "att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "att.time_mix_g",
        "att.time_decay", "att.time_faaaa", "att.receptance", "att.key", "att.value", "att.output",
        "att.gate", "att.ln_x", "ffn.time_mix_k", "ffn.time_mix_r", "ffn.key", "ffn.receptance", "ffn.value"),
    # The 5.0/5.1 previews (`RWKV_TimeMix_RWKV5_Preview`): per-head time_decay and time_first or
    # time_faaaa, and (5.1) the gate registered right after time_mix_g, before receptance.
    "5-preview": ("ln0", "ln1", "ln2", "att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "att.time_mix_g",
                  "att.time_decay", "att.time_first", "att.time_faaaa", "att.gate", "att.receptance", "att.key",
                  "att.value", "att.output", "att.ln_x", "ffn.time_mix_k", "ffn.time_mix_r", "ffn.key",
                  "ffn.receptance", "ffn.value"),
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


# Files whose parameters all have one of these dtypes infer it as `param_dtype`; any other file
# (mixed, float64) infers float32.
_PARAM_DTYPES = {np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype(np.float16): "float16",
                 np.dtype(np.float32): "float32"}


def _official_name(path: tuple[str, ...]) -> str:
    *head, leaf = path
    return ".".join([*head, LEAF_TO_OFFICIAL.get(leaf, leaf)])


def _to_official(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.T) if path[-1] == "kernel" else value


def copy_mask(cfg: RWKVConfig, dtype: Any = np.float32) -> np.ndarray:
    """The official `copy_mask` buffer of a v1-v3 model with a copy head: tril(ones(TT, TT))."""
    return np.tril(np.ones((cfg.ctx_len, cfg.ctx_len), dtype))


def params_to_official(cfg: RWKVConfig, params: Params) -> dict[str, np.ndarray]:
    """Our parameter tree -> official state_dict arrays (numpy, the parameters' own dtypes), plus
    the `copy_mask` buffer of v1-v3 copy heads (in the head's dtype, as `model.to(dtype)` would)."""
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
    if cfg.head_qk:
        official[COPY_MASK] = copy_mask(cfg, official["head.weight"].dtype)
    return official


def official_order(cfg: RWKVConfig, keys: Any) -> list[str]:
    """`keys` sorted as an official checkpoint lists them (emb, blocks by layer, ln_out, head)."""
    block_order = _BLOCK_ORDER["5-preview" if cfg.v5_variant in ("5.0", "5.1") else cfg.version]
    block_order = (*block_order, TIME_STATE)  # state-tuned files: after the block's parameters

    def rank(key: str) -> tuple:
        match = _BLOCK_KEY.match(key)
        if key in _LEADING_KEYS:
            return (0, _LEADING_KEYS.index(key), 0, key)
        if not match:
            return (2, _TRAILING_MODULES.index(key.rsplit(".", 1)[0]), 0, key)
        name = key[match.end():].rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key[match.end():]
        return (1, int(match.group(1)), block_order.index(name), key)

    return sorted(keys, key=rank)


def abstract_params(cfg: RWKVConfig) -> Params:
    """The parameter tree of `cfg` as `jax.ShapeDtypeStruct`s (nothing is computed)."""
    from rwkv_jax.model import RWKV  # local: the model imports this package's siblings

    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: RWKV(cfg).init(jax.random.PRNGKey(0), tokens))["params"]


def expected_official_shapes(cfg: RWKVConfig) -> dict[str, tuple[int, ...]]:
    """Official key -> stored shape for a model of `cfg` (with the `copy_mask` buffer of v1-v3)."""
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
    if cfg.head_qk:
        shapes[COPY_MASK] = (cfg.ctx_len, cfg.ctx_len)
    return shapes


def params_from_official(cfg: RWKVConfig, tensors: Mapping[str, np.ndarray]) -> Params:
    """Official state_dict arrays -> our parameter tree (jnp arrays in the file's dtypes, except
    float64, which becomes float32: JAX holds at most 32-bit floats unless x64 is enabled).

    Raises CheckpointError naming every missing, unexpected or wrongly shaped key.
    """
    expected = expected_official_shapes(cfg)
    tensors = dict(tensors)
    if COPY_MASK in expected:  # a buffer, not a parameter: optional, but when present it must be the mask
        mask = np.asarray(tensors.setdefault(COPY_MASK, copy_mask(cfg)))
        if mask.shape == expected[COPY_MASK] and not np.array_equal(mask, copy_mask(cfg, mask.dtype)):
            raise CheckpointError("copy_mask is not the lower-triangular ones buffer the copy head assumes")
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
        if value.dtype == np.float64:  # explicitly, rather than by jnp.asarray's silent x64-off downcast
            value = value.astype(np.float32)
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


def _dims(tensors: Mapping[str, np.ndarray], key: str, *names: str) -> tuple[int, ...]:
    """The shape of `tensors[key]`, which must have one axis per entry of `names` (what each axis
    gives the config), as ints; CheckpointError naming the key otherwise."""
    shape = tuple(int(n) for n in tensors[key].shape)
    if len(shape) != len(names):
        raise CheckpointError(f"{key!r} has shape {shape}, expected {len(names)} axes ({', '.join(names)}); "
                              "cannot infer the model config")
    return shape


def infer_config(tensors: Mapping[str, np.ndarray], **overrides: Any) -> RWKVConfig:
    """Version and sizes from official key names and shapes: for v4-v7 the `rwkv` package's rules
    (§13.3); v1 has `tok_emb`, v2 a single `att.time_mix`, v3 a (C, 1) `att.time_decay`. The v1-v3
    `ctx_len` comes from `time_w` (v1) or `copy_mask` (v2/v3; the config default without one).

    `overrides` are extra `RWKVConfig` fields (e.g. `wkv`, `dtype`).
    """
    keys = set(tensors)
    if "tok_emb.weight" in keys:
        return _make_config(tensors, 1, _v1_sizes(tensors), overrides)
    if "blocks.0.ffnPre.key.weight" in keys:
        raise CheckpointError("'RWKV-ffnPre' checkpoints (layer 0 has ffnPre instead of att) are not supported")
    _require(tensors, "emb.weight", "blocks.0.att.key.weight", "blocks.0.ffn.key.weight")
    vocab_size, n_embd = _dims(tensors, "emb.weight", "vocab_size", "n_embd")
    sizes: dict[str, Any] = dict(n_layer=_layer_count(tensors), n_embd=n_embd, vocab_size=vocab_size,
                                 dim_att=_dims(tensors, "blocks.0.att.key.weight", "dim_att", "n_embd")[0],
                                 dim_ffn=_dims(tensors, "blocks.0.ffn.key.weight", "dim_ffn", "n_embd")[0])
    if "blocks.0.att.r_k" in keys:
        version = 7
        _, head_size = _dims(tensors, "blocks.0.att.r_k", "n_head", "head_size")
        value_layer = 1 if "blocks.1.att.v1" in keys else 0
        for name in ("w", "a", "g"):
            _require(tensors, f"blocks.0.att.{name}1")
            sizes[f"d_{name}"] = _dims(tensors, f"blocks.0.att.{name}1", "n_embd", f"d_{name}")[1]
        if f"blocks.{value_layer}.att.v1" in keys:
            sizes["d_v"] = _dims(tensors, f"blocks.{value_layer}.att.v1", "n_embd", "d_v")[1]
        sizes["head_size"] = head_size
    elif any(".time_maa" in k for k in keys):
        version = 6
        _require(tensors, "blocks.0.att.time_faaaa", "blocks.0.att.time_maa_w1", "blocks.0.att.time_decay_w1")
        sizes["head_size"] = _dims(tensors, "blocks.0.att.time_faaaa", "n_head", "head_size")[1]
        sizes["d_mix"] = _dims(tensors, "blocks.0.att.time_maa_w1", "n_embd", "5 * d_mix")[1] // 5
        sizes["d_decay"] = _dims(tensors, "blocks.0.att.time_decay_w1", "n_embd", "d_decay")[1]
    elif any(".ln_x." in k for k in keys):
        version = 5
        _require(tensors, "blocks.0.att.time_decay")
        decay_shape = tuple(tensors["blocks.0.att.time_decay"].shape)
        if len(decay_shape) == 2 and decay_shape[1] > 1:  # the package's 5.2 rule: a decay per channel
            sizes["head_size"] = int(decay_shape[1])
        elif len(decay_shape) == 1:  # the 5.0/5.1 previews: one decay per head
            if sizes["dim_att"] % decay_shape[0]:
                raise CheckpointError(f"blocks.0.att.time_decay has {decay_shape[0]} heads, which do not divide "
                                      f"dim_att={sizes['dim_att']}")
            sizes["head_size"] = sizes["dim_att"] // int(decay_shape[0])
            sizes["v5_variant"] = "5.1" if "blocks.0.att.gate.weight" in keys else "5.0"
            sizes["v5_log_bonus"] = "blocks.0.att.time_first" in keys
        else:
            raise CheckpointError(f"blocks.0.att.time_decay has shape {decay_shape}: neither RWKV-5.2 (H, N) "
                                  "nor a 5.0/5.1 preview (H,)")
    else:
        _require(tensors, "blocks.0.att.time_first", "blocks.0.att.time_decay")
        if "blocks.0.att.time_mix" in keys:
            version = 2
        else:  # v3 stores its decays as (C, 1), v4 as (C,)
            version = 3 if len(tensors["blocks.0.att.time_decay"].shape) == 2 else 4
        if version < 4:
            sizes["head_qk"] = _head_qk(tensors)
            if COPY_MASK in keys:
                sizes["ctx_len"] = _dims(tensors, COPY_MASK, "ctx_len", "ctx_len")[0]
    return _make_config(tensors, version, sizes, overrides)


def _head_qk(tensors: Mapping[str, np.ndarray]) -> int:
    return _dims(tensors, "head_q.weight", "head_qk", "n_embd")[0] if "head_q.weight" in tensors else 0


def _v1_sizes(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    _require(tensors, "blocks.0.attn.time_w", "blocks.0.attn.key.weight", "blocks.0.mlp.key.weight")
    vocab_size, n_embd = _dims(tensors, "tok_emb.weight", "vocab_size", "n_embd")
    n_head, ctx_len = _dims(tensors, "blocks.0.attn.time_w", "n_head", "ctx_len")
    dim_att = _dims(tensors, "blocks.0.attn.key.weight", "dim_att", "n_embd")[0]
    if not n_head or dim_att % n_head:
        raise CheckpointError(f"RWKV-1 n_attn={dim_att} is not a multiple of n_head={n_head} (time_w rows)")
    return dict(n_layer=_layer_count(tensors), n_embd=n_embd, vocab_size=vocab_size, dim_att=dim_att,
                dim_ffn=_dims(tensors, "blocks.0.mlp.key.weight", "dim_ffn", "n_embd")[0],
                head_size=dim_att // n_head, ctx_len=ctx_len, head_qk=_head_qk(tensors))


def _make_config(tensors: Mapping[str, np.ndarray], version: int, sizes: dict[str, Any],
                 overrides: dict[str, Any]) -> RWKVConfig:
    # The copy_mask buffer's dtype says nothing about the parameters'. Mixed files, and float64
    # ones (loaded as float32, see params_from_official), say float32.
    dtypes = {np.dtype(v.dtype) for k, v in tensors.items() if k != COPY_MASK}
    param_dtype = _PARAM_DTYPES.get(dtypes.pop(), "float32") if len(dtypes) == 1 else "float32"
    try:
        return RWKVConfig(version=version, param_dtype=param_dtype, **{**sizes, **overrides})
    except ValueError as error:
        raise CheckpointError(f"checkpoint shapes give an invalid config: {error}") from error


def split_time_state(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`(parameters, time_state tensors)`: a state-tuned model's `blocks.{l}.att.time_state` apart."""
    params = {k: v for k, v in tensors.items() if not k.endswith("." + TIME_STATE)}
    return params, {k: v for k, v in tensors.items() if k not in params}


def split_model_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`split_time_state` of a file read as a model: CheckpointError if `path` is a state-tuning
    file (time_state tensors only), which is an initial state, not a model."""
    params, time_state = split_time_state(tensors)
    if time_state and not params:
        raise CheckpointError(f"{os.fspath(path)} holds only state-tuning tensors ('blocks.N.{TIME_STATE}'), "
                              "no model weights: it is an initial state for a model; read it with "
                              "rwkv_jax.load_state_pth(path, cfg)")
    return params, time_state


def load_pth(path: str | os.PathLike, **config_overrides: Any) -> tuple[RWKVConfig, Params]:
    """Load an official BlinkDL `.pth` without torch; the config is inferred from the file.

    Returns `(cfg, params)`; float32, bfloat16 and float16 parameters keep the file's dtype, and
    `cfg.param_dtype` names it when every tensor has it (the model computes in `cfg.dtype`);
    float64 parameters are cast to float32, as JAX without x64 would hold them anyway. A
    state-tuned model's `time_state` tensors are an initial state, not parameters: they are skipped
    here and read by `rwkv_jax.io.state_files.load_state_pth`. Raises `PthError` for unreadable or
    unsafe files (including the pickled whole modules of the official RWKV-1 trainer: see the
    module docstring) and `CheckpointError` for files that are not a consistent RWKV-1..7
    state_dict (naming a state-tuning file as such).
    """
    tensors, _ = split_model_file(read_pth(path), path)
    cfg = infer_config(tensors, **config_overrides)
    return cfg, params_from_official(cfg, tensors)


def checked_official(cfg: RWKVConfig, params: Params) -> dict[str, np.ndarray]:
    """`params_to_official` in official key order, after checking every key and shape against `cfg`."""
    official = params_to_official(cfg, params)
    expected = expected_official_shapes(cfg)
    mismatched = [k for k, v in official.items() if expected.get(k) != tuple(v.shape)]
    if mismatched or set(official) != set(expected):
        raise CheckpointError(f"parameters do not match the RWKV-{cfg.version} config: "
                              f"{sorted(mismatched) or sorted(set(official) ^ set(expected))}")
    return {key: official[key] for key in official_order(cfg, official)}


def save_pth(path: str | os.PathLike, cfg: RWKVConfig, params: Params, state: Mapping[str, Any] | None = None
             ) -> None:
    """Write an official-format `.pth` state_dict (loadable by `torch.load(weights_only=True)`
    and, for v4-v7, by the `rwkv` package), keeping each parameter's dtype.

    With `state` (v5-v7), batch element 0's WKV state is stored as `blocks.{l}.att.time_state`, as
    in a state-tuned model: the package (v5/v6) then starts every sequence from it.
    """
    official = checked_official(cfg, params)
    if state is not None:
        from rwkv_jax.io.state_files import time_state_tensors  # local: state_files imports this module

        official.update(time_state_tensors(cfg, state))
        official = {key: official[key] for key in official_order(cfg, official)}
    write_pth(path, official)


__all__ = ["CheckpointError", "PthError", "checked_official", "infer_config", "load_pth", "params_from_official",
           "params_to_official", "save_pth", "split_model_file", "split_time_state", "expected_official_shapes"]
