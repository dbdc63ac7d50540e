"""RWKV-4 time mix (spec §6): lerp token shift, vector-state WKV with bonus u, sigmoid gate."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from rwkv_jax.config import RWKVConfig, layer_ratios
from rwkv_jax.layers import channel_ratio, constant, lerp_mix, linear, orthogonal, token_shift
from rwkv_jax.wkv import WKVForms, run_wkv
from rwkv_jax.wkv.vector import wkv4_oracle, wkv4_parallel, wkv4_step

Array = jax.Array
WKV4 = WKVForms(oracle=wkv4_oracle, parallel=wkv4_parallel, step=wkv4_step)


class TimeMix4(nn.Module):
    """`x [B, T, C]` (after ln1) -> output `[B, T, C]` and the new time-mix state."""

    cfg: RWKVConfig

    @nn.compact
    def __call__(self, x: Array, state: dict[str, Array], layer: Array, v_first: Array
                 ) -> tuple[Array, dict[str, Array], Array]:
        cfg = self.cfg
        C, A, dt = cfg.n_embd, cfg.dim_att, cfg.params_dtype
        r0, r1 = layer_ratios(layer, cfg.n_layer)
        ddd = channel_ratio(C)
        channel = jnp.arange(A, dtype=jnp.float32)
        zigzag = ((channel + 1) % 3 - 1) * 0.5
        time_decay = self.param(
            "time_decay", constant(lambda: -5 + 8 * (channel / max(A - 1, 1)) ** (0.7 + 1.3 * r0)), (A,), dt)
        time_first = self.param("time_first", constant(lambda: math.log(0.3) + zigzag), (A,), dt)
        mix_k = self.param("time_mix_k", constant(lambda: ddd**r1), (1, 1, C), dt).astype(x.dtype)
        mix_v = self.param("time_mix_v", constant(lambda: ddd**r1 + 0.3 * r0), (1, 1, C), dt).astype(x.dtype)
        mix_r = self.param("time_mix_r", constant(lambda: ddd ** (0.5 * r1)), (1, 1, C), dt).astype(x.dtype)

        prev = token_shift(x, state["att_x"])
        k = linear(cfg, A, "key", orthogonal(0.0))(lerp_mix(x, prev, mix_k))
        v = linear(cfg, A, "value", orthogonal((A / C) ** 0.5 if A > C else 1.0))(lerp_mix(x, prev, mix_v))
        r = linear(cfg, A, "receptance", orthogonal(0.0))(lerp_mix(x, prev, mix_r))

        log_decay = -jnp.exp(time_decay.astype(jnp.float32))
        wkv_state = (state["att_aa"], state["att_bb"], state["att_pp"])
        y, (aa, bb, pp) = run_wkv(WKV4, cfg.wkv_impl, (k, v), (log_decay, time_first.astype(jnp.float32), wkv_state))
        out = linear(cfg, C, "output", orthogonal(0.0))(jax.nn.sigmoid(r) * y.astype(x.dtype))
        return out, {"att_x": x[:, -1], "att_aa": aa, "att_bb": bb, "att_pp": pp}, v_first
