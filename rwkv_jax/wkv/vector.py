"""The vector-state WKV recurrence of RWKV-4 (spec §6.1, §6.3), in log space.

Per channel, with `w = log_decay < 0` (the official `-exp(time_decay)`) and bonus `u`:

    wkv_t = (Σ_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u + k_t} v_t) / (Σ_{i<t} e^{(t-1-i)w + k_i} + e^{u + k_t})

The state is the official `(aa, bb, pp)`: numerator and denominator sums divided by `e^pp`, and
the running log-scale `pp` (zero state: aa = bb = 0, pp = -1e30). Keeping every exponent
relative to a running maximum is what stops `e^k` from overflowing (the "max trick").

* `wkv4_step`     — one token (inference).
* `wkv4_oracle`   — `wkv4_step` under `jax.lax.scan`; the reference the others are tested against.
* `wkv4_parallel` — chunked form for training: an associative scan over chunk summaries, with the
  tokens inside each chunk walked for all chunks at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rwkv_jax.wkv.scan import associative_scan

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


def _cleared(state: State, reset: Array | None) -> State:
    """`state` with the rows where `reset [B]` is True set to the zero state (aa = bb = 0, pp = -1e30)."""
    if reset is None:
        return state
    aa, bb, pp = state
    keep = ~reset[:, None]
    return jnp.where(keep, aa, 0.0), jnp.where(keep, bb, 0.0), jnp.where(keep, pp, EMPTY_LOG_SCALE)


def wkv4_step(k: Array, v: Array, log_decay: Array, u: Array, state: State, reset: Array | None = None
              ) -> tuple[Array, State]:
    """One token. `k, v [B, A]`, `log_decay, u [A]`, state `(aa, bb, pp)` each `[B, A]` float32;
    `reset [B]` bool clears the state first (the token starts a new document)."""
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    aa, bb, pp = _cleared(state, reset)
    y = _output(aa, bb, pp, u, k, v)
    decayed = pp + log_decay
    q = jnp.maximum(decayed, k)
    e_state, e_token = jnp.exp(decayed - q), jnp.exp(k - q)
    return y, (e_state * aa + e_token * v, e_state * bb + e_token, q)


def wkv4_oracle(k: Array, v: Array, log_decay: Array, u: Array, state: State, reset: Array | None = None
                ) -> tuple[Array, State]:
    """Token-by-token reference. `k, v [B, T, A]` -> `y [B, T, A]` float32 and the final state;
    `reset [B, T]` bool marks document starts (see `rwkv_jax.wkv`)."""
    def body(carry: State, inputs: tuple[Array, ...]) -> tuple[State, Array]:
        y, carry = wkv4_step(*inputs[:2], log_decay, u, carry, *inputs[2:])
        return carry, y

    inputs = (k, v) if reset is None else (k, v, reset)
    state, y = jax.lax.scan(body, state, tuple(jnp.swapaxes(x, 0, 1) for x in inputs))
    return jnp.swapaxes(y, 0, 1), state


# Tokens per chunk of the parallel form: the walk inside chunks takes _CHUNK sequential steps, the
# associative scan over chunks ~2·log₂(T / _CHUNK) levels; 32-64 are the fastest on CPU for
# T ~ 1-4k.
_CHUNK = 64


def _weights(d: Array) -> tuple[Array, Array]:
    """(e^{x−m}, e^{y−m}) for d = x − y and m = max(x, y), with a single exp of a value ≤ 0."""
    e = jnp.exp(-jnp.abs(d))
    return jnp.where(d >= 0, 1.0, e), jnp.where(d >= 0, e, 1.0)


def _merge(p1: Array, a1: Array, b1: Array, p2: Array, a2: Array, b2: Array) -> State:
    """Sum of two max-trick triples (p, a, b), each standing for the sums (a·e^p, b·e^p);
    returns the triple (p, a, b) of the sum.

    The max is a select on d ≥ 0 rather than `jnp.maximum`: the latter's gradient tests
    `p1 == max(p1, p2)`, which XLA can break by rounding p1 differently (FMA) in two fusions.
    """
    d = p1 - p2
    c1, c2 = _weights(d)
    return jnp.where(d >= 0, p1, p2), c1 * a1 + c2 * a2, c1 * b1 + c2 * b2


def log_space_step(carry: State, kv: tuple[Array, Array], log_decay: Array, u: Array) -> tuple[State, Array]:
    """`wkv4_step` on a (p, a, b) carry (pp, aa, bb), one exp per merge: output, then update."""
    p, a, b = carry
    k, v = kv
    c_state, c_token = _weights(p - (u + k))
    y = (c_state * a + c_token * v) / (c_state * b + c_token)
    return _merge(p + log_decay, a, b, k, v, jnp.ones_like(v)), y


def _stretch_sums(k: Array, v: Array, log_decay: Array, reset: Array | None) -> State:
    """The sums a stretch of n tokens leaves from the zero state, as a max-trick triple (p, a, b).

    Token i has decayed n−1−i times by the end, so with z_i = k_i + (n−1−i)·w: p = max_i z_i,
    a = Σ e^{z_i − p} v_i, b = Σ e^{z_i − p}, over the stretch's last document only (`reset`).
    `k, v [..., n, A]`, `reset [..., n]` or None; returns p, a, b `[..., A]`.

    p is the stretch's largest exponent, as the oracle's running maximum pp ends up (and with
    its gradient: into the token that attains it), taken at the argmax rather than by `jnp.max`,
    whose gradient divides by the count of elements equal to the max, which XLA can make 0 by
    rounding z differently in two fusions. a·e^p and b·e^p do not depend on p. (einsum for the
    weighted sum: XLA:CPU reduces sum(x * y) over a middle axis several times slower.)
    """
    n = k.shape[-2]
    z = k + jnp.arange(n - 1, -1, -1, dtype=jnp.float32)[:, None] * log_decay
    if reset is not None:
        documents = jnp.cumsum(reset, axis=-1)  # documents started so far in the stretch
        in_last = (documents == documents[..., -1:])[..., None]  # [..., n, 1]
        # The stretch's last token is always in its last document, so p is finite.
        z = jnp.where(in_last, z, EMPTY_LOG_SCALE)
    largest = jnp.argmax(jax.lax.stop_gradient(z), axis=-2, keepdims=True)
    p = jnp.take_along_axis(z, largest, axis=-2)
    e = jnp.exp(z - p)  # exactly 0 outside the last document: e^(-1e30 - p)
    p = p[..., 0, :]
    return p, jnp.einsum("...la,...la->...a", e, v), jnp.sum(e, axis=-2)


def wkv4_parallel(k: Array, v: Array, log_decay: Array, u: Array, state: State, reset: Array | None = None
                  ) -> tuple[Array, State]:
    """Chunked parallel form; same contract as `wkv4_oracle`, O(T·A) memory.

    The T tokens are cut into chunks of L = `_CHUNK` tokens (the last one padded). Three passes,
    each over all chunks at once:

    1. Each chunk's own sums as of its last token, in the max-trick form: token i has decayed
       L−1−i times, so with z_i = k_i + (L−1−i)·w the summary is p = max_i z_i,
       a = Σ e^{z_i − p} v_i, b = Σ e^{z_i − p}.
    2. An associative scan (`rwkv_jax.wkv.scan`) over [initial state, summaries] composes them
       into the state before every chunk. Segments combine as (p_l + n_r·w, a_l, b_l) + (p_r, a_r, b_r): the
       earlier one decays once per token of the later one (n_r tokens).
    3. Each chunk is walked from its start state with the oracle's step (`lax.scan` over the
       position in the chunk, vectorised over chunks), which gives y; padding positions leave
       the state unchanged, so the last chunk ends on the final state.

    Sequential depth is L + O(log(T / L)) instead of T, for about the oracle's arithmetic.
    Every exponent that is exponentiated is ≤ 0 (max trick), so keys up to fp32's e^k overflow
    (k ≈ 88) and beyond stay finite. The walk is rematerialised in the backward pass, so only
    its carried states are stored.

    With `reset [B, T]` (document starts), a chunk's summary sums only the tokens of its last
    document, a segment that contains a reset replaces everything before it in the scan (a
    select, never a -inf log-scale), and the walk clears its carry before a reset token.

    The returned state has the oracle's values and gradients, pp's own included (pp is the largest
    exponent, and its gradient goes to the token that attains it, as the oracle's running maximum's
    does; ties aside).
    """
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    aa, bb, pp = state
    batch, seq_len, channels = k.shape
    size = min(_CHUNK, seq_len)
    num_chunks = -(-seq_len // size)
    padding = num_chunks * size - seq_len
    # Only the last chunk is padded (with zeros): its summary is not used, and the walk leaves the
    # state unchanged at padding positions, so the last chunk ends on the true final state.
    kc, vc = (jnp.pad(x, ((0, 0), (0, padding), (0, 0))).reshape(batch, num_chunks, size, channels)
              for x in (k, v))

    # 1. Chunk summaries.
    reset_c = None
    if reset is not None:
        reset_c = jnp.pad(reset, ((0, 0), (0, padding))).reshape(batch, num_chunks, size)
    summaries = _stretch_sums(kc, vc, log_decay, reset_c)

    # 2. State before each chunk: inclusive scan over [initial state, chunks 0 … C−2] (nothing
    #    follows the last chunk, so its summary is not needed).
    def combine(left, right):
        n_l, p_l, a_l, b_l = left
        n_r, p_r, a_r, b_r = right
        return (n_l + n_r, *_merge(p_l + n_r * log_decay, a_l, b_l, p_r, a_r, b_r))

    def combine_with_resets(left, right):
        # A right segment that starts a document drops the left one (and so do later ones).
        merged = combine(left[:4], right[:4])
        restarts = right[4]
        return (*(jnp.where(restarts, r, m) for r, m in zip(right[:4], merged)), left[4] | restarts)

    lengths = jnp.concatenate(
        [jnp.zeros((batch, 1, 1)), jnp.full((batch, num_chunks - 1, 1), float(size))], axis=1)
    elements = (lengths,) + tuple(
        jnp.concatenate([s[:, None], c[:, :-1]], axis=1) for s, c in zip((pp, aa, bb), summaries))
    if reset is None:
        _, *starts = associative_scan(combine, elements, axis=1)
    else:
        restarts = jnp.concatenate([jnp.zeros((batch, 1, 1), bool), reset_c[:, :-1].any(axis=2, keepdims=True)], axis=1)
        _, *starts, _ = associative_scan(combine_with_resets, (*elements, restarts), axis=1)

    # 3. Walk every chunk from its start state, position by position. (Checkpointed: the backward
    #    pass recomputes each step from the carried state instead of storing its intermediates.)
    @jax.checkpoint
    def walk(carry, inputs):
        k_t, v_t, real = inputs[:3]
        if reset is not None:
            starts_document = inputs[3]
            carry = (jnp.where(starts_document, EMPTY_LOG_SCALE, carry[0]),
                     *(jnp.where(starts_document, 0.0, c) for c in carry[1:]))
        new_carry, y = log_space_step(carry, (k_t, v_t), log_decay, u)
        return tuple(jnp.where(real, n, c) for n, c in zip(new_carry, carry)), y

    token = jnp.arange(num_chunks * size).reshape(num_chunks, size)
    real = (token < seq_len).T[:, None, :, None]  # [L, 1, chunks, 1]
    by_position = lambda x: jnp.moveaxis(x, 2, 0)  # [L, B, chunks, A]
    walked = (by_position(kc), by_position(vc), real)
    if reset is not None:
        walked += (by_position(reset_c[..., None]),)
    (p, a, b), y = jax.lax.scan(walk, tuple(starts), walked)
    y = jnp.moveaxis(y, 0, 2).reshape(batch, num_chunks * size, channels)[:, :seq_len]
    return y, (a[:, -1], b[:, -1], p[:, -1])


def wkv4_transition(k: Array, v: Array, log_decay: Array, reset: Array | None = None
                    ) -> tuple[Array, State]:
    """What a stretch of tokens does to the state it starts from, in log space: the start sums
    decay by the log factor T·w (−inf if the stretch holds a document start: they are forgotten)
    and the stretch's own sums (its end state from the zero state, `(aa, bb, pp)`) are added.
    One pass of sums over the tokens, no outputs; context parallelism summarises each device's
    sequence shard with it (`rwkv_jax.wkv.mesh`).

    Args:
      k, v: `[B, T, A]`; log_decay: `[A]`; reset: `[B, T]` bool document starts, or None.

    Returns:
      log_transition `[B, A]` and the end state from zero `(aa, bb, pp)`, each `[B, A]` fp32.
    """
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    pp, aa, bb = _stretch_sums(k, v, log_decay, reset)
    log_transition = jnp.broadcast_to(k.shape[1] * log_decay.astype(jnp.float32), aa.shape)
    if reset is not None:
        log_transition = jnp.where(jnp.any(reset, axis=1)[:, None], -jnp.inf, log_transition)
    return log_transition, (aa, bb, pp)


def zero_state(batch_size: int, channels: int) -> State:
    """The official zero state `(aa, bb, pp)`, each `[B, A]` float32."""
    zeros = jnp.zeros((batch_size, channels), jnp.float32)
    return zeros, zeros, jnp.full((batch_size, channels), EMPTY_LOG_SCALE, jnp.float32)
