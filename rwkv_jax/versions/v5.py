"""RWKV-5.2 "Eagle" time mix (spec §7): lerp token shift, matrix-state WKV with per-channel
constant decay and bonus, per-head GroupNorm, SiLU gate."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rwkv_jax.config import RWKVConfig, layer_ratios
from rwkv_jax.layers import (HeadGroupNorm, channel_ratio, constant, lerp_mix, linear, orthogonal,
                             token_shift)
from rwkv_jax.wkv import WKVForms, run_wkv
from rwkv_jax.wkv.diag import wkv6_oracle, wkv6_parallel, wkv6_step

Array = jax.Array
WKV_DIAG = WKVForms(oracle=wkv6_oracle, parallel=wkv6_parallel, step=wkv6_step)


def decay_speed(layer: Array, cfg: RWKVConfig) -> Array:
    """Official v5/v6 `time_decay` init over the A channels: -6 + 5 (n/(A-1))^(0.7 + 1.3 r0)."""
    r0, _ = layer_ratios(layer, cfg.n_layer)
    n = jnp.arange(cfg.dim_att, dtype=jnp.float32) / max(cfg.dim_att - 1, 1)
    return -6 + 5 * n ** (0.7 + 1.3 * r0)


def bonus_init(layer: Array, cfg: RWKVConfig) -> Array:
    """Official v5/v6 `time_faaaa` init, shaped (H, N)."""
    r0, _ = layer_ratios(layer, cfg.n_layer)
    channel = jnp.arange(cfg.dim_att, dtype=jnp.float32)
    tmp = r0 * (1 - channel / max(cfg.dim_att - 1, 1)) + ((channel + 1) % 3 - 1) * 0.1
    return tmp.reshape(cfg.n_head, cfg.head_size)


def ln_x_scale(layer: Array, cfg: RWKVConfig) -> nn.initializers.Initializer:
    """`generate_init_weight` sets ln_x.weight = ((1 + l) / L) ** 0.7."""
    return constant(lambda: ((1 + layer) / cfg.n_layer) ** 0.7)


def heads(x: Array, cfg: RWKVConfig) -> Array:
    """`[B, T, A]` -> `[B, T, H, N]`."""
    return x.reshape(*x.shape[:-1], cfg.n_head, cfg.head_size)


def diag_wkv_and_output(cfg: RWKVConfig, layer: Array, r: Array, logw: Array, k: Array, v: Array,
                        u: Array, g: Array, state: Array, dtype: jnp.dtype) -> tuple[Array, Array]:
    """The v5/v6 tail, called from inside a time-mix module (so `ln_x` and `output` are its
    children): WKV over heads, GroupNorm, gate, output projection. Returns (out, new kv state)."""
    y, kv = run_wkv(WKV_DIAG, cfg.wkv_impl, (heads(r, cfg), logw, heads(k, cfg), heads(v, cfg)),
                    (u.astype(jnp.float32), state), chunk_size=cfg.chunk_size)
    y = HeadGroupNorm(cfg, scale_init=ln_x_scale(layer, cfg), name="ln_x")(y)
    out = linear(cfg, cfg.n_embd, "output", orthogonal(0.0))(y.astype(dtype) * g)
    return out, kv


class TimeMix5(nn.Module):
    """`x [B, T, C]` (after ln1) -> output `[B, T, C]` and the new time-mix state."""

    cfg: RWKVConfig

    @nn.compact
    def __call__(self, x: Array, state: dict[str, Array], layer: Array, v_first: Array
                 ) -> tuple[Array, dict[str, Array], Array]:
        cfg = self.cfg
        C, A, H, N, dt = cfg.n_embd, cfg.dim_att, cfg.n_head, cfg.head_size, cfg.params_dtype
        r0, r1 = layer_ratios(layer, cfg.n_layer)
        ddd = channel_ratio(C)
        mixes = {"k": ddd**r1, "v": ddd**r1 + 0.3 * r0, "r": ddd ** (0.5 * r1), "g": ddd ** (0.5 * r1)}
        mix = {name: self.param(f"time_mix_{name}", constant(lambda m=m: m), (1, 1, C), dt).astype(x.dtype)
               for name, m in mixes.items()}
        time_decay = self.param("time_decay", constant(lambda: decay_speed(layer, cfg).reshape(H, N)), (H, N), dt)
        time_faaaa = self.param("time_faaaa", constant(lambda: bonus_init(layer, cfg)), (H, N), dt)

        prev = token_shift(x, state["att_x"])
        r = linear(cfg, A, "receptance", orthogonal(1.0))(lerp_mix(x, prev, mix["r"]))
        k = linear(cfg, A, "key", orthogonal(0.1))(lerp_mix(x, prev, mix["k"]))
        v = linear(cfg, A, "value", orthogonal(1.0))(lerp_mix(x, prev, mix["v"]))
        g = jax.nn.silu(linear(cfg, A, "gate", orthogonal(0.1))(lerp_mix(x, prev, mix["g"])))

        logw = jnp.broadcast_to(-jnp.exp(time_decay.astype(jnp.float32)), (*x.shape[:2], H, N))
        out, kv = diag_wkv_and_output(cfg, layer, r, logw, k, v, time_faaaa, g, state["att_kv"], x.dtype)
        return out, {"att_x": x[:, -1], "att_kv": kv}, v_first
