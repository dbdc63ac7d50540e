"""RWKV-3 (spec §5): RWKV-2's WKV (k-clamp, ε = 1e-8, decays stored as (A, 1)) with separate
token-shift mixes for k, v and r, the pre-LN block with `ln0`, and the init curves RWKV-4 kept."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from rwkv_jax.config import RWKVConfig, layer_ratios
from rwkv_jax.layers import channel_ratio, constant, lerp_mix, linear, linear_gain, orthogonal, token_shift
from rwkv_jax.versions.v2 import clamped_wkv_and_output

Array = jax.Array
K_EPS = 1e-8  # official RWKV_K_EPS of v3


class TimeMix3(nn.Module):
    """`x [B, T, C]` (after ln1) -> output `[B, T, C]` and the new time-mix state."""

    cfg: RWKVConfig

    @nn.compact
    def __call__(self, x: Array, state: dict[str, Array], layer: Array, v_first: Array
                 ) -> tuple[Array, dict[str, Array], Array]:
        cfg = self.cfg
        C, A, dt = cfg.n_embd, cfg.dim_att, cfg.params_dtype
        r0, r1 = layer_ratios(layer, cfg.n_layer)
        ddd = channel_ratio(C)
        channel = jnp.arange(A, dtype=jnp.float32).reshape(A, 1)
        zigzag = ((channel + 1) % 3 - 1) * 0.5
        time_decay = self.param(
            "time_decay", constant(lambda: -5 + 8 * (channel / max(A - 1, 1)) ** (0.7 + 1.3 * r0)), (A, 1), dt)
        time_first = self.param("time_first", constant(lambda: math.log(0.3) + zigzag), (A, 1), dt)
        mix_k = self.param("time_mix_k", constant(lambda: ddd**r1), (1, 1, C), dt).astype(x.dtype)
        mix_v = self.param("time_mix_v", constant(lambda: ddd**r1 + 0.3 * r0), (1, 1, C), dt).astype(x.dtype)
        mix_r = self.param("time_mix_r", constant(lambda: ddd ** (0.5 * r1)), (1, 1, C), dt).astype(x.dtype)

        prev = token_shift(x, state["att_x"])
        k = linear(cfg, A, "key", orthogonal(0.0))(lerp_mix(x, prev, mix_k))
        v = linear(cfg, A, "value", orthogonal(linear_gain(A, C)))(lerp_mix(x, prev, mix_v))
        r = linear(cfg, A, "receptance", orthogonal(0.0))(lerp_mix(x, prev, mix_r))
        out, wkv_state = clamped_wkv_and_output(cfg, k, v, r, time_decay, time_first, state, K_EPS)
        return out, {"att_x": x[:, -1], **wkv_state}, v_first
