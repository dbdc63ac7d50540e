"""Our own checkpoint format: a directory with the model config as JSON and the parameters as an
orbax checkpoint (parameters only: no optimiser state, unlike `rwkv_jax.train.checkpoint`).

    DIR/config.json   RWKVConfig.to_json() plus {"format": "rwkv_jax.params"}
    DIR/params/       orbax StandardCheckpointer output (any sharding; dtypes kept)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from rwkv_jax.config import RWKVConfig
from rwkv_jax.io.hf import read_json_object
from rwkv_jax.io.official import CheckpointError, Params, abstract_params

FORMAT_TAG = "rwkv_jax.params"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def is_orbax_params_dir(path: str | os.PathLike) -> bool:
    config_file = Path(path) / CONFIG_FILE
    return config_file.is_file() and read_json_object(config_file).get("format") == FORMAT_TAG


def save_params(directory: str | os.PathLike, cfg: RWKVConfig, params: Params) -> None:
    """Write `params` (checked against `cfg`'s parameter tree) and `cfg` into `directory`, which
    must not hold a parameter checkpoint yet."""
    directory = Path(directory).absolute()
    expected = jax.tree_util.tree_map(lambda leaf: leaf.shape, abstract_params(cfg))
    actual = jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape), params)
    if expected != actual:
        raise CheckpointError(f"parameters do not match the RWKV-{cfg.version} config "
                              f"(tree or shapes differ: expected {expected}, got {actual})")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
    (directory / CONFIG_FILE).write_text(json.dumps({"format": FORMAT_TAG, **json.loads(cfg.to_json())},
                                                    indent=2, sort_keys=True) + "\n")


def load_params(directory: str | os.PathLike, **config_overrides: Any) -> tuple[RWKVConfig, Params]:
    """Read `(cfg, params)` written by `save_params`; parameters are restored with the stored
    dtypes onto the default device. `config_overrides` change runtime fields (e.g. `wkv`)."""
    directory = Path(directory).absolute()
    if not is_orbax_params_dir(directory):
        raise CheckpointError(f"{directory} is not an rwkv_jax parameter checkpoint "
                              f"(no {CONFIG_FILE} with format {FORMAT_TAG!r})")
    fields = read_json_object(directory / CONFIG_FILE)
    fields.pop("format")
    try:
        cfg = RWKVConfig(**fields)
    except (TypeError, ValueError) as error:  # an unknown field, or a value RWKVConfig refuses
        raise CheckpointError(f"{directory / CONFIG_FILE} is not a valid RWKVConfig: {error}") from None
    cfg = cfg.replace(**config_overrides)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(directory / PARAMS_DIR).item_metadata.tree
        # The stored dtypes (a converted bf16 file stays bf16), on this machine's default device.
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), stored)
        expected = jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape), abstract_params(cfg))
        if jax.tree_util.tree_map(lambda m: tuple(m.shape), target) != expected:
            raise CheckpointError(f"{directory / PARAMS_DIR} does not hold the parameters of its config.json")
        params = checkpointer.restore(directory / PARAMS_DIR, target)
    return cfg, params


__all__ = ["is_orbax_params_dir", "load_params", "save_params"]
