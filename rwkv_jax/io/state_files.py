"""Official state-tuning files: `blocks.{l}.att.time_state` tensors <-> our recurrent state.

State tuning (RWKV-LM `--train_type states`, RWKV-PEFT) trains only the initial WKV state of every
layer and saves it as a `.pth` with one float32 tensor per layer, `blocks.{l}.att.time_state` of
shape (H, N, N) (a model merged with its tuned state holds the same keys next to the weights).
The tensor is the training kernel's state, indexed [value, key] in every version:

- v5/v6: the `rwkv` package keeps [key, value] and loads it as `time_state.transpose(1, 2)`
  (legacy `RWKV.forward`, zero-state branch); so do we (`att_kv` is [key, value]);
- v7: the package and our `att_kv` are [value, key] already: no transpose (the package's v7
  class has no time_state support, RWKV-PEFT / community runners inject it untransposed).

Only the WKV state is tuned: the token-shift entries (`att_x`, `ffn_x`) start at zero, as in the
package. RWKV-4 (and v1-v3) have no state tuning.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import RWKVConfig
from rwkv_jax.io.official import TIME_STATE, CheckpointError, split_time_state
from rwkv_jax.io.pth import read_pth, write_pth
from rwkv_jax.state import State, init_state

_TIME_STATE_KEY = re.compile(r"^blocks\.(\d+)\." + re.escape(TIME_STATE) + "$")


def _check_version(cfg: RWKVConfig) -> None:
    if cfg.version < 5:
        raise CheckpointError(f"RWKV-{cfg.version} has no matrix WKV state, so no state-tuning (time_state) files")


def _kv_from_time_state(cfg: RWKVConfig, time_state: np.ndarray) -> np.ndarray:
    """(H, N, N) [value, key] -> our att_kv layout for one layer and batch element."""
    return np.swapaxes(time_state, -1, -2) if cfg.version in (5, 6) else time_state


def time_state_tensors(cfg: RWKVConfig, state: Mapping[str, Any], batch_index: int = 0) -> dict[str, np.ndarray]:
    """`{blocks.{l}.att.time_state: (H, N, N) float32}` from batch element `batch_index` of `state`
    (its `att_kv [L, B, H, N, N]`; the token-shift entries are not part of a state file)."""
    _check_version(cfg)
    kv = np.asarray(state["att_kv"], np.float32)
    expected = (cfg.n_layer, cfg.n_head, cfg.head_size, cfg.head_size)
    if kv.ndim != 5 or (kv.shape[0], *kv.shape[2:]) != expected:
        raise CheckpointError(f"state att_kv has shape {kv.shape}, expected [L, B, H, N, N] with "
                              f"(L, H, N, N) = {expected}")
    batch = kv.shape[1]
    if not -batch <= batch_index < batch:
        raise ValueError(f"batch_index {batch_index} is out of range for a state of batch size {batch}")
    # The layout change is its own inverse (a transpose, or nothing for v7).
    return {f"blocks.{layer}.{TIME_STATE}": np.ascontiguousarray(_kv_from_time_state(cfg, kv[layer, batch_index]))
            for layer in range(cfg.n_layer)}


def state_from_time_state(cfg: RWKVConfig, tensors: Mapping[str, np.ndarray]) -> State:
    """A batch-1 `State` whose WKV state comes from `blocks.{l}.att.time_state` tensors (other
    keys are ignored, so a whole state-tuned model may be passed); everything else is zero.

    Raises CheckpointError naming missing, extra or wrongly shaped time_state keys.
    """
    _check_version(cfg)
    _, found = split_time_state(tensors)
    expected_keys = [f"blocks.{layer}.{TIME_STATE}" for layer in range(cfg.n_layer)]
    shape = (cfg.n_head, cfg.head_size, cfg.head_size)
    missing = [k for k in expected_keys if k not in found]
    unexpected = sorted(k for k in found if k not in expected_keys)
    wrong = [f"{k}: {tuple(found[k].shape)} (expected {shape})" for k in expected_keys
             if k in found and tuple(found[k].shape) != shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"time_state tensors do not match the RWKV-{cfg.version} config "
                              f"(n_layer={cfg.n_layer}, H={cfg.n_head}, N={cfg.head_size}): "
                              + "; ".join(f"{what} {keys}" for what, keys in
                                          (("missing keys", missing), ("unexpected keys", unexpected),
                                           ("shape mismatches", wrong)) if keys))
    state = dict(init_state(cfg, 1))
    kv = np.stack([_kv_from_time_state(cfg, np.asarray(found[k], np.float32)) for k in expected_keys])
    state["att_kv"] = jnp.asarray(kv[:, None])
    return state


def load_state_pth(path: str | os.PathLike, cfg: RWKVConfig) -> State:
    """Read a state-tuning `.pth` (or a model file holding `time_state` keys) as the batch-1
    initial `State` of a model of `cfg`; `jnp.repeat(x, B, axis=1)` (per-layer entries) or
    `axis=0` (model-level) makes a batch of it."""
    tensors = read_pth(path)
    if not split_time_state(tensors)[1]:
        raise CheckpointError(f"{os.fspath(path)} has no 'blocks.N.{TIME_STATE}' keys: not a state-tuning file")
    return state_from_time_state(cfg, tensors)


def save_state_pth(path: str | os.PathLike, cfg: RWKVConfig, state: Mapping[str, Any], batch_index: int = 0) -> None:
    """Write batch element `batch_index` of `state` as an official state-tuning `.pth`
    (`blocks.{l}.att.time_state`, float32, (H, N, N) [value, key])."""
    write_pth(path, time_state_tensors(cfg, state, batch_index))


__all__ = ["load_state_pth", "save_state_pth", "state_from_time_state", "time_state_tensors"]
