"""Pieces every RWKV version shares: token shift, norms, linear layers, initialisers, channel mix.

Parameters mirror the official checkpoints: names are the official ones (`time_mix_k`, `x_r`,
`w1`, ...) and shapes are the official stored shapes (`(1, 1, C)` mixes broadcast against
`[B, T, C]` activations as they do in PyTorch). The only differences are flax's own leaf names
for its layers: a Linear's `kernel` is the transpose of the official `weight`, a norm's `scale`
is the official `weight`, and the embedding table is `embedding`. That keeps checkpoint porting a
mechanical renaming (see `rwkv_jax.io.official`).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from rwkv_jax.config import RWKVConfig, layer_ratios

Array = jax.Array
Initializer = Callable[..., Array]

LAYER_NORM_EPS = 1e-5
# GroupNorm eps of the v5-v7 output norm `ln_x`: the training code divides by head_size_divisor
# = 8 and uses eps 1e-5, which is exactly GroupNorm(y, eps = 1e-5 * 8**2) on undivided y.
GROUP_NORM_EPS = 64e-5


def token_shift(x: Array, prev: Array, reset: Array | None = None) -> Array:
    """The previous token's input for every position: `[B, T, C]`, `prev [B, C]` -> `[B, T, C]`.

    `reset [B, T]` bool marks tokens that start a new document: they see the zero shift state of
    `init_state` instead of the token before them.
    """
    shifted = jnp.concatenate([prev[:, None, :].astype(x.dtype), x[:, :-1]], axis=1)
    return shifted if reset is None else jnp.where(reset[..., None], jnp.zeros((), x.dtype), shifted)


def lerp_mix(x: Array, prev: Array, mix: Array) -> Array:
    """v2-v5 token shift: `mix * x + (1 - mix) * prev`."""
    return x * mix + prev * (1 - mix)


def maa_mix(x: Array, delta: Array, maa: Array) -> Array:
    """v6/v7 token shift: `x + (prev - x) * maa` with `delta = prev - x`."""
    return x + delta * maa


def layer_norm(cfg: RWKVConfig, name: str) -> nn.LayerNorm:
    """PyTorch-equivalent LayerNorm: eps 1e-5, two-pass variance, statistics in float32."""
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=cfg.compute_dtype,
                        param_dtype=cfg.params_dtype, name=name)


def group_norm_heads(y: Array, scale: Array, bias: Array, eps: float = GROUP_NORM_EPS) -> Array:
    """Per-head GroupNorm of the WKV output: `y [B, T, H, N]` -> `[B, T, H*N]`, affine `(H*N,)`."""
    y = y.astype(jnp.float32)
    mean = y.mean(-1, keepdims=True)
    var = jnp.square(y - mean).mean(-1, keepdims=True)
    y = (y - mean) * jax.lax.rsqrt(var + eps)
    y = y.reshape(*y.shape[:-2], -1)
    return y * scale.astype(jnp.float32) + bias.astype(jnp.float32)


class HeadGroupNorm(nn.Module):
    """`ln_x` of v5-v7: GroupNorm with one group per head; params `scale`, `bias` of shape (A,)."""

    cfg: RWKVConfig
    scale_init: Initializer = nn.initializers.ones

    @nn.compact
    def __call__(self, y: Array) -> Array:
        A = self.cfg.dim_att
        scale = self.param("scale", self.scale_init, (A,), self.cfg.params_dtype)
        bias = self.param("bias", nn.initializers.zeros, (A,), self.cfg.params_dtype)
        return group_norm_heads(y, scale, bias).astype(self.cfg.compute_dtype)


def linear(cfg: RWKVConfig, features: int, name: str, kernel_init: Initializer, use_bias: bool = False) -> nn.Dense:
    """A Linear, bias-free unless `use_bias` (v1's Linears; the official init zeroes biases); its
    `kernel [in, out]` is the transposed official `weight [out, in]`."""
    return nn.Dense(features, use_bias=use_bias, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                    kernel_init=kernel_init, bias_init=nn.initializers.zeros, name=name)


def linear_gain(rows: int, cols: int) -> float:
    """The v1-v4 `RWKV_Init` gain of a Linear with official weight (rows, cols): sqrt(rows/cols) if
    rows > cols, else 1."""
    return (rows / cols) ** 0.5 if rows > cols else 1.0


def orthogonal(gain: float) -> Initializer:
    """Official `nn.init.orthogonal_(w, gain)`; gain 0 gives zeros (the official "zero init").

    The QR runs in fp32 whatever the parameter dtype (jax ≥ 0.11 has no bf16 QR), then rounds.
    """
    if gain == 0:
        return nn.initializers.zeros
    fp32_orthogonal = nn.initializers.orthogonal(scale=gain)

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return fp32_orthogonal(key, shape, jnp.float32).astype(dtype)
    return init


def uniform(bound: float) -> Initializer:
    """U(-bound, bound)."""
    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def constant(value_fn: Callable[[], Array]) -> Initializer:
    """An initialiser returning a precomputed (possibly layer-dependent, traced) array."""
    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        del key
        return jnp.broadcast_to(value_fn(), shape).astype(dtype)
    return init


def half_shift_mix(n: int) -> Array:
    """RWKV-2's `time_mix` init, (1, 1, n): 0 for the first n//2 channels (previous token), 1 for
    the rest, i.e. exactly RWKV-1's half-channel token shift."""
    return (jnp.arange(n) >= n // 2).astype(jnp.float32).reshape(1, 1, n)


def channel_ratio(n: int) -> Array:
    """`ddd` of the official init: `i / n` for i in 0..n-1, shaped (1, 1, n)."""
    return (jnp.arange(n, dtype=jnp.float32) / n).reshape(1, 1, n)


def lora(x: Array, w1: Array, w2: Array, inner: Callable[[Array], Array] = lambda h: h) -> Array:
    """A low-rank projection `inner(x @ w1) @ w2` (official `w1 [C, D]`, `w2 [D, out]`)."""
    return inner(x @ w1.astype(x.dtype)) @ w2.astype(x.dtype)


class ChannelMix(nn.Module):
    """The squared-ReLU channel mix of v2-v7 (spec §2.2, §4.4, §5, §8.2, §9.2).

    v2 mixes key and receptance inputs with one `time_mix`, v3-v5 with `time_mix_k/r` (lerp), v6
    with `time_maa_k/r`, v7 with `x_k` and drops the receptance gate. Returns the output
    `[B, T, C]` and the new shift state (last input) `[B, C]`; tokens where `reset [B, T]` is
    True (document starts) shift in zeros.
    """

    cfg: RWKVConfig

    @nn.compact
    def __call__(self, x: Array, shift: Array, layer: Array, reset: Array | None = None) -> tuple[Array, Array]:
        cfg = self.cfg
        C, F, v = cfg.n_embd, cfg.dim_ffn, cfg.version
        _, r1 = layer_ratios(layer, cfg.n_layer)
        ddd = channel_ratio(C)
        prev = token_shift(x, shift, reset)
        dt = cfg.params_dtype
        if v == 2:
            mix = self.param("time_mix", constant(lambda: half_shift_mix(C)), (1, 1, C), dt)
            xk = xr = lerp_mix(x, prev, mix.astype(x.dtype))
        elif v in (3, 4, 5):
            mix_k = self.param("time_mix_k", constant(lambda: ddd**r1), (1, 1, C), dt)
            mix_r = self.param("time_mix_r", constant(lambda: ddd**r1), (1, 1, C), dt)
            xk = lerp_mix(x, prev, mix_k.astype(x.dtype))
            xr = lerp_mix(x, prev, mix_r.astype(x.dtype))
        elif v == 6:
            maa_k = self.param("time_maa_k", constant(lambda: 1 - ddd**r1), (1, 1, C), dt)
            maa_r = self.param("time_maa_r", constant(lambda: 1 - ddd**r1), (1, 1, C), dt)
            xk = maa_mix(x, prev - x, maa_k.astype(x.dtype))
            xr = maa_mix(x, prev - x, maa_r.astype(x.dtype))
        else:
            x_k = self.param("x_k", constant(lambda: 1 - ddd ** (r1**4)), (1, 1, C), dt)
            xk = maa_mix(x, prev - x, x_k.astype(x.dtype))

        # Official init: v2-v4 give ffn.key gain sqrt(F/C); v5+ use gain 1; value/receptance start at 0.
        key_gain = linear_gain(F, C) if v <= 4 else 1.0
        hidden = jnp.square(jax.nn.relu(linear(cfg, F, "key", orthogonal(key_gain))(xk)))
        out = linear(cfg, C, "value", orthogonal(0.0))(hidden)
        if v < 7:
            out = jax.nn.sigmoid(linear(cfg, C, "receptance", orthogonal(0.0))(xr)) * out
        return out, x[:, -1]
