"""The recurrent state pytree and its conversion to and from the official package's layout.

`init_state(cfg, B)` is a dict of arrays. Per-layer entries have a leading layer axis `[L, B, ...]`
so the layers can be scanned over:

- v1: `att_x [L,B,C]`, `att_buf [L,B,TT,A]` (the terms α(u)·e^{k_u}·v_u of every past position u,
  slot u; zero where not yet written), `att_den [L,B,A]` (Σ_u e^{k_u}), `ffn_x [L,B,C]`
  (spec §3.8; TT = ctx_len bounds the buffer because v1 is undefined past position TT - 1);
- v2/v3/v4: `att_x [L,B,C]`, `att_aa`, `att_bb`, `att_pp [L,B,A]` (the max-trick sums and
  log-scale; the official v2/v3 RNN's raw sums are `a = aa·e^pp`, `b = bb·e^pp`), `ffn_x [L,B,C]`;
- v5/v6: `att_x`, `att_kv [L,B,H,N,N]` laid out [key, value] (as the `rwkv` package), `ffn_x`;
- v7: `att_x`, `att_kv [L,B,H,N,N]` laid out [value, key] (as the `rwkv` package), `ffn_x`.

`att_x`/`ffn_x` hold the previous token's LayerNorm output for the token shift (v1 shifts only
its first C//2 channels). Model-level entries (no layer axis) of v1-v3:

- `pos [B]` int32: tokens seen so far, i.e. the absolute position of the next token (v1, and
  v2/v3 with a copy head);
- `copy_k [B,TT,D]`, `copy_tokens [B,TT]` int32: the copy head's keys and token ids of the last
  TT tokens, position p in slot p mod TT (when head_qk = D > 0).

Everything else is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import RWKVConfig
from rwkv_jax.wkv.vector import EMPTY_LOG_SCALE

State = dict[str, jax.Array]
INT_ENTRIES = ("pos", "copy_tokens")


def state_keys(cfg: RWKVConfig) -> tuple[str, ...]:
    """The per-layer entries (in the official package's order for v4-v7)."""
    if cfg.version == 1:
        return ("att_x", "att_buf", "att_den", "ffn_x")
    if cfg.version <= 4:
        return ("att_x", "att_aa", "att_bb", "att_pp", "ffn_x")
    return ("att_x", "att_kv", "ffn_x")


def state_shapes(cfg: RWKVConfig, batch_size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of every entry: per-layer ones `[L, B, ...]`, then the model-level ones `[B, ...]`."""
    L, B, C, A = cfg.n_layer, batch_size, cfg.n_embd, cfg.dim_att
    if cfg.version == 1:
        shapes = {"att_x": (L, B, C), "att_buf": (L, B, cfg.ctx_len, A), "att_den": (L, B, A), "ffn_x": (L, B, C)}
    elif cfg.version <= 4:
        shapes = {"att_x": (L, B, C), "att_aa": (L, B, A), "att_bb": (L, B, A), "att_pp": (L, B, A),
                  "ffn_x": (L, B, C)}
    else:
        H, N = cfg.n_head, cfg.head_size
        shapes = {"att_x": (L, B, C), "att_kv": (L, B, H, N, N), "ffn_x": (L, B, C)}
    if cfg.version == 1 or cfg.head_qk:
        shapes["pos"] = (B,)
    if cfg.head_qk:
        shapes.update(copy_k=(B, cfg.ctx_len, cfg.head_qk), copy_tokens=(B, cfg.ctx_len))
    return shapes


def init_state(cfg: RWKVConfig, batch_size: int) -> State:
    """The zero state (the log-scale of v2-v4 starts at -1e30, as in the official v4 code)."""
    return {name: jnp.full(shape, EMPTY_LOG_SCALE if name == "att_pp" else 0,
                           jnp.int32 if name in INT_ENTRIES else jnp.float32)
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


def _check_official_version(cfg: RWKVConfig) -> None:
    if cfg.version < 4:
        raise ValueError(f"the official `rwkv` package has no RWKV-{cfg.version}, so there is no official state "
                         "layout to convert to or from (state_to_official/state_from_official are for RWKV-4..7)")


def state_to_official(cfg: RWKVConfig, state: State) -> list[np.ndarray]:
    """Batch element 0 as the `rwkv` package's state list (v4: 5 entries per layer, v5-v7: 3)."""
    _check_official_version(cfg)
    return [np.asarray(state[name][layer, 0], np.float32)
            for layer in range(cfg.n_layer) for name in state_keys(cfg)]


def state_from_official(cfg: RWKVConfig, official: list) -> State:
    """The inverse of `state_to_official`: a batch-1 state from the package's list."""
    _check_official_version(cfg)
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
