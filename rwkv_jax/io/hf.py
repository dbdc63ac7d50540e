"""Hugging Face layouts: transformers `RwkvForCausalLM` (RWKV-4) and the remote-code RWKV-5/6 models
(`RWKV/rwkv-5-world-*` `modeling_rwkv5.py`, `RWKV/v6-Finch-*-HF` `modeling_rwkv6.py`).

All three are the official state_dict under other names, with identical shapes and values
(transformers' `convert_rwkv_checkpoint_to_hf.py` only renames), so conversion goes through the
official keys of `rwkv_jax.io.official` and is bit-exact both ways:

    emb.weight              <-> rwkv.embeddings.weight
    blocks.0.ln0.*          <-> rwkv.blocks.0.pre_ln.*
    blocks.{l}.ln1/ln2.*    <-> rwkv.blocks.{l}.ln1/ln2.*
    blocks.{l}.att.<name>   <-> rwkv.blocks.{l}.attention.<name'>
    blocks.{l}.ffn.<name>   <-> rwkv.blocks.{l}.feed_forward.<name'>
    ln_out.*                <-> rwkv.ln_out.*
    head.weight             <-> head.weight

with `time_mix_k/v/r/g` <-> `time_mix_key/value/receptance/gate` (v6 keeps `time_maa_*`). The HF
models rescale `attention.output` / `feed_forward.value` by 2^(l // rescale_every) at inference
time only (the stored weights are the official ones).

Checked against the remote code itself (`modeling_rwkv5.py` of RWKV/rwkv-5-world-1b5,
`modeling_rwkv6.py` of the RWKV-6 HF repos): parameter names and shapes are exactly the official
ones under the names above (v5 `time_decay`/`time_faaaa` `(H, N)`, v6 `time_maa_w1 (C, 5·D)`,
`time_maa_w2 (5, D, C)` with D = 32, or 64 at hidden size 4096, decay LoRA 64 / 128). One
numerical difference of that code, not of the layout: its RWKV-5 `ln_x` GroupNorm uses torch's
default eps 1e-5 where the official package uses 64e-5 (its RWKV-6 uses 1e-5·head_size_divisor²
= 64e-5, like the official), so logits from the HF RWKV-5 code differ slightly from ours and the
official package's; the weights are the same. (Its RWKV-5 also folds `pre_ln` into the embedding
matrix on first use, as the official package does.)

This module also holds what every HF-style directory (`config.json` plus `model.safetensors`,
`pytorch_model.bin` or a sharded index) needs, shared with `rwkv_jax.io.fla`. safetensors are read
and written with the `safetensors` package's NumPy API (no torch); `.bin` files with the
restricted unpickler of `rwkv_jax.io.pth`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rwkv_jax.config import RWKVConfig
from rwkv_jax.io.official import (CheckpointError, Params, checked_official, infer_config, params_from_official)
from rwkv_jax.io.pth import read_pth, write_pth

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_MODEL_TYPES = {4: "rwkv", 5: "rwkv5", 6: "rwkv6"}
HF_ARCHITECTURES = {4: "RwkvForCausalLM", 5: "Rwkv5ForCausalLM", 6: "Rwkv6ForCausalLM"}
# Released HF repos whose remote code (modeling_rwkv5/6.py) runs these layouts: an exported
# config.json points `auto_map` at them ("repo--module.Class"), so `trust_remote_code` finds it.
HF_REMOTE_CODE = {5: ("RWKV/rwkv-5-world-1b5", "rwkv5"), 6: ("RWKV/v6-Finch-1B6-HF", "rwkv6")}
HF_RESCALE_EVERY = 6  # transformers' default; an inference-time trick, the stored weights are unscaled
_MIX_NAMES = {"time_mix_k": "time_mix_key", "time_mix_v": "time_mix_value", "time_mix_r": "time_mix_receptance",
              "time_mix_g": "time_mix_gate"}
_MIX_NAMES_BACK = {v: k for k, v in _MIX_NAMES.items()}
_MODULES = {"att": "attention", "ffn": "feed_forward", "ln0": "pre_ln", "ln1": "ln1", "ln2": "ln2"}
_MODULES_BACK = {v: k for k, v in _MODULES.items()}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(\w+)\.(.+)$")
_HF_BLOCK = re.compile(r"^rwkv\.blocks\.(\d+)\.(\w+)\.(.+)$")


# ------------------------------------------------------------------------------------------------
# HF-style directories and weight files
# ------------------------------------------------------------------------------------------------


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a `.safetensors`, a `.bin`/`.pth` torch file, or an HF directory (single file
    or sharded with an index), as numpy arrays keeping their dtypes."""
    path = Path(path)
    if path.is_dir():
        for index_name in SHARD_INDEXES:
            if (path / index_name).is_file():
                tensors: dict[str, np.ndarray] = {}
                for shard in _index_shards(path / index_name):
                    tensors.update(read_weights(path / shard))
                return tensors
        for name in (SAFETENSORS_FILE, BIN_FILE):
            if (path / name).is_file():
                return read_weights(path / name)
        raise CheckpointError(f"{path} has no {SAFETENSORS_FILE}, {BIN_FILE} or shard index")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(path)))
        except SafetensorError as error:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({error})") from None
        except AttributeError as error:  # the NumPy API looks the dtype up as an attribute of numpy
            raise CheckpointError(f"{path}: unsupported tensor dtype ({error})") from None
    return read_pth(path)


def _index_shards(index_file: Path) -> list[str]:
    """The shard files a `*.index.json` names (sorted, each once), checked to be plain file names."""
    index = read_json_object(index_file)
    weight_map = index.get("weight_map")
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise CheckpointError(f"{index_file} has no 'weight_map' object mapping tensor names to shard files")
    shards = sorted(set(weight_map.values()))
    # Shards live beside their index; a path elsewhere would also aim write_weights' clean-up there.
    outside = [shard for shard in shards if shard in ("", ".", "..") or Path(shard).name != shard]
    if outside:
        raise CheckpointError(f"{index_file} names shards that are not files of its directory: {outside}")
    return shards


def _remove_stale_weights(directory: Path, keep: str) -> None:
    """Delete the weight files other than `keep` that `read_weights` would read instead of it or
    beside it: the other single file, both shard indexes and the shards they list. Only files with
    these names are touched."""
    stale = {SAFETENSORS_FILE, BIN_FILE, *SHARD_INDEXES} - {keep}
    for index_name in SHARD_INDEXES:
        if (directory / index_name).is_file():
            try:
                shards = _index_shards(directory / index_name)
            except CheckpointError:
                continue  # an unreadable index names no shards we could safely remove; it goes itself
            stale.update(shard for shard in shards if shard.endswith((".safetensors", ".bin")))
    for name in sorted(stale - {keep, CONFIG_FILE}):
        if (directory / name).is_file():
            (directory / name).unlink()


def write_weights(directory: str | os.PathLike, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any],
                  safetensors: bool = True) -> None:
    """`config.json` plus `model.safetensors` (or `pytorch_model.bin`) in `directory`, after
    removing the weight files of an earlier model there that the reader would prefer or merge."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_file = SAFETENSORS_FILE if safetensors else BIN_FILE
    _remove_stale_weights(directory, weights_file)
    (directory / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    if safetensors:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / weights_file),
                  metadata={"format": "pt"})  # "pt": transformers refuses safetensors without it
    else:
        write_pth(directory / weights_file, dict(tensors))


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object (config.json, a shard index), or CheckpointError saying why not."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def read_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The `config.json` of an HF directory (or of a weight file's directory), or None."""
    path = Path(path)
    config_file = (path if path.is_dir() else path.parent) / CONFIG_FILE
    return read_json_object(config_file) if config_file.is_file() else None


def check_config_matches(config: Mapping[str, Any] | None, cfg: RWKVConfig, fields: Mapping[str, Any]) -> None:
    """Raise CheckpointError if `config.json` disagrees with the sizes found in the weights."""
    if not config:
        return
    wrong = [f"{name}={config[name]!r} (weights say {value!r})" for name, value in fields.items()
             if config.get(name) is not None and config[name] != value]
    if wrong:
        raise CheckpointError(f"config.json does not match the weights of this RWKV-{cfg.version} model: "
                              + ", ".join(wrong))


# ------------------------------------------------------------------------------------------------
# The transformers / RWKV remote-code layout
# ------------------------------------------------------------------------------------------------


def hf_name(key: str) -> str:
    """Official key -> HF key (raises CheckpointError for keys the HF models do not have)."""
    if key == "emb.weight":
        return "rwkv.embeddings.weight"
    if key.startswith("ln_out."):
        return "rwkv." + key
    if key == "head.weight":
        return key
    match = _BLOCK.match(key)
    if match and match.group(2) in _MODULES:
        layer, module, rest = match.groups()
        leaf, *tail = rest.split(".")
        return ".".join(["rwkv.blocks", layer, _MODULES[module], _MIX_NAMES.get(leaf, leaf), *tail])
    raise CheckpointError(f"official key {key!r} has no Hugging Face RWKV equivalent")


def official_name(key: str) -> str:
    """HF key -> official key (raises CheckpointError naming keys of no HF RWKV layout)."""
    if key == "rwkv.embeddings.weight":
        return "emb.weight"
    if key.startswith("rwkv.ln_out."):
        return key[len("rwkv."):]
    if key == "head.weight":
        return key
    match = _HF_BLOCK.match(key)
    if match and match.group(2) in _MODULES_BACK:
        layer, module, rest = match.groups()
        leaf, *tail = rest.split(".")
        return ".".join(["blocks", layer, _MODULES_BACK[module], _MIX_NAMES_BACK.get(leaf, leaf), *tail])
    raise CheckpointError(f"key {key!r} is not part of the Hugging Face RWKV-4/5/6 layout")


def is_hf_layout(keys: Any) -> bool:
    return any(k.startswith("rwkv.blocks.") for k in keys)


def _check_hf_version(cfg: RWKVConfig) -> None:
    if cfg.version not in HF_MODEL_TYPES or (cfg.version == 5 and cfg.v5_variant != "5.2"):
        raise CheckpointError(f"there is no Hugging Face layout for RWKV-{cfg.v5_variant or cfg.version} "
                              "(transformers has RWKV-4, the RWKV org's remote code RWKV-5.2 and 6)")


def hf_config(cfg: RWKVConfig, context_length: int = 4096) -> dict[str, Any]:
    """The config.json of `cfg` in the HF layout (the fields `RwkvConfig` / `Rwkv5Config` /
    `Rwkv6Config` read; `context_length` only sizes transformers' CUDA kernel)."""
    _check_hf_version(cfg)
    config: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[cfg.version]], "model_type": HF_MODEL_TYPES[cfg.version],
        "vocab_size": cfg.vocab_size, "context_length": context_length, "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer, "attention_hidden_size": cfg.dim_att, "intermediate_size": cfg.dim_ffn,
        "layer_norm_epsilon": 1e-5, "rescale_every": HF_RESCALE_EVERY, "bos_token_id": 0, "eos_token_id": 0,
        "tie_word_embeddings": False, "use_cache": True,
        "torch_dtype": cfg.param_dtype,
    }
    if cfg.version >= 5:
        repo, name = HF_REMOTE_CODE[cfg.version]
        config.update(head_size=cfg.head_size, head_size_divisor=8, num_attention_heads=cfg.n_head, auto_map={
            "AutoConfig": f"{repo}--configuration_{name}.{name.capitalize()}Config",
            "AutoModelForCausalLM": f"{repo}--modeling_{name}.{name.capitalize()}ForCausalLM"})
    return config


def hf_tensors(cfg: RWKVConfig, params: Params) -> dict[str, np.ndarray]:
    """Our parameters as an HF state_dict (the official arrays under HF names)."""
    _check_hf_version(cfg)
    if cfg.version == 6 and (cfg.d_mix, cfg.d_decay) != _hf_v6_lora_dims(cfg.n_embd):
        raise CheckpointError(f"modeling_rwkv6.py fixes the LoRA widths to {_hf_v6_lora_dims(cfg.n_embd)} for "
                              f"hidden_size {cfg.n_embd}; this model has d_mix={cfg.d_mix}, d_decay={cfg.d_decay}")
    return {hf_name(k): v for k, v in checked_official(cfg, params).items()}


def _hf_v6_lora_dims(n_embd: int) -> tuple[int, int]:
    return (64, 128) if n_embd == 4096 else (32, 64)


def params_from_hf(tensors: Mapping[str, np.ndarray], config: Mapping[str, Any] | None = None,
                   **config_overrides: Any) -> tuple[RWKVConfig, Params]:
    """HF-layout tensors (and optionally their config.json, checked against the weights) -> ours."""
    names = {official_name(k): k for k in tensors}
    official = {name: tensors[k] for name, k in names.items()}
    try:
        cfg = infer_config(official, **config_overrides)
        _check_hf_version(cfg)
        params = params_from_official(cfg, official)
    except CheckpointError as error:  # name the keys as they are in this file
        raise CheckpointError(_rename_keys(str(error), {**{k: hf_name(k) for k in _known(error)}, **names})) from None
    check_config_matches(config, cfg, {"vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd,
                                       "num_hidden_layers": cfg.n_layer, "attention_hidden_size": cfg.dim_att,
                                       "intermediate_size": cfg.dim_ffn})
    if config and config.get("model_type") not in (None, HF_MODEL_TYPES[cfg.version]):
        raise CheckpointError(f"config.json says model_type={config['model_type']!r} but the weights are "
                              f"RWKV-{cfg.version} ({HF_MODEL_TYPES[cfg.version]!r})")
    return cfg, params


def _known(error: CheckpointError) -> list[str]:
    """Official keys quoted in an error message that have an HF name (e.g. missing ones)."""
    found = []
    for key in re.findall(r"'([\w.]+)'", str(error)):
        try:
            hf_name(key)
            found.append(key)
        except CheckpointError:
            pass
    return found


def _rename_keys(message: str, names: Mapping[str, str]) -> str:
    """`message` with every whole official key replaced by its HF name."""
    for official in sorted(names, key=len, reverse=True):
        message = re.sub(r"(?<![\w.])" + re.escape(official) + r"(?![\w.])", names[official], message)
    return message


def load_hf(path: str | os.PathLike, **config_overrides: Any) -> tuple[RWKVConfig, Params]:
    """Load an HF RWKV-4/5/6 directory (or one of its weight files) as `(cfg, params)`."""
    return params_from_hf(read_weights(path), read_config(path), **config_overrides)


def save_hf(directory: str | os.PathLike, cfg: RWKVConfig, params: Params, safetensors: bool = True,
            context_length: int = 4096) -> None:
    """Write `cfg, params` as an HF directory: config.json and model.safetensors (or, with
    `safetensors=False`, pytorch_model.bin). RWKV-4 loads with `RwkvForCausalLM.from_pretrained`;
    RWKV-5/6 need the RWKV org's remote code (`auto_map` names it; `trust_remote_code=True`)."""
    write_weights(directory, hf_tensors(cfg, params), hf_config(cfg, context_length), safetensors)


__all__ = ["hf_config", "hf_name", "hf_tensors", "load_hf", "official_name", "params_from_hf", "read_config",
           "read_json_object", "read_weights", "save_hf", "write_weights"]
