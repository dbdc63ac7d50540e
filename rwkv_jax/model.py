"""`RWKV`: embedding -> blocks (scanned over layers) -> ln_out -> head, for every version.

The same per-layer function serves the parallel call and the one-token step; only the WKV form
differs (see `rwkv_jax.wkv.run_wkv`), so the two paths cannot drift apart.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import RWKVConfig
from rwkv_jax.layers import ChannelMix, layer_norm, linear, orthogonal, uniform
from rwkv_jax.state import State, check_state, init_state
from rwkv_jax.versions.v4 import TimeMix4
from rwkv_jax.versions.v5 import TimeMix5
from rwkv_jax.versions.v6 import TimeMix6
from rwkv_jax.versions.v7 import TimeMix7

Array = jax.Array
TIME_MIX = {4: TimeMix4, 5: TimeMix5, 6: TimeMix6, 7: TimeMix7}


class Block(nn.Module):
    """One layer: `x += att(ln1(x))`, `x += ffn(ln2(x))`, threading the layer's state.

    Written as a scan body: carry `(x [B,T,C], v_first)`, scanned input `(layer index, state)`.
    """

    cfg: RWKVConfig

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], scanned: tuple[Array, State]
                 ) -> tuple[tuple[Array, Array], State]:
        x, v_first = carry
        layer, state = scanned
        h = layer_norm(self.cfg, "ln1")(x)
        dx, att_state, v_first = TIME_MIX[self.cfg.version](self.cfg, name="att")(h, state, layer, v_first)
        x = x + dx
        h = layer_norm(self.cfg, "ln2")(x)
        dx, ffn_x = ChannelMix(self.cfg, name="ffn")(h, state["ffn_x"], layer)
        new_state = {**att_state, "ffn_x": ffn_x}
        return (x + dx, v_first), {name: value.astype(jnp.float32) for name, value in new_state.items()}


class RWKV(nn.Module):
    """An RWKV language model of any supported version (see `RWKVConfig`).

    `model.apply({"params": p}, tokens [B, T] int32, state=None)` -> `(logits [B, T, V] float32,
    state)`; `method=RWKV.step` takes `token [B]` and returns `logits [B, V]`.
    """

    cfg: RWKVConfig

    @nn.compact
    def __call__(self, tokens: Array, state: State | None = None) -> tuple[Array, State]:
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
        _check_token_range(tokens, cfg.vocab_size)
        B = tokens.shape[0]
        if state is None:
            state = init_state(cfg, B)
        check_state(cfg, state, B)

        emb = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                       embedding_init=uniform(1e-4), name="emb")
        x = layer_norm(cfg, "ln0")(emb(tokens))
        # v_first only exists in v7; other versions carry a placeholder through the scan.
        v_first = jnp.zeros_like(x) if cfg.version == 7 else jnp.zeros((), x.dtype)
        blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=0, out_axes=0, length=cfg.n_layer)(cfg, name="blocks")
        (x, _), state = blocks((x, v_first), (jnp.arange(cfg.n_layer), state))
        x = layer_norm(cfg, "ln_out")(x)
        head_gain = 0.5 * (cfg.vocab_size / cfg.n_embd) ** 0.5 if cfg.vocab_size > cfg.n_embd else 0.5
        logits = linear(cfg, cfg.vocab_size, "head", orthogonal(head_gain))(x)
        return logits.astype(jnp.float32), state

    def step(self, token: Array, state: State | None = None) -> tuple[Array, State]:
        """Decode one token: `token [B]` int32 -> `(logits [B, V], state)`."""
        if token.ndim != 1:
            raise ValueError(f"step takes token [B], got shape {token.shape}")
        logits, state = self(token[:, None], state)
        return logits[:, 0], state


def _check_token_range(tokens: Array, vocab_size: int) -> None:
    """Out-of-range ids would silently gather garbage; reject them when the values are known."""
    if isinstance(tokens, jax.core.Tracer):
        return
    values = np.asarray(tokens)
    if values.size == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got min {lo}, max {hi}")
