"""RWKV-7 "Goose" time mix (spec §9): generalised delta rule with in-context learning rate `a`,
normalised removal key, value residual to layer 0 and a decay soft-clamped to (0.545, 1)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.dplr import wkv7_pallas
from rwkv_jax.config import RWKVConfig, layer_ratios
from rwkv_jax.layers import HeadGroupNorm, channel_ratio, constant, linear, lora, maa_mix, orthogonal, token_shift
from rwkv_jax.versions.v5 import heads, ln_x_scale
from rwkv_jax.wkv import WKVForms, run_wkv
from rwkv_jax.wkv.dplr import wkv7_oracle, wkv7_parallel, wkv7_step
from rwkv_jax.wkv.mesh import DPLR_TRANSITION

Array = jax.Array
WKV7 = WKVForms(oracle=wkv7_oracle, parallel=wkv7_parallel, step=wkv7_step, pallas=wkv7_pallas,
                shard_transition=DPLR_TRANSITION)
# w = exp(-e^{-0.5} sigmoid(z)) keeps every decay in (0.5453, 1).
DECAY_SCALE = math.exp(-0.5)
L2_NORM_EPS = 1e-12


def lora_up_init(rows: int, cols: int) -> nn.initializers.Initializer:
    """Official `ortho_init(zeros(rows, cols), 0.1)` for the second LoRA matrices."""
    return orthogonal(0.1 * (math.sqrt(rows / cols) if rows > cols else 1.0))


class TimeMix7(nn.Module):
    """`x [B, T, C]` (after ln1), `v_first [B, T, C]` (layer 0's value; ignored at layer 0) ->
    output `[B, T, C]`, the new time-mix state and `v_first` for the next layer; `reset [B, T]`
    (or None) marks document starts."""

    cfg: RWKVConfig

    @nn.compact
    def __call__(self, x: Array, state: dict[str, Array], layer: Array, v_first: Array,
                 reset: Array | None = None) -> tuple[Array, dict[str, Array], Array]:
        cfg = self.cfg
        C, H, N, dt = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.params_dtype
        r0, r1 = layer_ratios(layer, cfg.n_layer)
        ddd = channel_ratio(C)
        c = jnp.arange(C, dtype=jnp.float32).reshape(1, 1, C)
        linear_ramp = c / (C - 1) - 0.5
        zigzag = ((c % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * jnp.abs(zigzag)

        def vec(name: str, value_fn) -> Array:
            return self.param(name, constant(value_fn), (1, 1, C), dt).astype(x.dtype)

        shift_powers = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.7, "a": 0.9, "g": 0.2}
        mix = {name: vec(f"x_{name}", lambda p=p: 1 - ddd ** (p * r1)) for name, p in shift_powers.items()}
        w0 = self.param("w0", constant(lambda: -6 + 6 * (c / (C - 1)) ** (1 + r0**0.3) + 0.5 + 2.5 * zigzag),
                        (1, 1, C), dt)
        a0 = vec("a0", lambda: -0.19 + 0.3 * zigzag + 0.4 * linear_ramp)
        v0 = vec("v0", lambda: 0.73 - 0.4 * linear_ramp)
        k_k = vec("k_k", lambda: 0.71 - 0.1 * linear_ramp)
        k_a = vec("k_a", lambda: jnp.full((1, 1, C), 1.02))
        r_k = self.param("r_k", constant(lambda: jnp.full((H, N), -0.04)), (H, N), dt).astype(x.dtype)
        loras = {}
        for name, width in (("w", cfg.d_w), ("a", cfg.d_a), ("v", cfg.d_v), ("g", cfg.d_g)):
            loras[name] = (self.param(f"{name}1", nn.initializers.zeros, (C, width), dt),
                           self.param(f"{name}2", lora_up_init(width, C), (width, C), dt))

        delta = token_shift(x, state["att_x"], reset) - x
        xr, xw, xk, xv, xa, xg = (maa_mix(x, delta, mix[n]) for n in ("r", "w", "k", "v", "a", "g"))
        r = linear(cfg, C, "receptance", orthogonal(1.0))(xr)
        k = linear(cfg, C, "key", orthogonal(0.1))(xk)
        v = linear(cfg, C, "value", orthogonal(1.0))(xv)
        decay_logit = w0.astype(jnp.float32) + lora(xw, *loras["w"], jnp.tanh).astype(jnp.float32)
        a = jax.nn.sigmoid(a0 + lora(xa, *loras["a"]))
        g = lora(xg, *loras["g"], jax.nn.sigmoid)

        removal_key = heads(k * k_k, cfg)
        removal_key = removal_key / jnp.maximum(jnp.linalg.norm(removal_key, axis=-1, keepdims=True), L2_NORM_EPS)
        k = k * (1 + (a - 1) * k_a)
        # Layer 0 defines v_first; later layers lerp their value towards it (value residual).
        is_first = layer == 0
        v_first = jnp.where(is_first, v, v_first)
        v = jnp.where(is_first, v, v + (v_first - v) * jax.nn.sigmoid(v0 + lora(xv, *loras["v"])))

        logw = -DECAY_SCALE * jax.nn.sigmoid(decay_logit)
        a_heads = heads(a, cfg)
        y, kv = run_wkv(WKV7, cfg.wkv_impl,
                        (heads(r, cfg), heads(logw, cfg), heads(k, cfg), heads(v, cfg),
                         -removal_key, removal_key * a_heads),
                        (state["att_kv"],), reset, chunk_size=cfg.chunk_size)
        y = HeadGroupNorm(cfg, scale_init=ln_x_scale(layer, cfg), name="ln_x")(y)
        bonus = jnp.sum(heads(r * k, cfg) * r_k, axis=-1, keepdims=True) * heads(v, cfg)
        y = y + bonus.reshape(y.shape).astype(y.dtype)
        out = linear(cfg, C, "output", orthogonal(0.0))(y * g)
        return out, {"att_x": x[:, -1], "att_kv": kv}, v_first
