"""RWKV-6 "Finch" time mix (spec §8): data-dependent token shift ("ddlerp", five LoRAs) and
data-dependent per-token decay; the rest is RWKV-5's matrix-state WKV, GroupNorm and gate."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rwkv_jax.config import RWKVConfig, layer_ratios
from rwkv_jax.layers import channel_ratio, constant, linear, lora, maa_mix, orthogonal, token_shift, uniform
from rwkv_jax.versions.v5 import bonus_init, decay_speed, diag_wkv_and_output

Array = jax.Array
DDLERP_ORDER = ("w", "k", "v", "r", "g")  # the order of the five blocks of time_maa_w1/w2


class TimeMix6(nn.Module):
    """`x [B, T, C]` (after ln1) -> output `[B, T, C]` and the new time-mix state; `reset [B, T]`
    (or None) marks document starts."""

    cfg: RWKVConfig

    @nn.compact
    def __call__(self, x: Array, state: dict[str, Array], layer: Array, v_first: Array,
                 reset: Array | None = None) -> tuple[Array, dict[str, Array], Array]:
        cfg = self.cfg
        C, A, H, N, dt = cfg.n_embd, cfg.dim_att, cfg.n_head, cfg.head_size, cfg.params_dtype
        D_mix, D_decay = cfg.d_mix, cfg.d_decay
        r0, r1 = layer_ratios(layer, cfg.n_layer)
        ddd = channel_ratio(C)
        maa_inits = {"x": 1 - ddd**r1, "w": 1 - ddd**r1, "k": 1 - ddd**r1, "v": 1 - (ddd**r1 + 0.3 * r0),
                     "r": 1 - ddd ** (0.5 * r1), "g": 1 - ddd ** (0.5 * r1)}
        maa = {name: self.param(f"time_maa_{name}", constant(lambda m=m: m), (1, 1, C), dt).astype(x.dtype)
               for name, m in maa_inits.items()}
        maa_w1 = self.param("time_maa_w1", nn.initializers.zeros, (C, 5 * D_mix), dt).astype(x.dtype)
        maa_w2 = self.param("time_maa_w2", uniform(0.01), (5, D_mix, C), dt).astype(x.dtype)
        time_decay = self.param("time_decay", constant(lambda: decay_speed(layer, cfg).reshape(1, 1, A)),
                                (1, 1, A), dt)
        decay_w1 = self.param("time_decay_w1", nn.initializers.zeros, (C, D_decay), dt)
        decay_w2 = self.param("time_decay_w2", uniform(0.01), (D_decay, A), dt)
        time_faaaa = self.param("time_faaaa", constant(lambda: bonus_init(layer, cfg)), (H, N), dt)

        delta = token_shift(x, state["att_x"], reset) - x
        hidden = jnp.tanh(maa_mix(x, delta, maa["x"]) @ maa_w1)
        hidden = hidden.reshape(*hidden.shape[:-1], 5, D_mix)
        data_mix = jnp.einsum("btfd,fdc->fbtc", hidden, maa_w2)
        mixed = {name: maa_mix(x, delta, maa[name] + data_mix[i]) for i, name in enumerate(DDLERP_ORDER)}

        r = linear(cfg, A, "receptance", orthogonal(1.0))(mixed["r"])
        k = linear(cfg, A, "key", orthogonal(0.1))(mixed["k"])
        v = linear(cfg, A, "value", orthogonal(1.0))(mixed["v"])
        g = jax.nn.silu(linear(cfg, A, "gate", orthogonal(0.1))(mixed["g"]))

        decay_logit = time_decay.astype(jnp.float32) + lora(mixed["w"], decay_w1, decay_w2, jnp.tanh).astype(jnp.float32)
        logw = -jnp.exp(decay_logit).reshape(*x.shape[:2], H, N)
        out, kv = diag_wkv_and_output(cfg, layer, r, logw, k, v, time_faaaa, g, state["att_kv"], x.dtype, reset)
        return out, {"att_x": x[:, -1], "att_kv": kv}, v_first
