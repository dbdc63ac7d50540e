"""The vector-state WKV recurrence of RWKV-4 (spec §6.1, §6.3), in log space.

Per channel, with `w = log_decay < 0` (the official `-exp(time_decay)`) and bonus `u`:

    wkv_t = (Σ_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u + k_t} v_t) / (Σ_{i<t} e^{(t-1-i)w + k_i} + e^{u + k_t})

The state is the official `(aa, bb, pp)`: numerator and denominator sums divided by `e^pp`, and
the running log-scale `pp` (zero state: aa = bb = 0, pp = -1e30). Keeping every exponent
relative to a running maximum is what stops `e^k` from overflowing (the "max trick").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
State = tuple[Array, Array, Array]

# The official packages start pp at -1e30 rather than -inf so that pp + w stays finite.
EMPTY_LOG_SCALE = -1e30


def _output(aa: Array, bb: Array, pp: Array, u: Array, k: Array, v: Array) -> Array:
    """wkv for one token from the state before it, with the bonus `u` on the current token."""
    uk = u + k
    q = jnp.maximum(pp, uk)
    e_state, e_token = jnp.exp(pp - q), jnp.exp(uk - q)
    return (e_state * aa + e_token * v) / (e_state * bb + e_token)


def wkv4_step(k: Array, v: Array, log_decay: Array, u: Array, state: State) -> tuple[Array, State]:
    """One token. `k, v [B, A]`, `log_decay, u [A]`, state `(aa, bb, pp)` each `[B, A]` float32."""
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    aa, bb, pp = state
    y = _output(aa, bb, pp, u, k, v)
    decayed = pp + log_decay
    q = jnp.maximum(decayed, k)
    e_state, e_token = jnp.exp(decayed - q), jnp.exp(k - q)
    return y, (e_state * aa + e_token * v, e_state * bb + e_token, q)


def wkv4_oracle(k: Array, v: Array, log_decay: Array, u: Array, state: State) -> tuple[Array, State]:
    """Token-by-token reference. `k, v [B, T, A]` -> `y [B, T, A]` float32 and the final state."""
    def body(carry: State, kv: tuple[Array, Array]) -> tuple[State, Array]:
        y, carry = wkv4_step(kv[0], kv[1], log_decay, u, carry)
        return carry, y

    state, y = jax.lax.scan(body, state, (jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)))
    return jnp.swapaxes(y, 0, 1), state


def _combine(left: tuple[Array, ...], right: tuple[Array, ...], log_decay: Array) -> tuple[Array, ...]:
    """Compose two segments (length n, log-scale p, numerator a, denominator b): left then right."""
    n_l, p_l, a_l, b_l = left
    n_r, p_r, a_r, b_r = right
    p_l = p_l + n_r * log_decay  # the left segment decays once per token of the right one
    p = jnp.maximum(p_l, p_r)
    e_l, e_r = jnp.exp(p_l - p), jnp.exp(p_r - p)
    return n_l + n_r, p, e_l * a_l + e_r * a_r, e_l * b_l + e_r * b_r


def wkv4_parallel(k: Array, v: Array, log_decay: Array, u: Array, state: State) -> tuple[Array, State]:
    """`jax.lax.associative_scan` over tokens; same contract as `wkv4_oracle`, O(T·A) memory.

    Token t is the segment (1, k_t, v_t, 1); the initial state is a segment of length 0. The
    inclusive scan of [state, token_0, ..., token_{T-1}] gives the state before every token and
    after the last one, all in the max-trick representation.
    """
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    aa, bb, pp = state
    B, T, A = k.shape
    lengths = jnp.concatenate([jnp.zeros((B, 1, 1)), jnp.ones((B, T, 1))], axis=1)
    elements = (
        lengths,
        jnp.concatenate([pp[:, None], k], axis=1),
        jnp.concatenate([aa[:, None], v], axis=1),
        jnp.concatenate([bb[:, None], jnp.ones_like(k)], axis=1),
    )
    _, p, a, b = jax.lax.associative_scan(lambda l, r: _combine(l, r, log_decay), elements, axis=1)
    y = _output(a[:, :-1], b[:, :-1], p[:, :-1], u, k, v)
    return y, (a[:, -1], b[:, -1], p[:, -1])


def zero_state(batch_size: int, channels: int) -> State:
    """The official zero state `(aa, bb, pp)`, each `[B, A]` float32."""
    zeros = jnp.zeros((batch_size, channels), jnp.float32)
    return zeros, zeros, jnp.full((batch_size, channels), EMPTY_LOG_SCALE, jnp.float32)
