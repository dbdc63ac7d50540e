"""RWKV-4 time mix (spec §6): lerp token shift, vector-state WKV with bonus u, sigmoid gate."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.vector import wkv4_pallas
from rwkv_jax.config import RWKVConfig, layer_ratios
from rwkv_jax.layers import channel_ratio, constant, lerp_mix, linear, orthogonal, token_shift
from rwkv_jax.wkv import WKVForms, run_wkv
from rwkv_jax.wkv.mesh import VECTOR_TRANSITION
from rwkv_jax.wkv.vector import wkv4_oracle, wkv4_parallel, wkv4_step

Array = jax.Array
WKV4 = WKVForms(oracle=wkv4_oracle, parallel=wkv4_parallel, step=wkv4_step, pallas=wkv4_pallas,
                shard_transition=VECTOR_TRANSITION)


def decay_bonus_and_mixes(module: nn.Module, cfg: RWKVConfig, layer: Array, dtype: jnp.dtype,
                          decay_shape: tuple[int, ...]) -> tuple[Array, Array, Array, Array, Array]:
    """The v3/v4 time-mix parameters, created on `module` with the official init (spec §5, §6.8):
    `time_decay`, `time_first` (shape `decay_shape`: v4 (A,), v3 (A, 1)) and the k/v/r lerp mixes
    (cast to `dtype`)."""
    C, A, dt = cfg.n_embd, cfg.dim_att, cfg.params_dtype
    r0, r1 = layer_ratios(layer, cfg.n_layer)
    ddd = channel_ratio(C)
    channel = jnp.arange(A, dtype=jnp.float32).reshape(decay_shape)
    zigzag = ((channel + 1) % 3 - 1) * 0.5
    time_decay = module.param(
        "time_decay", constant(lambda: -5 + 8 * (channel / max(A - 1, 1)) ** (0.7 + 1.3 * r0)), decay_shape, dt)
    time_first = module.param("time_first", constant(lambda: math.log(0.3) + zigzag), decay_shape, dt)
    mix_k = module.param("time_mix_k", constant(lambda: ddd**r1), (1, 1, C), dt).astype(dtype)
    mix_v = module.param("time_mix_v", constant(lambda: ddd**r1 + 0.3 * r0), (1, 1, C), dt).astype(dtype)
    mix_r = module.param("time_mix_r", constant(lambda: ddd ** (0.5 * r1)), (1, 1, C), dt).astype(dtype)
    return time_decay, time_first, mix_k, mix_v, mix_r


class TimeMix4(nn.Module):
    """`x [B, T, C]` (after ln1) -> output `[B, T, C]` and the new time-mix state; `reset [B, T]`
    (or None) marks document starts."""

    cfg: RWKVConfig

    @nn.compact
    def __call__(self, x: Array, state: dict[str, Array], layer: Array, v_first: Array,
                 reset: Array | None = None) -> tuple[Array, dict[str, Array], Array]:
        cfg = self.cfg
        C, A = cfg.n_embd, cfg.dim_att
        time_decay, time_first, mix_k, mix_v, mix_r = decay_bonus_and_mixes(self, cfg, layer, x.dtype, (A,))

        prev = token_shift(x, state["att_x"], reset)
        k = linear(cfg, A, "key", orthogonal(0.0))(lerp_mix(x, prev, mix_k))
        v = linear(cfg, A, "value", orthogonal((A / C) ** 0.5 if A > C else 1.0))(lerp_mix(x, prev, mix_v))
        r = linear(cfg, A, "receptance", orthogonal(0.0))(lerp_mix(x, prev, mix_r))

        log_decay = -jnp.exp(time_decay.astype(jnp.float32))
        wkv_state = (state["att_aa"], state["att_bb"], state["att_pp"])
        y, (aa, bb, pp) = run_wkv(WKV4, cfg.wkv_impl, (k, v), (log_decay, time_first.astype(jnp.float32), wkv_state),
                                  reset)
        out = linear(cfg, C, "output", orthogonal(0.0))(jax.nn.sigmoid(r) * y.astype(x.dtype))
        return out, {"att_x": x[:, -1], "att_aa": aa, "att_bb": bb, "att_pp": pp}, v_first
