"""WKV recurrence of RWKV-5 ("Eagle") and RWKV-6 ("Finch").

Per head, with an N×N matrix state S laid out [key i, value j]:

    y_t[j] = Σ_i r_t[i] · ( u[i] k_t[i] v_t[j] + S_{t−1}[i, j] )
    S_t    = diag(exp(logw_t)) S_{t−1} + k_t v_tᵀ

`logw_t ≤ 0` is the per-token, per-key-channel log-decay: RWKV-6 passes
`-exp(time_decay + lora(x))` (it can be −150 or less, i.e. decays that underflow to 0),
RWKV-5 passes `-exp(time_decay)` broadcast over time. `u` is the per-key-channel bonus
(`time_faaaa`).

Shapes: r, logw, k, v `[B, T, H, N]`; u `[H, N]`; state `[B, H, N, N]`; y `[B, T, H, N]`.
Inputs may be bf16 or fp32; everything is computed and returned in fp32 because decays close
to 1 need the precision (docs/rwkv_versions.md §14.2).

Three forms of the same recurrence:
* `wkv6_step`     — one token (inference).
* `wkv6_oracle`   — `wkv6_step` under `jax.lax.scan`; the reference the others are tested against.
* `wkv6_parallel` — chunked form for training (docs/rwkv_versions.md §8.3): matmuls inside
  chunks, an associative scan over chunk states between them.

Matmuls use JAX's default precision, so `jax.default_matmul_precision` decides whether a GPU
may use TF32 for them; wrap calls in `jax.default_matmul_precision("highest")` for full fp32.
"""

import jax
import jax.numpy as jnp


def _as_fp32(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def wkv6_step(
    r: jax.Array,
    logw: jax.Array,
    k: jax.Array,
    v: jax.Array,
    u: jax.Array,
    state: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Advance the WKV recurrence by one token.

    Args:
      r, logw, k, v: `[B, H, N]` receptance, log-decay (≤ 0), key, value of the token.
      u: `[H, N]` bonus applied to the current token's key.
      state: `[B, H, N, N]` state before the token, layout [key, value].

    Returns:
      y: `[B, H, N]` fp32 output of the token.
      new_state: `[B, H, N, N]` fp32 state after the token.
    """
    r, logw, k, v, u, state = _as_fp32(r, logw, k, v, u, state)
    kv = k[..., :, None] * v[..., None, :]  # [B, H, N, N]
    y = jnp.einsum("bhi,bhij->bhj", r, u[None, :, :, None] * kv + state)
    new_state = jnp.exp(logw)[..., None] * state + kv
    return y, new_state


def wkv6_oracle(
    r: jax.Array,
    logw: jax.Array,
    k: jax.Array,
    v: jax.Array,
    u: jax.Array,
    state: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Token-by-token WKV recurrence (`wkv6_step` under `jax.lax.scan`); the reference form.

    Args:
      r, logw, k, v: `[B, T, H, N]` receptance, log-decay (≤ 0), key, value.
      u: `[H, N]` bonus.
      state: `[B, H, N, N]` initial state, layout [key, value].

    Returns:
      y: `[B, T, H, N]` fp32 outputs.
      final_state: `[B, H, N, N]` fp32 state after the last token.
    """

    def step(carried_state, token):
        r_t, logw_t, k_t, v_t = token
        y_t, next_state = wkv6_step(r_t, logw_t, k_t, v_t, u, carried_state)
        return next_state, y_t

    time_major = tuple(jnp.moveaxis(a, 1, 0) for a in _as_fp32(r, logw, k, v))
    final_state, y = jax.lax.scan(step, jnp.asarray(state, jnp.float32), time_major)
    return jnp.moveaxis(y, 0, 1), final_state


def _shift_one_later(x: jax.Array, axis: int) -> jax.Array:
    """x[t−1] at position t along `axis`, 0 at t = 0. Applied to an inclusive cumulative sum
    this gives the exclusive one exactly; subtracting x_t instead would cancel
    catastrophically when x_t is large (e.g. −200) and the earlier terms are small."""
    shifted = jax.lax.slice_in_dim(x, 0, x.shape[axis] - 1, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 0)
    return jnp.pad(shifted, pad)


def wkv6_parallel(
    r: jax.Array,
    logw: jax.Array,
    k: jax.Array,
    v: jax.Array,
    u: jax.Array,
    state: jax.Array,
    chunk_size: int = 16,
) -> tuple[jax.Array, jax.Array]:
    """Chunked parallel WKV recurrence (training form); same results as `wkv6_oracle`.

    T is padded to a multiple of `chunk_size` with identity tokens (r = k = v = 0, logw = 0)
    and split into chunks of length L = `chunk_size`. Within a chunk, with λ_t the cumulative
    log-decay from the chunk start (λ_{−1} = 0):

        Y   = A V + (R ⊙ exp(λ_{t−1})) S_start
        A[t, i] = Σ_c r_t[c] k_i[c] exp(λ_{t−1}[c] − λ_i[c])  (i < t),
        A[t, t] = Σ_c r_t[c] u[c] k_t[c],  A[t, i] = 0  (i > t)
        S_end = diag(exp(λ_{L−1})) S_start + Σ_i (k_i ⊙ exp(λ_{L−1} − λ_i)) v_iᵀ

    and the chunk start states come from a `jax.lax.associative_scan` over the chunks'
    (decay, additive) transitions. Memory is O(T·L·H·N) for the pairwise decays plus
    O((T/L)·H·N²) for the chunk states; the per-token state is never materialised.

    All exponents are sums of log-decays, hence ≤ 0: nothing overflows even when decays
    underflow to 0 (v6 logw ≈ −150), and gradients stay finite.

    Args:
      r, logw, k, v: `[B, T, H, N]` receptance, log-decay (≤ 0), key, value.
      u: `[H, N]` bonus.
      state: `[B, H, N, N]` initial state, layout [key, value].
      chunk_size: tokens per chunk (static).

    Returns:
      y: `[B, T, H, N]` fp32 outputs.
      final_state: `[B, H, N, N]` fp32 state after the last real token.
    """
    r, logw, k, v, u, state = _as_fp32(r, logw, k, v, u, state)
    batch, seq_len, heads, head_size = r.shape
    num_chunks = -(-seq_len // chunk_size)
    padding = num_chunks * chunk_size - seq_len

    def to_chunks(x):
        # Zero padding is an identity token: k = v = 0 adds nothing, logw = 0 decays nothing.
        x = jnp.pad(x, ((0, 0), (0, padding), (0, 0), (0, 0)))
        return x.reshape(batch, num_chunks, chunk_size, heads, head_size)

    r, logw, k, v = (to_chunks(x) for x in (r, logw, k, v))  # [B, C, L, H, N]

    # Pairwise log-decays as segment sums: decay_through[t, i] = Σ_{i<j≤t} logw_j, summed
    # directly rather than as λ_t − λ_i, which would cancel catastrophically once a −200
    # decay sits in λ. Masking the summands (not the sums) leaves 0 where i ≥ t, so no −inf
    # is ever formed and exp never sees a positive exponent, for values and gradients alike.
    i_before_t = jnp.tril(jnp.ones((chunk_size, chunk_size), dtype=bool), k=-1)  # [t, i]
    i_before_t = i_before_t[None, None, :, :, None, None]
    segment_terms = jnp.where(i_before_t, logw[:, :, :, None], 0.0)  # [B, C, L(j), L(i), H, N]
    decay_through = jnp.cumsum(segment_terms, axis=2)  # [B, C, L(t), L(i), H, N]
    # Token i reaches the read at t after the decays of tokens i+1 … t−1.
    decay_between = _shift_one_later(decay_through, axis=2)
    pairwise_decay = jnp.where(i_before_t, jnp.exp(decay_between), 0.0)
    decay_to_chunk_end = decay_through[:, :, -1]  # [B, C, L(i), H, N]: Σ_{i<j≤L−1} logw_j

    # λ_{t−1}: [B, C, L, H, N]
    decay_from_start = _shift_one_later(jnp.cumsum(logw, axis=2), axis=2)
    chunk_decay = jnp.exp(jnp.sum(logw, axis=2))  # exp(λ_{L−1}): [B, C, H, N]

    # Each chunk's transition S_end = diag(chunk_decay) S_start + chunk_update.
    chunk_update = jnp.einsum(
        "bcihn,bcihm->bchnm", k * jnp.exp(decay_to_chunk_end), v
    )  # [B, C, H, N, N]

    # Exclusive prefix over chunks: the initial state enters as a leading (identity, state)
    # element, so the inclusive scan's additive part at position c is chunk c's start state,
    # and the last position is the state after the last chunk.
    def compose(earlier, later):
        decay_a, update_a = earlier
        decay_b, update_b = later
        return decay_a * decay_b, decay_b[..., None] * update_a + update_b

    decays = jnp.concatenate([jnp.ones_like(chunk_decay[:, :1]), chunk_decay], axis=1)
    updates = jnp.concatenate([state[:, None], chunk_update], axis=1)
    _, chunk_states = jax.lax.associative_scan(compose, (decays, updates), axis=1)
    start_states = chunk_states[:, :-1]  # [B, C, H, N, N]
    final_state = chunk_states[:, -1]  # padding tokens are identities

    scores = jnp.einsum("bcthn,bcihn,bctihn->bchti", r, k, pairwise_decay)
    bonus = jnp.einsum("bcthn,hn,bcthn->bcth", r, u, k)
    y_intra = jnp.einsum("bchti,bcihn->bcthn", scores, v) + bonus[..., None] * v
    y_from_state = jnp.einsum(
        "bcthi,bchij->bcthj", r * jnp.exp(decay_from_start), start_states
    )
    y = (y_intra + y_from_state).reshape(batch, num_chunks * chunk_size, heads, head_size)
    return y[:, :seq_len], final_state
