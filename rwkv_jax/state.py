"""The recurrent state pytree and its conversion to and from the official package's layout.

`init_state(cfg, B)` is a dict of arrays, each with a leading layer axis `[L, B, ...]` so the
layers can be scanned over:

- v4: `att_x [L,B,C]`, `att_aa`, `att_bb`, `att_pp [L,B,A]` (the official max-trick sums and
  log-scale), `ffn_x [L,B,C]`;
- v5/v6: `att_x`, `att_kv [L,B,H,N,N]` laid out [key, value] (as the `rwkv` package), `ffn_x`;
- v7: `att_x`, `att_kv [L,B,H,N,N]` laid out [value, key] (as the `rwkv` package), `ffn_x`.

`att_x`/`ffn_x` hold the previous token's LayerNorm output for the token shift. Everything is
float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import RWKVConfig
from rwkv_jax.wkv.vector import EMPTY_LOG_SCALE

State = dict[str, jax.Array]


def state_keys(cfg: RWKVConfig) -> tuple[str, ...]:
    """The per-layer entries in the official package's order."""
    if cfg.version == 4:
        return ("att_x", "att_aa", "att_bb", "att_pp", "ffn_x")
    return ("att_x", "att_kv", "ffn_x")


def state_shapes(cfg: RWKVConfig, batch_size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of every entry, `[L, B, ...]`."""
    L, B, C, A = cfg.n_layer, batch_size, cfg.n_embd, cfg.dim_att
    if cfg.version == 4:
        return {"att_x": (L, B, C), "att_aa": (L, B, A), "att_bb": (L, B, A), "att_pp": (L, B, A),
                "ffn_x": (L, B, C)}
    H, N = cfg.n_head, cfg.head_size
    return {"att_x": (L, B, C), "att_kv": (L, B, H, N, N), "ffn_x": (L, B, C)}


def init_state(cfg: RWKVConfig, batch_size: int) -> State:
    """The zero state (v4's log-scale starts at -1e30, as in the official code)."""
    return {name: jnp.full(shape, EMPTY_LOG_SCALE if name == "att_pp" else 0.0, jnp.float32)
            for name, shape in state_shapes(cfg, batch_size).items()}


def check_state(cfg: RWKVConfig, state: State, batch_size: int) -> None:
    """Raise a ValueError naming every entry whose presence or shape does not fit `cfg`."""
    expected = state_shapes(cfg, batch_size)
    problems = [f"missing {name}" for name in expected if name not in state]
    problems += [f"unexpected {name}" for name in state if name not in expected]
    problems += [f"{name} has shape {tuple(state[name].shape)}, expected {shape}"
                 for name, shape in expected.items() if name in state and tuple(state[name].shape) != shape]
    if problems:
        raise ValueError(f"state does not match the RWKV-{cfg.version} config (batch {batch_size}): "
                         + "; ".join(problems))


def state_to_official(cfg: RWKVConfig, state: State) -> list[np.ndarray]:
    """Batch element 0 as the `rwkv` package's state list (v4: 5 entries per layer, v5-v7: 3)."""
    return [np.asarray(state[name][layer, 0], np.float32)
            for layer in range(cfg.n_layer) for name in state_keys(cfg)]


def state_from_official(cfg: RWKVConfig, official: list) -> State:
    """The inverse of `state_to_official`: a batch-1 state from the package's list."""
    keys = state_keys(cfg)
    if len(official) != len(keys) * cfg.n_layer:
        raise ValueError(f"official RWKV-{cfg.version} state has {len(official)} entries, "
                         f"expected {len(keys) * cfg.n_layer} ({len(keys)} per layer)")
    shapes = state_shapes(cfg, 1)
    state = {}
    for i, name in enumerate(keys):
        layers = [np.asarray(official[layer * len(keys) + i], np.float32) for layer in range(cfg.n_layer)]
        stacked = np.stack(layers)[:, None]
        if stacked.shape != shapes[name]:
            raise ValueError(f"official state entry {name} has shape {layers[0].shape}, expected {shapes[name][2:]}")
        state[name] = jnp.asarray(stacked)
    return state
