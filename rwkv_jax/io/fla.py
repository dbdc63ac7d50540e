"""flash-linear-attention (fla / fla-hub) layouts of RWKV-6 and RWKV-7 (`fla/models/rwkv6`,
`fla/models/rwkv7`, `fla/layers/rwkv6.py`, `rwkv7.py`; the mapping follows fla's own
`utils/convert_from_rwkv6.py` / `convert_from_rwkv7.py`).

Shared names: `emb.weight` -> `model.embeddings.weight`, `blocks.0.ln0` -> `model.layers.0.pre_norm`,
`ln1` -> `attn_norm`, `ln2` -> `ffn_norm`, `ln_out` -> `model.norm`, `head.weight` -> `lm_head.weight`,
`att` -> `attn`, `ln_x` -> `attn.g_norm`, `output` -> `attn.o_proj`.

RWKV-6 (fused and split differently from the official file):
- `time_maa_x (1,1,C)` -> `attn.x_proj.0.mu (C)`; the 5 data-dependent mixes, official order
  w,k,v,r,g, are stored in fla's order r,w,k,v,g: `time_maa_w1 (C, 5D)` -> `attn.x_proj.0.linear.weight
  (5D, C)`, `time_maa_w2 (5, D, C)` -> `attn.x_proj.2.weight (C, 5D)`, and `time_maa_r/w/k/v/g (1,1,C)`
  stacked into `attn.x_bias (5, C)`;
- `receptance/key/value/gate.weight` -> `attn.{r,k,v,g}_proj.linear.weight`;
- the decay LoRA `time_decay_w1 (C, Dd)`, `time_decay_w2 (Dd, A)`, `time_decay (1,1,A)` ->
  `attn.w_proj.linear.lora.0.weight (Dd, C)`, `lora.2.weight (A, Dd)`, `lora.2.bias (A)`;
- `time_faaaa (H, N)` -> `attn.bonus`; ffn `time_maa_k/r` -> `ffn.key.mu` / `ffn.receptance.mu (C)`,
  `ffn.key/receptance.weight` -> `ffn.key/receptance.linear.weight`, `ffn.value.weight` unchanged.

RWKV-7: `receptance/key/value` -> `attn.r/k/v_proj`; each LoRA `{w,a,v}0 (1,1,C)`, `{w,a,v,g}1 (C, D)`,
`{w,a,v,g}2 (D, C)` -> `attn.{w,a,v,g}_lora.lora.2.bias (C)`, `lora.0.weight (D, C)`,
`lora.2.weight (C, D)` (g has no bias; layer 0 has no v_lora: the official file's unused layer-0
v0/v1/v2 are dropped and come back as zeros); `k_k`, `k_a (1,1,C)` -> `(C)`; `x_r..x_g` stay
`(1,1,C)`; ffn `x_k (1,1,C)` -> `ffn.x_k (C)`; `r_k` unchanged.

Every map is a reshape/transpose/concatenation, so both directions are bit-exact. fla's own
numerics are not ours to vouch for (its layers warn "potentially buggy" and point at the official
code); a caveat in its RWKV-6 config: one `norm_eps` serves the LayerNorms (1e-5) and `g_norm`,
whose official eps is 64e-5 — fla's converter patches `g_norm.eps` after loading.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from rwkv_jax.config import RWKVConfig
from rwkv_jax.io.hf import check_config_matches, read_config, read_weights, write_weights
from rwkv_jax.io.official import (CheckpointError, Params, checked_official, infer_config, params_from_official)

FLA_MODEL_TYPES = {6: "rwkv6", 7: "rwkv7"}
FLA_ARCHITECTURES = {6: "RWKV6ForCausalLM", 7: "RWKV7ForCausalLM"}
_V6_MIX_ORDER = ("w", "k", "v", "r", "g")  # official time_maa_w1/w2 blocks
_FLA_MIX_ORDER = ("r", "w", "k", "v", "g")  # fla x_proj / x_bias rows
_NORMS = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
_V7_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
_V6_PROJ = {"receptance": "r_proj.linear", "key": "k_proj.linear", "value": "v_proj.linear",
            "gate": "g_proj.linear", "output": "o_proj", "ln_x": "g_norm"}
_V6_FFN = {"key": "key.linear", "receptance": "receptance.linear", "value": "value"}
_V7_LORA = re.compile(r"^([wavg])([012])$")


def is_fla_layout(keys: Any) -> bool:
    return any(k.startswith("model.layers.") for k in keys)


def _check_fla_version(cfg: RWKVConfig) -> None:
    if cfg.version not in FLA_MODEL_TYPES:
        raise CheckpointError(f"flash-linear-attention has no RWKV-{cfg.version} layout (only RWKV-6 and RWKV-7)")


def _row(value: np.ndarray) -> np.ndarray:
    return value.reshape(-1)


def fla_tensors(cfg: RWKVConfig, params: Params) -> dict[str, np.ndarray]:
    """Our parameters as an fla state_dict."""
    _check_fla_version(cfg)
    official = checked_official(cfg, params)
    out: dict[str, np.ndarray] = {"model.embeddings.weight": official["emb.weight"],
                                  "model.norm.weight": official["ln_out.weight"],
                                  "model.norm.bias": official["ln_out.bias"],
                                  "lm_head.weight": official["head.weight"]}
    C = cfg.n_embd
    for layer in range(cfg.n_layer):
        src, dst = f"blocks.{layer}.", f"model.layers.{layer}."
        get = lambda name: official[src + name]  # noqa: E731
        for norm, fla_norm in _NORMS.items():
            if src + norm + ".weight" in official:
                for leaf in ("weight", "bias"):
                    out[f"{dst}{fla_norm}.{leaf}"] = get(f"{norm}.{leaf}")
        if cfg.version == 6:
            D = cfg.d_mix
            w1 = get("att.time_maa_w1").reshape(C, 5, D)
            w2 = get("att.time_maa_w2")
            order = [_V6_MIX_ORDER.index(name) for name in _FLA_MIX_ORDER]
            out[dst + "attn.x_proj.0.mu"] = _row(get("att.time_maa_x"))
            out[dst + "attn.x_proj.0.linear.weight"] = np.ascontiguousarray(w1[:, order].reshape(C, 5 * D).T)
            out[dst + "attn.x_proj.2.weight"] = np.ascontiguousarray(w2[order].reshape(5 * D, C).T)
            out[dst + "attn.x_bias"] = np.stack([_row(get(f"att.time_maa_{name}")) for name in _FLA_MIX_ORDER])
            for name, fla_name in _V6_PROJ.items():
                for leaf in ("weight", "bias") if name == "ln_x" else ("weight",):
                    out[f"{dst}attn.{fla_name}.{leaf}"] = get(f"att.{name}.{leaf}")
            out[dst + "attn.w_proj.linear.lora.0.weight"] = np.ascontiguousarray(get("att.time_decay_w1").T)
            out[dst + "attn.w_proj.linear.lora.2.weight"] = np.ascontiguousarray(get("att.time_decay_w2").T)
            out[dst + "attn.w_proj.linear.lora.2.bias"] = _row(get("att.time_decay"))
            out[dst + "attn.bonus"] = get("att.time_faaaa")
            out[dst + "ffn.key.mu"] = _row(get("ffn.time_maa_k"))
            out[dst + "ffn.receptance.mu"] = _row(get("ffn.time_maa_r"))
            for name, fla_name in _V6_FFN.items():
                out[f"{dst}ffn.{fla_name}.weight"] = get(f"ffn.{name}.weight")
        else:
            for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "r_k"):
                out[f"{dst}attn.{name}"] = get(f"att.{name}")
            for name in ("k_k", "k_a"):
                out[f"{dst}attn.{name}"] = _row(get(f"att.{name}"))
            for name, fla_name in _V7_PROJ.items():
                for leaf in ("weight", "bias") if name == "ln_x" else ("weight",):
                    out[f"{dst}attn.{fla_name}.{leaf}"] = get(f"att.{name}.{leaf}")
            for lora in ("w", "a", "v", "g"):
                if lora == "v" and layer == 0:
                    continue  # never used: layer 0 has no value residual, and fla has no such module
                out[f"{dst}attn.{lora}_lora.lora.0.weight"] = np.ascontiguousarray(get(f"att.{lora}1").T)
                out[f"{dst}attn.{lora}_lora.lora.2.weight"] = np.ascontiguousarray(get(f"att.{lora}2").T)
                if lora != "g":
                    out[f"{dst}attn.{lora}_lora.lora.2.bias"] = _row(get(f"att.{lora}0"))
            out[dst + "ffn.x_k"] = _row(get("ffn.x_k"))
            out[dst + "ffn.key.weight"] = get("ffn.key.weight")
            out[dst + "ffn.value.weight"] = get("ffn.value.weight")
    return out


class _Taker:
    """Pops tensors by name, collecting missing names, so one error can list every problem."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.left = dict(tensors)
        self.missing: list[str] = []

    def __call__(self, key: str) -> np.ndarray:
        if key not in self.left:
            self.missing.append(key)
            return np.zeros((0,), np.float32)
        return self.left.pop(key)


def official_from_fla(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An fla RWKV-6/7 state_dict -> official keys, shapes and values (raises CheckpointError
    naming missing or unexpected keys, or a tensor whose shape does not fit)."""
    keys = set(tensors)
    version = 7 if any(".attn.w_lora." in k for k in keys) else 6 if any(".attn.x_proj." in k for k in keys) else None
    if version is None:
        raise CheckpointError("fla checkpoint without 'attn.w_lora' (RWKV-7) or 'attn.x_proj' (RWKV-6) keys: "
                              f"not an fla RWKV model (first keys {sorted(keys)[:5]})")
    take = _Taker(tensors)
    layers = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"^model\.layers\.(\d+)\.", k)))
    out = {"emb.weight": take("model.embeddings.weight"), "ln_out.weight": take("model.norm.weight"),
           "ln_out.bias": take("model.norm.bias"), "head.weight": take("lm_head.weight")}
    stopped = False
    try:
        for layer in range(layers):
            src, dst = f"model.layers.{layer}.", f"blocks.{layer}."
            for norm, fla_norm in _NORMS.items():
                if norm != "ln0" or layer == 0:
                    for leaf in ("weight", "bias"):
                        out[f"{dst}{norm}.{leaf}"] = take(f"{src}{fla_norm}.{leaf}")
            if version == 6:
                _v6_layer_from_fla(take, src, dst, out)
            else:
                _v7_layer_from_fla(take, src, dst, out, layer)
    except ValueError as error:  # a reshape that does not fit: a missing key or inconsistent shapes
        if not take.missing:
            raise CheckpointError(f"fla RWKV-{version} tensors have inconsistent shapes: {error}") from error
        stopped = True  # the keys not reached yet are not "unexpected"
    unexpected = [] if stopped else sorted(take.left)
    if take.missing or unexpected:
        raise CheckpointError(f"fla RWKV-{version} checkpoint does not match the layout: "
                              + "; ".join(f"{what} {keys}" for what, keys in
                                          (("missing keys", sorted(take.missing)),
                                           ("unexpected keys", unexpected)) if keys))
    return out


def _v6_layer_from_fla(take: _Taker, src: str, dst: str, out: dict[str, np.ndarray]) -> None:
    mu = take(src + "attn.x_proj.0.mu")
    C = mu.shape[0]
    w1 = take(src + "attn.x_proj.0.linear.weight")  # (5D, C), fla order
    w2 = take(src + "attn.x_proj.2.weight")  # (C, 5D)
    bias = take(src + "attn.x_bias")  # (5, C)
    D = w1.shape[0] // 5
    order = [_FLA_MIX_ORDER.index(name) for name in _V6_MIX_ORDER]
    out[dst + "att.time_maa_x"] = mu.reshape(1, 1, C)
    for i, name in enumerate(_FLA_MIX_ORDER):
        out[f"{dst}att.time_maa_{name}"] = bias[i].reshape(1, 1, C)
    out[dst + "att.time_maa_w1"] = np.ascontiguousarray(w1.reshape(5, D, C)[order].transpose(2, 0, 1).reshape(C, 5 * D))
    out[dst + "att.time_maa_w2"] = np.ascontiguousarray(w2.T.reshape(5, D, C)[order])
    decay_bias = take(src + "attn.w_proj.linear.lora.2.bias")
    out[dst + "att.time_decay"] = decay_bias.reshape(1, 1, -1)
    out[dst + "att.time_decay_w1"] = np.ascontiguousarray(take(src + "attn.w_proj.linear.lora.0.weight").T)
    out[dst + "att.time_decay_w2"] = np.ascontiguousarray(take(src + "attn.w_proj.linear.lora.2.weight").T)
    out[dst + "att.time_faaaa"] = take(src + "attn.bonus")
    for name, fla_name in _V6_PROJ.items():
        for leaf in ("weight", "bias") if name == "ln_x" else ("weight",):
            out[f"{dst}att.{name}.{leaf}"] = take(f"{src}attn.{fla_name}.{leaf}")
    out[dst + "ffn.time_maa_k"] = take(src + "ffn.key.mu").reshape(1, 1, C)
    out[dst + "ffn.time_maa_r"] = take(src + "ffn.receptance.mu").reshape(1, 1, C)
    for name, fla_name in _V6_FFN.items():
        out[f"{dst}ffn.{name}.weight"] = take(f"{src}ffn.{fla_name}.weight")


def _v7_layer_from_fla(take: _Taker, src: str, dst: str, out: dict[str, np.ndarray], layer: int) -> None:
    for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "r_k"):
        out[f"{dst}att.{name}"] = take(f"{src}attn.{name}")
    for name in ("k_k", "k_a"):
        out[f"{dst}att.{name}"] = take(f"{src}attn.{name}").reshape(1, 1, -1)
    for name, fla_name in _V7_PROJ.items():
        for leaf in ("weight", "bias") if name == "ln_x" else ("weight",):
            out[f"{dst}att.{name}.{leaf}"] = take(f"{src}attn.{fla_name}.{leaf}")
    for lora in ("w", "a", "v", "g"):
        if lora == "v" and layer == 0:
            continue  # params_from_official fills the unused layer-0 v0/v1/v2 with zeros
        out[f"{dst}att.{lora}1"] = np.ascontiguousarray(take(f"{src}attn.{lora}_lora.lora.0.weight").T)
        out[f"{dst}att.{lora}2"] = np.ascontiguousarray(take(f"{src}attn.{lora}_lora.lora.2.weight").T)
        if lora != "g":
            out[f"{dst}att.{lora}0"] = take(f"{src}attn.{lora}_lora.lora.2.bias").reshape(1, 1, -1)
    out[dst + "ffn.x_k"] = take(src + "ffn.x_k").reshape(1, 1, -1)
    out[dst + "ffn.key.weight"] = take(src + "ffn.key.weight")
    out[dst + "ffn.value.weight"] = take(src + "ffn.value.weight")


def fla_config(cfg: RWKVConfig) -> dict[str, Any]:
    """The config.json of `cfg` in fla's layout (`RWKV6Config` / `RWKV7Config` fields)."""
    _check_fla_version(cfg)
    config: dict[str, Any] = {
        "architectures": [FLA_ARCHITECTURES[cfg.version]], "model_type": FLA_MODEL_TYPES[cfg.version],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
        "intermediate_size": cfg.dim_ffn, "hidden_ratio": cfg.dim_ffn / cfg.n_embd, "hidden_act": "sqrelu",
        "head_dim": cfg.head_size, "num_heads": cfg.n_head, "norm_first": True, "norm_bias": True,
        "norm_eps": 1e-5, "tie_word_embeddings": False, "use_cache": True, "fuse_norm": False,
        "torch_dtype": cfg.param_dtype,
    }
    if cfg.version == 6:
        config.update(attn_mode="chunk", expand_k=cfg.dim_att / cfg.n_embd, expand_v=cfg.dim_att / cfg.n_embd,
                      proj_low_rank_dim=cfg.d_mix, gate_low_rank_dim=cfg.d_decay)
    else:
        config.update(attn_mode="chunk", decay_low_rank_dim=cfg.d_w, a_low_rank_dim=cfg.d_a,
                      v_low_rank_dim=cfg.d_v, gate_low_rank_dim=cfg.d_g, value_dim=[cfg.n_embd] * cfg.n_layer)
    return config


def params_from_fla(tensors: Mapping[str, np.ndarray], config: Mapping[str, Any] | None = None,
                    **config_overrides: Any) -> tuple[RWKVConfig, Params]:
    """fla-layout tensors (and optionally their config.json, checked against the weights) -> ours."""
    official = official_from_fla(tensors)
    cfg = infer_config(official, **config_overrides)
    _check_fla_version(cfg)
    params = params_from_official(cfg, official)
    check_config_matches(config, cfg, {"vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd,
                                       "num_hidden_layers": cfg.n_layer, "intermediate_size": cfg.dim_ffn})
    return cfg, params


def load_fla(path: str | os.PathLike, **config_overrides: Any) -> tuple[RWKVConfig, Params]:
    """Load an fla RWKV-6/7 directory (or one of its weight files) as `(cfg, params)`."""
    return params_from_fla(read_weights(path), read_config(path), **config_overrides)


def save_fla(directory: str | os.PathLike, cfg: RWKVConfig, params: Params, safetensors: bool = True) -> None:
    """Write `cfg, params` as an fla directory: config.json and model.safetensors (or .bin)."""
    write_weights(directory, fla_tensors(cfg, params), fla_config(cfg), safetensors)


__all__ = ["fla_config", "fla_tensors", "load_fla", "official_from_fla", "params_from_fla", "save_fla"]
