"""The vector-state WKV of RWKV-2 and RWKV-3 (spec §4.2, §4.3, §5), in log space.

Per channel, with `w = log_decay < 0` (`-exp(time_decay)`), bonus `u` (`time_first`) and `ε`
(RWKV_K_EPS: 1e-16 in v2, 1e-8 in v3):

    y_t = (Σ_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u + k_t} v_t) / (Σ_{i<t} e^{(t-1-i)w + k_i} + e^{u + k_t} + ε)

i.e. RWKV-4's WKV (`vector.py`) with ε in the denominator; the caller clamps `k ≤ 60` as the
official code does. ε is added to the un-scaled sums, so it cannot be folded into the decaying
state, and `vector.py`'s output step has no place for it: this module repeats that recurrence
with ε in the output.

The state is RWKV-4's `(aa, bb, pp)`: numerator and denominator sums divided by `e^pp`, and the
log-scale `pp` (zero state: aa = bb = 0, pp = -1e30); the official v2/v3 RNN keeps the raw sums
`a = aa·e^pp`, `b = bb·e^pp`. In the max-trick representation the output is
`(e1·aa + e2·v) / (e1·bb + e2 + ε·e^{-q})` with `q` the common log-scale.

Shapes: `k, v [B, T, A]`, `log_decay, u [A]`, state entries `[B, A]`; everything is float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rwkv_jax.wkv.scan import associative_scan
from rwkv_jax.wkv.vector import EMPTY_LOG_SCALE

Array = jax.Array
State = tuple[Array, Array, Array]

# ε·e^{-q} overflows float32 once q < log ε - 88 (an inf there turns the backward pass into NaN).
# Capping the exponent at 80 only touches outputs that are below e^-80 times the sums anyway.
_MAX_EPS_EXPONENT = 80.0


def _output(aa: Array, bb: Array, pp: Array, u: Array, k: Array, v: Array, eps: float) -> Array:
    """y for one token from the state before it, with the bonus `u` on the current token."""
    uk = u + k
    q = jnp.maximum(pp, uk)
    e_state, e_token = jnp.exp(pp - q), jnp.exp(uk - q)
    e_eps = jnp.exp(jnp.minimum(math.log(eps) - q, _MAX_EPS_EXPONENT))
    return (e_state * aa + e_token * v) / (e_state * bb + e_token + e_eps)


def _cleared(state: State, reset: Array) -> State:
    """`state` with the rows (or positions) where `reset` is True set to the zero state."""
    aa, bb, pp = state
    keep = ~reset[..., None]
    return jnp.where(keep, aa, 0.0), jnp.where(keep, bb, 0.0), jnp.where(keep, pp, EMPTY_LOG_SCALE)


def wkv3_step(k: Array, v: Array, log_decay: Array, u: Array, eps: float, state: State,
              reset: Array | None = None) -> tuple[Array, State]:
    """One token. `k, v [B, A]`, `log_decay, u [A]`, state `(aa, bb, pp)` each `[B, A]` float32;
    `reset [B]` bool clears the state first (the token starts a new document)."""
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    aa, bb, pp = state if reset is None else _cleared(state, reset)
    y = _output(aa, bb, pp, u, k, v, eps)
    decayed = pp + log_decay
    q = jnp.maximum(decayed, k)
    e_state, e_token = jnp.exp(decayed - q), jnp.exp(k - q)
    return y, (e_state * aa + e_token * v, e_state * bb + e_token, q)


def wkv3_oracle(k: Array, v: Array, log_decay: Array, u: Array, eps: float, state: State,
                reset: Array | None = None) -> tuple[Array, State]:
    """Token-by-token reference. `k, v [B, T, A]` -> `y [B, T, A]` float32 and the final state;
    `reset [B, T]` bool marks document starts."""
    def body(carry: State, inputs: tuple[Array, ...]) -> tuple[State, Array]:
        y, carry = wkv3_step(*inputs[:2], log_decay, u, eps, carry, *inputs[2:])
        return carry, y

    inputs = (k, v) if reset is None else (k, v, reset)
    state, y = jax.lax.scan(body, state, tuple(jnp.swapaxes(x, 0, 1) for x in inputs))
    return jnp.swapaxes(y, 0, 1), state


def _combine(left: tuple[Array, ...], right: tuple[Array, ...], log_decay: Array) -> tuple[Array, ...]:
    """Compose two segments (length n, log-scale p, numerator a, denominator b): left then right."""
    n_l, p_l, a_l, b_l = left
    n_r, p_r, a_r, b_r = right
    p_l = p_l + n_r * log_decay  # the left segment decays once per token of the right one
    p = jnp.maximum(p_l, p_r)
    e_l, e_r = jnp.exp(p_l - p), jnp.exp(p_r - p)
    return n_l + n_r, p, e_l * a_l + e_r * a_r, e_l * b_l + e_r * b_r


def wkv3_parallel(k: Array, v: Array, log_decay: Array, u: Array, eps: float, state: State,
                  reset: Array | None = None) -> tuple[Array, State]:
    """An associative scan (`rwkv_jax.wkv.scan`) over tokens; same contract as `wkv3_oracle`, O(T·A) memory.

    Token t is the segment (1, k_t, v_t, 1) and the initial state a segment of length 0; the
    inclusive scan of [state, token_0, ..., token_{T-1}] gives the state before every token and
    after the last one. With `reset [B, T]`, a segment holding a document start replaces (by a
    select) everything before it, and a reset token reads the zero state.
    """
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    aa, bb, pp = state
    B, T, _ = k.shape
    lengths = jnp.concatenate([jnp.zeros((B, 1, 1)), jnp.ones((B, T, 1))], axis=1)
    elements = (
        lengths,
        jnp.concatenate([pp[:, None], k], axis=1),
        jnp.concatenate([aa[:, None], v], axis=1),
        jnp.concatenate([bb[:, None], jnp.ones_like(k)], axis=1),
    )
    if reset is None:
        _, p, a, b = associative_scan(lambda l, r: _combine(l, r, log_decay), elements, axis=1)
        before = (a[:, :-1], b[:, :-1], p[:, :-1])
    else:
        def combine_with_resets(left, right):
            merged = _combine(left[:4], right[:4], log_decay)
            return (*(jnp.where(right[4], r, m) for r, m in zip(right[:4], merged)), left[4] | right[4])

        restarts = jnp.concatenate([jnp.zeros((B, 1), bool), reset], axis=1)[..., None]
        _, p, a, b, _ = associative_scan(combine_with_resets, (*elements, restarts), axis=1)
        before = _cleared((a[:, :-1], b[:, :-1], p[:, :-1]), reset)
    y = _output(*before, u, k, v, eps)
    return y, (a[:, -1], b[:, -1], p[:, -1])
