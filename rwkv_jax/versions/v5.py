"""RWKV-5 "Eagle" time mix (spec §7): lerp token shift, matrix-state WKV with constant decay and
bonus, per-head GroupNorm, SiLU gate. 5.2 has a decay and bonus per channel; the 5.0/5.1 previews
have one per head (broadcast over the head's N key channels here) and 5.0 has no gate."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.diag import wkv6_pallas
from rwkv_jax.config import RWKVConfig, layer_ratios
from rwkv_jax.layers import (HeadGroupNorm, channel_ratio, constant, lerp_mix, linear, orthogonal,
                             token_shift)
from rwkv_jax.wkv import WKVForms, run_wkv
from rwkv_jax.wkv.diag import wkv6_oracle, wkv6_parallel, wkv6_step
from rwkv_jax.wkv.mesh import DIAG_TRANSITION

Array = jax.Array
WKV_DIAG = WKVForms(oracle=wkv6_oracle, parallel=wkv6_parallel, step=wkv6_step, pallas=wkv6_pallas,
                    shard_transition=DIAG_TRANSITION)


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


def preview_decay_and_bonus(layer: Array, cfg: RWKVConfig) -> tuple[Array, Array]:
    """5.0/5.1 preview init, per head: decay -6 + 5 (h/(H-1))^(0.7 + 1.3 r0); bonus r0 (1 - h/(H-1))
    stored raw (`time_faaaa`) or -3 stored as its log (`time_first`, `cfg.v5_log_bonus`)."""
    r0, _ = layer_ratios(layer, cfg.n_layer)
    h = jnp.arange(cfg.n_head, dtype=jnp.float32) / max(cfg.n_head - 1, 1)
    bonus = jnp.full_like(h, -3.0) if cfg.v5_log_bonus else r0 * (1 - h)
    return -6 + 5 * h ** (0.7 + 1.3 * r0), bonus


def ln_x_scale(layer: Array, cfg: RWKVConfig) -> nn.initializers.Initializer:
    """`generate_init_weight` sets ln_x.weight = ((1 + l) / L) ** 0.7."""
    return constant(lambda: ((1 + layer) / cfg.n_layer) ** 0.7)


def heads(x: Array, cfg: RWKVConfig) -> Array:
    """`[B, T, A]` -> `[B, T, H, N]`."""
    return x.reshape(*x.shape[:-1], cfg.n_head, cfg.head_size)


def diag_wkv_and_output(cfg: RWKVConfig, layer: Array, r: Array, logw: Array, k: Array, v: Array,
                        u: Array, g: Array, state: Array, dtype: jnp.dtype, reset: Array | None = None
                        ) -> tuple[Array, Array]:
    """The v5/v6 tail, called from inside a time-mix module (so `ln_x` and `output` are its
    children): WKV over heads, GroupNorm, gate, output projection. Returns (out, new kv state)."""
    y, kv = run_wkv(WKV_DIAG, cfg.wkv_impl, (heads(r, cfg), logw, heads(k, cfg), heads(v, cfg)),
                    (u.astype(jnp.float32), state), reset, chunk_size=cfg.chunk_size)
    y = HeadGroupNorm(cfg, scale_init=ln_x_scale(layer, cfg), name="ln_x")(y)
    out = linear(cfg, cfg.n_embd, "output", orthogonal(0.0))(y.astype(dtype) * g)
    return out, kv


class TimeMix5(nn.Module):
    """`x [B, T, C]` (after ln1) -> output `[B, T, C]` and the new time-mix state."""

    cfg: RWKVConfig

    @nn.compact
    def __call__(self, x: Array, state: dict[str, Array], layer: Array, v_first: Array,
                 reset: Array | None = None) -> tuple[Array, dict[str, Array], Array]:
        cfg = self.cfg
        C, A, H, N, dt = cfg.n_embd, cfg.dim_att, cfg.n_head, cfg.head_size, cfg.params_dtype
        r0, r1 = layer_ratios(layer, cfg.n_layer)
        ddd = channel_ratio(C)
        gated = cfg.v5_variant != "5.0"
        mixes = {"k": ddd**r1, "v": ddd**r1 + 0.3 * r0, "r": ddd ** (0.5 * r1), "g": ddd ** (0.5 * r1)}
        mix = {name: self.param(f"time_mix_{name}", constant(lambda m=m: m), (1, 1, C), dt).astype(x.dtype)
               for name, m in mixes.items() if gated or name != "g"}
        if cfg.v5_variant == "5.2":
            time_decay = self.param("time_decay", constant(lambda: decay_speed(layer, cfg).reshape(H, N)), (H, N), dt)
            u = self.param("time_faaaa", constant(lambda: bonus_init(layer, cfg)), (H, N), dt)
        else:  # one decay and bonus per head, the same for the head's N key channels
            time_decay = self.param("time_decay", constant(lambda: preview_decay_and_bonus(layer, cfg)[0]), (H,), dt)
            bonus = self.param("time_first" if cfg.v5_log_bonus else "time_faaaa",
                               constant(lambda: preview_decay_and_bonus(layer, cfg)[1]), (H,), dt)
            bonus = jnp.exp(bonus.astype(jnp.float32)) if cfg.v5_log_bonus else bonus
            time_decay, u = time_decay[:, None], jnp.broadcast_to(bonus[:, None], (H, N))

        prev = token_shift(x, state["att_x"], reset)
        r = linear(cfg, A, "receptance", orthogonal(1.0))(lerp_mix(x, prev, mix["r"]))
        k = linear(cfg, A, "key", orthogonal(0.1))(lerp_mix(x, prev, mix["k"]))
        v = linear(cfg, A, "value", orthogonal(1.0))(lerp_mix(x, prev, mix["v"]))
        if gated:
            g = jax.nn.silu(linear(cfg, A, "gate", orthogonal(0.1))(lerp_mix(x, prev, mix["g"])))
        else:
            g = jnp.ones((), x.dtype)

        logw = jnp.broadcast_to(-jnp.exp(time_decay.astype(jnp.float32)), (*x.shape[:2], H, N))
        out, kv = diag_wkv_and_output(cfg, layer, r, logw, k, v, u, g, state["att_kv"], x.dtype, reset)
        return out, {"att_x": x[:, -1], "att_kv": kv}, v_first
