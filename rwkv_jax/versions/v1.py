"""RWKV-1 (spec §3): an AFT-style time mix whose token-to-token weights are a learned distance
curve times absolute-position factors (`wkv/toeplitz.py`), a Mish channel mix, the half-channel
token shift, Linears with biases, and a pre-LN block.

Names are the official ones: the block's submodules are `attn` and `mlp`, and the channel mix's
output Linear is literally called `weight` (`blocks.{l}.mlp.weight.weight`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import RWKVConfig
from rwkv_jax.layers import constant, layer_norm, linear, linear_gain, orthogonal, token_shift
from rwkv_jax.wkv import WKVForms, run_wkv
from rwkv_jax.wkv.toeplitz import toeplitz_oracle, toeplitz_parallel, toeplitz_step

Array = jax.Array
TOEPLITZ = WKVForms(oracle=toeplitz_oracle, parallel=toeplitz_parallel, step=toeplitz_step)


def half_shift(x: Array, prev: Array) -> Array:
    """v1 token shift (spec §3.2): channels [0, C//2) from the previous token, the rest from the
    current one. `x [B, T, C]`, `prev [B, C]` (the last token of the previous call)."""
    C = x.shape[-1]
    return jnp.concatenate([token_shift(x, prev)[..., : C // 2], x[..., C // 2:]], axis=-1)


def at_positions(table: Array, pos: Array, length: int) -> Array:
    """A per-position scale `table [TT]` (`time_gamma`, `time_out`) at the call's absolute positions
    pos..pos+length-1 -> `[B, T, 1]` (clipped at TT-1: the time mix has NaN-ed such rows already)."""
    positions = jnp.minimum(pos[:, None] + jnp.arange(length), table.shape[0] - 1)
    return table[positions][..., None]


def time_w_init(n_head: int, ctx_len: int) -> np.ndarray:
    """Official `time_w` (H, TT): head h decays as exp(-d · TT^(-(h+1)/(H-1))) over distance d (the
    last column is d = 0); the last head is flat."""
    h = np.arange(n_head)
    speed = np.where(h < n_head - 1, float(ctx_len) ** (-(h + 1) / max(n_head - 1, 1)), 0.0)
    distance = ctx_len - 1 - np.arange(ctx_len)
    return np.exp(-distance[None, :] * speed[:, None])


class TimeMix1(nn.Module):
    """`x [B, T, C]` (after ln1), `pos [B]` -> output `[B, T, C]` and the new time-mix state."""

    cfg: RWKVConfig

    @nn.compact
    def __call__(self, x: Array, state: dict[str, Array], pos: Array) -> tuple[Array, dict[str, Array]]:
        cfg = self.cfg
        C, A, H, TT, dt = cfg.n_embd, cfg.dim_att, cfg.n_head, cfg.ctx_len, cfg.params_dtype
        ones = nn.initializers.ones
        time_w = self.param("time_w", constant(lambda: time_w_init(H, TT)), (H, TT), dt)
        alpha = self.param("time_alpha", ones, (H, 1, TT), dt)
        beta = self.param("time_beta", ones, (H, TT, 1), dt)
        gamma = self.param("time_gamma", ones, (TT, 1), dt)

        xs = half_shift(x, state["att_x"])
        k = linear(cfg, A, "key", orthogonal(0.0), use_bias=True)(xs)
        v = linear(cfg, A, "value", orthogonal(linear_gain(A, C)), use_bias=True)(xs)
        r = linear(cfg, A, "receptance", orthogonal(0.0), use_bias=True)(xs)
        factors = tuple(p.astype(jnp.float32) for p in (time_w, alpha[:, 0], beta[:, :, 0]))
        y, (buf, den) = run_wkv(TOEPLITZ, cfg.wkv_impl, (k, v), (*factors, pos, (state["att_buf"], state["att_den"])))
        out = linear(cfg, C, "output", orthogonal(0.0), use_bias=True)(jax.nn.sigmoid(r) * y.astype(x.dtype))
        out = out * at_positions(gamma[:, 0].astype(x.dtype), pos, x.shape[1])
        return out, {"att_x": x[:, -1], "att_buf": buf, "att_den": den}


class ChannelMix1(nn.Module):
    """v1 channel mix (spec §3.4): `σ(r) ⊙ weight(Mish(key(x̃)) ⊙ value(x̃))` on the half-shifted
    input; hidden width F = dim_ffn (official 5·n_ffn//2). Returns `(out [B, T, C], shift [B, C])`."""

    cfg: RWKVConfig

    @nn.compact
    def __call__(self, x: Array, shift: Array) -> tuple[Array, Array]:
        cfg = self.cfg
        C, F = cfg.n_embd, cfg.dim_ffn
        xs = half_shift(x, shift)
        k = linear(cfg, F, "key", orthogonal(linear_gain(F, C)), use_bias=True)(xs)
        v = linear(cfg, F, "value", orthogonal(linear_gain(F, C)), use_bias=True)(xs)
        r = linear(cfg, C, "receptance", orthogonal(0.0), use_bias=True)(xs)
        out = linear(cfg, C, "weight", orthogonal(0.0), use_bias=True)(jax.nn.mish(k) * v)
        return jax.nn.sigmoid(r) * out, x[:, -1]


class Block1(nn.Module):
    """One RWKV-1 layer (spec §3.5): `x += attn(ln1(x))`, `x += mlp(ln2(x))`.

    The scan body contract of `rwkv_jax.model.Block`; of the broadcast `(pos, reset)` it reads the
    absolute position `pos [B]` of the call's first token (α, β, γ are indexed by it).
    """

    cfg: RWKVConfig

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], scanned: tuple[Array, dict[str, Array]],
                 broadcast: tuple[Array, Array | None]) -> tuple[tuple[Array, Array], dict[str, Array]]:
        pos, _ = broadcast
        x, v_first = carry
        _, state = scanned
        dx, att_state = TimeMix1(self.cfg, name="attn")(layer_norm(self.cfg, "ln1")(x), state, pos)
        x = x + dx
        dx, ffn_x = ChannelMix1(self.cfg, name="mlp")(layer_norm(self.cfg, "ln2")(x), state["ffn_x"])
        new_state = {**att_state, "ffn_x": ffn_x}
        return (x + dx, v_first), {name: value.astype(jnp.float32) for name, value in new_state.items()}
