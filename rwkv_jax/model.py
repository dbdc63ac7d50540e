"""`RWKV`: embedding -> blocks (scanned over layers) -> ln_out -> head, for every version.

The same per-layer function serves the parallel call and the one-token step; only the WKV form
differs (see `rwkv_jax.wkv.run_wkv`), so the two paths cannot drift apart. RWKV-1..3 add a copy
head (`rwkv_jax.copy_head`) after the final norm; RWKV-1 names its pieces `tok_emb`, `ln_f` and
scales the head's input by `time_out` per absolute position.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import RWKVConfig
from rwkv_jax.copy_head import copy_oracle, copy_parallel, copy_step, document_positions
from rwkv_jax.layers import ChannelMix, layer_norm, linear, linear_gain, orthogonal, uniform
from rwkv_jax.state import State, check_state, init_state, state_keys
from rwkv_jax.versions.v1 import Block1, at_positions
from rwkv_jax.versions.v2 import TimeMix2
from rwkv_jax.versions.v3 import TimeMix3
from rwkv_jax.versions.v4 import TimeMix4
from rwkv_jax.versions.v5 import TimeMix5
from rwkv_jax.versions.v6 import TimeMix6
from rwkv_jax.versions.v7 import TimeMix7
from rwkv_jax.wkv import WKVForms, run_wkv
from rwkv_jax.wkv.mesh import context_seq_shards, token_spec

Array = jax.Array
TIME_MIX = {2: TimeMix2, 3: TimeMix3, 4: TimeMix4, 5: TimeMix5, 6: TimeMix6, 7: TimeMix7}
COPY_HEAD = WKVForms(oracle=copy_oracle, parallel=copy_parallel, step=copy_step)


class Block(nn.Module):
    """One layer of RWKV-2..7: `x += att(ln1(x))`, `x += ffn(ln2(x))`, threading the layer's state
    (RWKV-2 instead normalises the stream itself: `x = ln1(x); x += att(x)`, spec §4.5).

    Written as a scan body: carry `(x [B,T,C], v_first)`, scanned input `(layer index, state)`,
    broadcast input `(pos, reset)`: `pos` is read only by RWKV-1's `Block1`, `reset [B, T]` (or
    None) marks the tokens that start a new document.
    """

    cfg: RWKVConfig

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], scanned: tuple[Array, State],
                 broadcast: tuple[Array | None, Array | None]) -> tuple[tuple[Array, Array], State]:
        _, reset = broadcast
        x, v_first = carry
        layer, state = scanned
        h = layer_norm(self.cfg, "ln1")(x)
        x = h if self.cfg.version == 2 else x  # v2's residual stream is the normalised one
        dx, att_state, v_first = TIME_MIX[self.cfg.version](self.cfg, name="att")(h, state, layer, v_first, reset)
        x = x + dx
        h = layer_norm(self.cfg, "ln2")(x)
        x = h if self.cfg.version == 2 else x
        dx, ffn_x = ChannelMix(self.cfg, name="ffn")(h, state["ffn_x"], layer, reset)
        new_state = {**att_state, "ffn_x": ffn_x}
        return (x + dx, v_first), {name: value.astype(jnp.float32) for name, value in new_state.items()}


class RWKV(nn.Module):
    """An RWKV language model of any supported version (see `RWKVConfig`).

    `model.apply({"params": p}, tokens [B, T] int32, state=None, reset=None)` -> `(logits
    [B, T, V] float32, state)`; `method=RWKV.step` takes `token [B]` and returns `logits [B, V]`.

    Packed documents: `reset [B, T]` bool is True at every token that starts a new document. The
    whole recurrent state (WKV states, both token shifts) is set to `init_state` before such a
    token, so each document's logits, and the final state of the last one, are those of running
    it alone from `init_state`. `reset=None` is the plain path (no masks are built).
    """

    cfg: RWKVConfig

    @nn.compact
    def __call__(self, tokens: Array, state: State | None = None, reset: Array | None = None
                 ) -> tuple[Array, State]:
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
        if 0 in tokens.shape:
            raise ValueError(f"tokens must hold at least one row of at least one token, got shape {tokens.shape}")
        if reset is not None:
            _check_reset(cfg, reset, tokens.shape)
            reset = reset.astype(bool)
        _check_token_range(tokens, cfg.vocab_size)
        B, T = tokens.shape
        if state is None:
            state = init_state(cfg, B)
        check_state(cfg, state, B)
        # Absolute position of tokens[:, 0] (RWKV-1 and the copy head; None otherwise).
        pos = state.get("pos")
        if cfg.version == 1:
            _check_v1_positions(pos, T, cfg.ctx_len)

        V, C = cfg.vocab_size, cfg.n_embd
        if cfg.version <= 3:  # official RWKV_Init: orthogonal, gain sqrt(max(V, C)) times 0.4 (v1) or 1e-4
            emb_init = orthogonal(max(V, C) ** 0.5 * (0.4 if cfg.version == 1 else 1e-4))
        else:
            emb_init = uniform(1e-4)
        emb = nn.Embed(V, C, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                       embedding_init=emb_init, name="tok_emb" if cfg.version == 1 else "emb")
        x = embedding_rows(jnp.asarray(emb.embedding, cfg.compute_dtype), tokens)
        if context_seq_shards() > 1 and T > 1:
            # Context parallelism: every activation lives split over the mesh's "seq" axis, as the
            # recurrences take their tokens; the partitioner follows from here.
            x = jax.lax.with_sharding_constraint(x, token_spec(B, T))
        if cfg.version >= 3:
            x = layer_norm(cfg, "ln0")(x)
        # v_first only exists in v7; other versions carry a placeholder through the scan.
        v_first = jnp.zeros_like(x) if cfg.version == 7 else jnp.zeros((), x.dtype)
        blocks = nn.scan(Block1 if cfg.version == 1 else Block, variable_axes={"params": 0},
                         split_rngs={"params": True}, in_axes=(0, nn.broadcast), out_axes=0,
                         length=cfg.n_layer)(cfg, name="blocks")
        layer_state = {name: state[name] for name in state_keys(cfg)}
        (x, _), layer_state = blocks((x, v_first), (jnp.arange(cfg.n_layer), layer_state), (pos, reset))
        h = layer_norm(cfg, "ln_f" if cfg.version == 1 else "ln_out")(x)
        if cfg.version == 1:  # "reduce confidence of early tokens"
            time_out = self.param("time_out", nn.initializers.ones, (1, cfg.ctx_len, 1), cfg.params_dtype)
            x = h * at_positions(time_out[0, :, 0].astype(h.dtype), pos, T)
        else:
            x = h
        head_gain = (0.4 if cfg.version == 1 else 0.5) * linear_gain(V, C)
        logits = linear(cfg, V, "head", orthogonal(head_gain))(x).astype(jnp.float32)
        new_state = dict(layer_state)
        if cfg.head_qk:
            logits, (new_state["copy_k"], new_state["copy_tokens"]) = _copy_head(cfg, h, tokens, logits, pos, state,
                                                                                  reset)
        if pos is not None:
            new_state["pos"] = pos + T if reset is None else document_positions(pos, reset)[0][:, -1] + 1
        return logits, new_state

    def step(self, token: Array, state: State | None = None) -> tuple[Array, State]:
        """Decode one token: `token [B]` int32 -> `(logits [B, V], state)`."""
        if token.ndim != 1:
            raise ValueError(f"step takes token [B], got shape {token.shape}")
        logits, state = self(token[:, None], state)
        return logits[:, 0], state


def _copy_head(cfg: RWKVConfig, h: Array, tokens: Array, logits: Array, pos: Array, state: State,
               reset: Array | None) -> tuple[Array, tuple[Array, Array]]:
    """Called from inside `RWKV` (so `head_q`/`head_k` are its children): add the head-QK copy
    scores (spec §2.3) of the final hidden states `h` to `logits`; returns them and the new cache.

    Official init: head_q zero (v2/v3) or gain 0.01 (v1), head_k gain 0.1 (v2/v3) or 0.01 (v1),
    times sqrt(D/C) when D > C; only v1's have biases.
    """
    D, gain, v1 = cfg.head_qk, linear_gain(cfg.head_qk, cfg.n_embd), cfg.version == 1
    q = linear(cfg, D, "head_q", orthogonal(gain * (0.01 if v1 else 0.0)), use_bias=v1)(h)
    k = linear(cfg, D, "head_k", orthogonal(gain * (0.01 if v1 else 0.1)), use_bias=v1)(h)
    return run_wkv(COPY_HEAD, cfg.wkv_impl, (logits, q, k, tokens), (pos, (state["copy_k"], state["copy_tokens"])),
                   reset)


def _check_reset(cfg: RWKVConfig, reset: Array, token_shape: tuple[int, ...]) -> None:
    """Resets must be `[B, T]` like the tokens, and the model must support them."""
    if tuple(reset.shape) != tuple(token_shape):
        raise ValueError(f"reset must have the tokens' shape {tuple(token_shape)}, got {tuple(reset.shape)}")
    if cfg.version == 1:
        raise ValueError("document resets are not supported for RWKV-1: its time mix weights tokens by "
                         "absolute position (time_alpha/beta/gamma, time_out)")
    if cfg.wkv_impl == "pallas" and token_shape[1] > 1:
        raise ValueError("the 'pallas' WKV implementation does not support document resets; "
                         "use wkv='parallel' or 'oracle'")


def _check_v1_positions(pos: Array, length: int, ctx_len: int) -> None:
    """RWKV-1 is undefined past position ctx_len - 1: say so whenever the positions are known (under
    `jit` they are not; the time mix then returns NaN for the rows that would pass it)."""
    if length > ctx_len:
        raise ValueError(f"RWKV-1 is defined only for positions < ctx_len={ctx_len}; got {length} tokens in one call")
    if isinstance(pos, jax.core.Tracer):
        return
    last = int(np.max(np.asarray(pos))) + length - 1
    if last >= ctx_len:
        raise ValueError(f"RWKV-1 is defined only for positions < ctx_len={ctx_len}: this call would reach position "
                         f"{last}. Start a new sequence (init_state) or build the model with a larger ctx_len.")


def embedding_rows(table: Array, tokens: Array) -> Array:
    """The rows of `table [V, C]` at `tokens`, NaN for ids outside [0, V), negative ones too
    (`take` would wrap those around to the last rows): under `jit` the ids cannot be checked
    (`_check_token_range`), and a bad id must never read as a real token."""
    V = table.shape[0]
    ids = jnp.where((tokens >= 0) & (tokens < V), tokens, V)
    return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)


def _check_token_range(tokens: Array, vocab_size: int) -> None:
    """Out-of-range ids would silently gather garbage; reject them when the values are known
    (under `jit` they are not: `embedding_rows` then gives their rows as NaN)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    values = np.asarray(tokens)
    if values.size == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got min {lo}, max {hi}")
