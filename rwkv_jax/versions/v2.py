"""RWKV-2 (spec §4): the first exponential-decay RNN. One `time_mix` for k, v and r, the WKV with
the k-clamp and ε (`wkv/vector_eps.py`), decays stored as (A, 1). Its block normalises the
residual stream itself (`x = ln1(x); x += att(x); ...`, see `rwkv_jax.model.Block`)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from rwkv_jax.config import RWKVConfig
from rwkv_jax.layers import constant, half_shift_mix, lerp_mix, linear, linear_gain, orthogonal, token_shift
from rwkv_jax.wkv import WKVForms, run_wkv
from rwkv_jax.wkv.vector_eps import wkv3_oracle, wkv3_parallel, wkv3_step

Array = jax.Array
WKV_EPS = WKVForms(oracle=wkv3_oracle, parallel=wkv3_parallel, step=wkv3_step)
K_CLAMP = 60.0  # official RWKV_K_CLAMP: k <= 60 before exp ("e^60 = 1e26") keeps the raw sums finite
K_EPS = 1e-16  # official RWKV_K_EPS of v2


def decay_init(layer: Array, cfg: RWKVConfig) -> Array:
    """Official v2 `time_decay` (A, 1): ln(f1 · f2^(7c/(A-1))) for channel c, with f1 going
    3.0 -> 1.2 and f2 0.65 -> 0.4 linearly over layers 1..L-1, then f1 += 0.5 at layer 1,
    f2 = 0.4 at layer L-2 and f2 = 0.37 at layer L-1. The official code divides by L - 2 (so
    needs L >= 3); max(L - 2, 1) lets smaller models be built too."""
    L, A = cfg.n_layer, cfg.dim_att
    progress = (layer - 1) / max(L - 2, 1)
    f1 = 3.0 + progress * (1.2 - 3.0) + jnp.where(layer == 1, 0.5, 0.0)
    f2 = jnp.where(layer == L - 1, 0.37, jnp.where(layer == L - 2, 0.4, 0.65 + progress * (0.4 - 0.65)))
    channel = jnp.arange(A, dtype=jnp.float32) / max(A - 1, 1)
    return jnp.log(f1 * f2 ** (7 * channel)).reshape(A, 1)


def clamped_wkv_and_output(cfg: RWKVConfig, k: Array, v: Array, r: Array, time_decay: Array, time_first: Array,
                           state: dict[str, Array], eps: float, reset: Array | None = None
                           ) -> tuple[Array, dict[str, Array]]:
    """The v2/v3 tail, called from inside a time-mix module (so `output` is its child): the WKV of
    min(k, 60) with ε, the sigmoid gate and the output projection. Returns (out, WKV state)."""
    log_decay = -jnp.exp(time_decay[:, 0].astype(jnp.float32))
    wkv_state = (state["att_aa"], state["att_bb"], state["att_pp"])
    y, (aa, bb, pp) = run_wkv(WKV_EPS, cfg.wkv_impl, (jnp.minimum(k, K_CLAMP), v),
                              (log_decay, time_first[:, 0].astype(jnp.float32), eps, wkv_state), reset)
    out = linear(cfg, cfg.n_embd, "output", orthogonal(0.0))(jax.nn.sigmoid(r) * y.astype(r.dtype))
    return out, {"att_aa": aa, "att_bb": bb, "att_pp": pp}


class TimeMix2(nn.Module):
    """`x [B, T, C]` (the normalised stream) -> output `[B, T, C]` and the new time-mix state;
    `reset [B, T]` (or None) marks document starts."""

    cfg: RWKVConfig

    @nn.compact
    def __call__(self, x: Array, state: dict[str, Array], layer: Array, v_first: Array,
                 reset: Array | None = None) -> tuple[Array, dict[str, Array], Array]:
        cfg = self.cfg
        C, A, dt = cfg.n_embd, cfg.dim_att, cfg.params_dtype
        time_decay = self.param("time_decay", constant(lambda: decay_init(layer, cfg)), (A, 1), dt)
        time_first = self.param("time_first", constant(lambda: jnp.full((A, 1), math.log(0.3))), (A, 1), dt)
        mix = self.param("time_mix", constant(lambda: half_shift_mix(C)), (1, 1, C), dt).astype(x.dtype)

        xm = lerp_mix(x, token_shift(x, state["att_x"], reset), mix)
        k = linear(cfg, A, "key", orthogonal(0.0))(xm)
        v = linear(cfg, A, "value", orthogonal(linear_gain(A, C)))(xm)
        r = linear(cfg, A, "receptance", orthogonal(0.0))(xm)
        out, wkv_state = clamped_wkv_and_output(cfg, k, v, r, time_decay, time_first, state, K_EPS, reset)
        return out, {"att_x": x[:, -1], **wkv_state}, v_first
