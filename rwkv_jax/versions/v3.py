"""RWKV-3 (spec §5): RWKV-2's WKV (k-clamp, ε = 1e-8, decays stored as (A, 1)) with separate
token-shift mixes for k, v and r, the pre-LN block with `ln0`, and the init curves RWKV-4 kept."""

from __future__ import annotations

import flax.linen as nn
import jax

from rwkv_jax.config import RWKVConfig
from rwkv_jax.layers import lerp_mix, linear, linear_gain, orthogonal, token_shift
from rwkv_jax.versions.v2 import clamped_wkv_and_output
from rwkv_jax.versions.v4 import decay_bonus_and_mixes

Array = jax.Array
K_EPS = 1e-8  # official RWKV_K_EPS of v3


class TimeMix3(nn.Module):
    """`x [B, T, C]` (after ln1) -> output `[B, T, C]` and the new time-mix state; `reset [B, T]`
    (or None) marks document starts."""

    cfg: RWKVConfig

    @nn.compact
    def __call__(self, x: Array, state: dict[str, Array], layer: Array, v_first: Array,
                 reset: Array | None = None) -> tuple[Array, dict[str, Array], Array]:
        cfg = self.cfg
        C, A = cfg.n_embd, cfg.dim_att
        time_decay, time_first, mix_k, mix_v, mix_r = decay_bonus_and_mixes(self, cfg, layer, x.dtype, (A, 1))

        prev = token_shift(x, state["att_x"], reset)
        k = linear(cfg, A, "key", orthogonal(0.0))(lerp_mix(x, prev, mix_k))
        v = linear(cfg, A, "value", orthogonal(linear_gain(A, C)))(lerp_mix(x, prev, mix_v))
        r = linear(cfg, A, "receptance", orthogonal(0.0))(lerp_mix(x, prev, mix_r))
        out, wkv_state = clamped_wkv_and_output(cfg, k, v, r, time_decay, time_first, state, K_EPS, reset)
        return out, {"att_x": x[:, -1], **wkv_state}, v_first
