"""RWKV-7 WKV: the "generalised delta rule", a diagonal-plus-rank-1 (DPLR) state transition.

Per batch element and head the state ``S`` is an ``N x N`` fp32 matrix laid out ``[value i, key j]``
and each token applies

    S_t = S_{t-1} (diag(exp(logw_t)) + a_t b_t^T) + v_t k_t^T
    y_t = S_t r_t                                   (the *updated* state; no bonus term here)

i.e. per element ``sa_i = sum_j S[i, j] a_t[j]``,
``S[i, j] <- S[i, j] w_t[j] + sa_i b_t[j] + v_t[i] k_t[j]``, ``y_t[i] = sum_j S[i, j] r_t[j]``.
In RWKV-7 ``a = -kappa_hat``, ``b = kappa_hat * alpha`` (unit ``kappa_hat`` per head,
``alpha`` in (0, 1)) and ``logw = -exp(-0.5) * sigmoid(z)`` in ``(-0.6066, 0)``.

Three entry points share the argument layout ``[B, T, H, N]`` (state ``[B, H, N, N]``):

* ``wkv7_step``: one token; the decode path and the body of the oracle.
* ``wkv7_oracle``: ``lax.scan`` of ``wkv7_step`` over tokens; the reference the others are tested
  against.
* ``wkv7_parallel``: the chunked training form (two passes around an associative scan over chunks).

Inputs may be bf16 or fp32; everything is computed in fp32 and y and the state are returned in fp32.
All contractions request ``Precision.HIGHEST`` so that accelerators whose default fp32 matmul
rounds through TF32/bf16 still compute the recurrence in fp32.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rwkv_jax.wkv.scan import associative_reduce, associative_scan

_HIGHEST = jax.lax.Precision.HIGHEST

# RWKV-7 builds logw = -exp(-0.5) * sigmoid(z), so every decay satisfies logw >= -exp(-0.5).
RWKV7_MIN_LOG_DECAY = -0.6065306597126334


def _einsum(subscripts: str, *operands: jax.Array) -> jax.Array:
    return jnp.einsum(subscripts, *operands, precision=_HIGHEST)


def wkv7_step(
    r: jax.Array,
    logw: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    state: jax.Array,
    reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Advance the RWKV-7 state by one token.

    Args:
      r, logw, k, v, a, b: ``[B, H, N]`` receptance, log-decay (``w = exp(logw)``), key, value and
        the rank-1 transition vectors ``a`` (read from the state) and ``b`` (written back).
      state: ``[B, H, N, N]`` laid out ``[value, key]``.
      reset: ``[B]`` bool or None; True zeroes that row's state first (a new document).

    Returns:
      ``(y, new_state)``: y ``[B, H, N]`` fp32 read from the updated state, new_state
      ``[B, H, N, N]`` fp32.
    """
    r, logw, k, v, a, b, state = (x.astype(jnp.float32) for x in (r, logw, k, v, a, b, state))
    if reset is not None:
        state = jnp.where(reset[:, None, None, None], 0.0, state)
    state_times_a = _einsum("bhij,bhj->bhi", state, a)
    new_state = (
        state * jnp.exp(logw)[..., None, :]
        + state_times_a[..., :, None] * b[..., None, :]
        + v[..., :, None] * k[..., None, :]
    )
    y = _einsum("bhij,bhj->bhi", new_state, r)
    return y, new_state


def wkv7_oracle(
    r: jax.Array,
    logw: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    state: jax.Array,
    reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Token-by-token RWKV-7 recurrence (``lax.scan`` over ``wkv7_step``); the reference.

    Accepts any real ``logw`` (no decay bound is assumed).

    Args:
      r, logw, k, v, a, b: ``[B, T, H, N]``.
      state: ``[B, H, N, N]`` initial state, ``[value, key]``.
      reset: ``[B, T]`` bool document starts, or None.

    Returns:
      ``(y, final_state)``: y ``[B, T, H, N]`` fp32, final_state ``[B, H, N, N]`` fp32.
    """

    def scan_body(carried_state, token_inputs):
        y_t, next_state = wkv7_step(*token_inputs[:6], carried_state, *token_inputs[6:])
        return next_state, y_t

    per_token = (r, logw, k, v, a, b) + (() if reset is None else (reset,))
    time_major_inputs = tuple(jnp.swapaxes(x, 0, 1) for x in per_token)
    final_state, y_time_major = jax.lax.scan(
        scan_body, state.astype(jnp.float32), time_major_inputs
    )
    return jnp.swapaxes(y_time_major, 0, 1), final_state


def _forward_substitution(strictly_lower: jax.Array, rhs: jax.Array) -> jax.Array:
    """Solve ``(I - strictly_lower) x = rhs`` row by row (x_t = rhs_t + Σ_{i<t} A[t,i] x_i).

    strictly_lower: ``[..., L, L]`` (entries on or above the diagonal must be zero);
    rhs: ``[..., L, M]``. Returns x ``[..., L, M]``.
    """

    def solve_row(t, solution):
        # Rows >= t of `solution` are still zero, so the full-length product sums over i < t only.
        row = rhs[..., t, :] + _einsum("...i,...im->...m", strictly_lower[..., t, :], solution)
        return solution.at[..., t, :].set(row)

    return jax.lax.fori_loop(0, rhs.shape[-2], solve_row, jnp.zeros_like(rhs))


def _solve_unit_lower(strictly_lower: jax.Array, rhs: jax.Array, *,
                      use_substitution: bool | None = None) -> jax.Array:
    """``(I - strictly_lower)^{-1} rhs`` by forward substitution, differentiable in both arguments.

    Forward substitution is the backward-stable way to apply a unit-lower-triangular inverse (no
    power series, no explicit inverse). On a CPU backend it is written in jnp
    (``_forward_substitution``) rather than calling ``jax.lax.linalg.triangular_solve``, because
    jaxlib 0.10's CPU LAPACK kernels split a batch over XLA's intra-op thread pool and block
    waiting for it: the backward pass of that solve issues two independent solves, XLA runs them
    concurrently, and on a 2-core machine both pool threads wait forever (seen here at
    B·H·T/L ≥ 128; jaxlib ≥ 0.11.1 no longer has that path). Elsewhere the library solve
    (cuBLAS on a GPU) runs: on an H200 it made the whole forward+backward ~2.5x faster at B=1,
    H=2, T=4096 and ~1.2x at B=8, H=12, T=4096 than the jnp substitution.
    ``custom_linear_solve`` keeps the gradient cheap: the backward pass is one transposed solve
    (``transpose_solve``) instead of differentiating through the loop, and the matrix's gradient
    flows through ``matvec``.

    strictly_lower: ``[..., L, L]``, zero on and above the diagonal; rhs: ``[..., L, M]``.
    use_substitution: None picks by backend (the jnp substitution on CPU only).
    """
    if use_substitution is None:
        use_substitution = jax.default_backend() == "cpu"

    def matvec(x):
        return x - _einsum("...ti,...im->...tm", strictly_lower, x)

    def solve(_, b):
        if use_substitution:
            return _forward_substitution(strictly_lower, b)
        # unit_diagonal: the zero diagonal of -A is read as ones, so this solves (I - A) x = b.
        return jax.lax.linalg.triangular_solve(-strictly_lower, b, left_side=True, lower=True,
                                               unit_diagonal=True)

    def transpose_solve(_, b):
        if use_substitution:
            # (I - A)ᵀ is unit upper; reversing the row order turns it into a unit-lower system.
            reversed_transpose = jnp.flip(jnp.swapaxes(strictly_lower, -1, -2), axis=(-2, -1))
            return jnp.flip(_forward_substitution(reversed_transpose, jnp.flip(b, axis=-2)), axis=-2)
        return jax.lax.linalg.triangular_solve(-strictly_lower, b, left_side=True, lower=True,
                                               transpose_a=True, unit_diagonal=True)

    return jax.lax.custom_linear_solve(matvec, rhs, solve, transpose_solve)


def _chunked(*xs: jax.Array, chunk_size: int) -> tuple[jax.Array, ...]:
    """``[B, T, H, N]`` arrays -> fp32 ``[B, H, nC, L, N]``, T padded to a multiple of L.

    Identity tokens (r = k = v = a = b = 0, logw = 0) leave the state unchanged, so padding at the
    end neither alters the real outputs nor the final state.
    """
    batch, seq_len, heads, dim = xs[0].shape
    num_chunks = -(-seq_len // chunk_size)
    padding = num_chunks * chunk_size - seq_len

    def chunk(x):
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, padding), (0, 0), (0, 0)))
        return x.reshape(batch, num_chunks, chunk_size, heads, dim).transpose(0, 3, 1, 2, 4)

    return tuple(chunk(x) for x in xs)


class _ChunkDecays(NamedTuple):
    """Cumulative log-decays inside each chunk and the masks that document resets impose.

    incl / excl: λ_t and λ_{t-1} (λ_{-1} = 0), ``[B, H, nC, L, N]``; centre: c = λ_{L/2-1};
    last: λ_{L-1}, ``[B, H, nC, 1, N]``; undecay_centred: exp(c - λ_t), the "key" side of the
    pairwise decays. strictly_lower / lower: which (t, i) pairs interact, ``[L, L]`` or with resets
    ``[B, 1, nC, L, L]`` (same document only); before_first_reset / in_last_document:
    ``[B, 1, nC, L, 1]`` or None without resets.
    """

    incl: jax.Array
    excl: jax.Array
    centre: jax.Array
    last: jax.Array
    undecay_centred: jax.Array
    strictly_lower: jax.Array
    lower: jax.Array
    before_first_reset: jax.Array | None
    in_last_document: jax.Array | None


def _chunk_decays(logw: jax.Array, reset: jax.Array | None, seq_len: int) -> _ChunkDecays:
    """`_ChunkDecays` for chunked ``logw [B, H, nC, L, N]`` and ``reset [B, T]`` (or None)."""
    batch, _, num_chunks, chunk_size, _ = logw.shape
    # Inclusive λ_t and exclusive λ_{t-1}, by shifting rather than subtracting so that λ_{t-1}
    # carries no extra rounding.
    incl = jnp.cumsum(logw, axis=-2)
    excl = jnp.pad(incl[..., :-1, :], ((0, 0),) * 3 + ((1, 0), (0, 0)))
    # c = λ_{L/2-1} puts λ_{-1} and λ_{L-1} at most L/2 steps away, bounding every exponent.
    centre = excl[..., chunk_size // 2 : chunk_size // 2 + 1, :]
    strictly_lower = jnp.tril(jnp.ones((chunk_size, chunk_size), dtype=bool), k=-1)
    lower = jnp.tril(jnp.ones((chunk_size, chunk_size), dtype=bool))
    before_first_reset = in_last_document = None
    if reset is not None:
        reset = jnp.pad(reset, ((0, 0), (0, num_chunks * chunk_size - seq_len)))
        reset = reset.reshape(batch, 1, num_chunks, chunk_size)
        documents = jnp.cumsum(reset, axis=-1)[..., None]  # documents started so far, [B, 1, nC, L, 1]
        same_document = documents == jnp.swapaxes(documents, -1, -2)  # [B, 1, nC, L, L]
        strictly_lower, lower = strictly_lower & same_document, lower & same_document
        before_first_reset = documents == 0
        in_last_document = documents == documents[..., -1:, :]
    return _ChunkDecays(incl, excl, centre, incl[..., -1:, :], jnp.exp(centre - incl), strictly_lower, lower,
                        before_first_reset, in_last_document)


def _pairwise(queries: jax.Array, keys: jax.Array, mask: jax.Array) -> jax.Array:
    """``[.., L, N] x [.., L, N] -> [.., L, L]``; masked entries may be huge but are finite."""
    return jnp.where(mask, _einsum("...tc,...ic->...ti", queries, keys), 0.0)


def _chunk_maps(decays: _ChunkDecays, k: jax.Array, v: jax.Array, a: jax.Array, b: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Pass 1 of the chunked form (see `wkv7_parallel`), all chunks at once, from chunked inputs.

    Returns (P, U, Za, Zv): each chunk's affine map S_end = S0 P + U (P ``[B, H, nC, N(key),
    N(key)]``, U ``[B, H, nC, N(value), N(key)]``) and the solved rows sa = Za S0ᵀ + Zv
    (``[B, H, nC, L, N]`` each) that pass 2 reads the outputs with.
    """
    dim = k.shape[-1]
    a_decayed_centred = a * jnp.exp(decays.excl - decays.centre)
    b_tilde = _pairwise(a_decayed_centred, b * decays.undecay_centred, decays.strictly_lower)
    k_tilde = _pairwise(a_decayed_centred, k * decays.undecay_centred, decays.strictly_lower)

    # One unit-lower-triangular solve with both right-hand sides.
    a_from_start = a * jnp.exp(decays.excl)  # Xa: reads the chunk's start state
    if decays.before_first_reset is not None:
        a_from_start = jnp.where(decays.before_first_reset, a_from_start, 0.0)
    k_tilde_v = _einsum("...ti,...in->...tn", k_tilde, v)
    solved = _solve_unit_lower(b_tilde, jnp.concatenate([a_from_start, k_tilde_v], axis=-1))
    sa_from_start, sa_from_chunk = solved[..., :dim], solved[..., dim:]  # Za, Zv

    decay_to_end = jnp.exp(decays.last - decays.incl)
    b_to_end = b * decay_to_end
    k_to_end = k * decay_to_end
    decay_over_chunk = jnp.exp(decays.last[..., 0, :])  # diagonal of D, [B, H, nC, N]
    if decays.in_last_document is not None:
        b_to_end = jnp.where(decays.in_last_document, b_to_end, 0.0)
        k_to_end = jnp.where(decays.in_last_document, k_to_end, 0.0)
        decay_over_chunk = jnp.where(decays.before_first_reset[..., -1, :], decay_over_chunk, 0.0)
    chunk_p = decay_over_chunk[..., :, None] * jnp.eye(dim, dtype=jnp.float32) + _einsum(
        "...tc,...tj->...cj", sa_from_start, b_to_end
    )
    chunk_u = _einsum("...ti,...tj->...ij", sa_from_chunk, b_to_end) + _einsum(
        "...ti,...tj->...ij", v, k_to_end
    )
    return chunk_p, chunk_u, sa_from_start, sa_from_chunk


def _compose_chunk_maps(earlier, later):
    """Compose affine state maps ``S -> S P + U``: apply ``earlier`` first, then ``later``."""
    earlier_p, earlier_u = earlier
    later_p, later_u = later
    return (
        jnp.matmul(earlier_p, later_p, precision=_HIGHEST),
        jnp.matmul(earlier_u, later_p, precision=_HIGHEST) + later_u,
    )


def wkv7_parallel(
    r: jax.Array,
    logw: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    state: jax.Array,
    chunk_size: int = 32,
    reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Chunked (training) form of the RWKV-7 recurrence; same results as ``wkv7_oracle``.

    Memory is O(T·H·N + (T/L)·H·N²) plus O(T·L·H) for the in-chunk L×L matrices; the per-token
    N×N states are never materialised. Gradients (including into ``state``) come from ordinary
    autodiff; only the triangular solve supplies its own transpose (see ``_solve_unit_lower``), so
    forward mode works too.

    Algorithm, per head and chunk of length L (local t = 0…L-1, start state S0):
      λ_t = Σ_{j≤t} logw_j (λ_{-1} = 0), d_{t,i} = exp(λ_t - λ_i), sa_t = S_{t-1} a_t.
      Unrolling the recurrence inside the chunk,
        S_t = S0 diag(e^{λ_t}) + Σ_{i≤t} (sa_i b_iᵀ + v_i k_iᵀ) diag(d_{t,i}),
      so with SA the L×N matrix of rows sa_t:
        (I - B̃) SA = Xa S0ᵀ + K̃ V,  B̃[t,i] = Σ_c a_t[c] d_{t-1,i}[c] b_i[c],
        K̃[t,i] = Σ_c a_t[c] d_{t-1,i}[c] k_i[c] (i < t), Xa[t] = e^{λ_{t-1}} ⊙ a_t.
      A unit-lower-triangular solve gives Za = (I-B̃)⁻¹ Xa and Zv = (I-B̃)⁻¹ K̃ V, so
      SA = Za S0ᵀ + Zv, and the chunk is the affine map S_end = S0 P + U with
        P = diag(e^{λ_{L-1}}) + Zaᵀ Bd,   U = Zvᵀ Bd + Vᵀ Kd,
        Bd[i] = d_{L-1,i} ⊙ b_i,  Kd[i] = d_{L-1,i} ⊙ k_i.
      Pass 1 builds (P, U) for every chunk, an associative scan over chunks composes them into
      each chunk's start state, and pass 2 reads the outputs
        Y = Xr S0ᵀ + Rb SA + Rk V,  Xr[t] = e^{λ_t} ⊙ r_t,
        Rb[t,i] = Σ_c r_t[c] d_{t,i}[c] b_i[c],  Rk[t,i] = Σ_c r_t[c] d_{t,i}[c] k_i[c] (i ≤ t).

    Numerics and the decay precondition: the pairwise decays are factorised as
    d_{t,i} = exp(λ_t - c) · exp(c - λ_i) with c the chunk's mid-point cumulative log-decay, which
    turns B̃, K̃, Rb, Rk into matmuls. Each factor is at most exp(max|logw|·L/2); the kept (i ≤ t)
    products are ≤ 1, and the discarded (i > t) ones may overflow to inf harmlessly (they are
    selected away, and get zero cotangent). fp32 therefore needs max|logw|·L/2 well inside the exp
    range (≈ 88): measured accurate at 40, gradients degrading (3e-5) at 80, NaN at 88. RWKV-7
    guarantees logw ≥ -0.6066 (``RWKV7_MIN_LOG_DECAY``), i.e. max|logw|·L/2 ≤ 9.7 at L = 32 and
    ≤ 19.4 at L = 64. The bound is documented, not enforced: clamping would silently change the
    recurrence and zero its gradient, and values cannot be checked at trace time. Callers with
    stronger decays must use a smaller chunk_size or ``wkv7_oracle`` (which accepts any logw).

    Document resets (``reset`` True at a token zeroes the state before it) are masks on finite
    values, never a -inf log-decay: in-chunk pairs (B̃, K̃, Rb, Rk) are kept only within one
    document, Xa and Xr (which read S0) only before the chunk's first reset, Bd and Kd (which
    write S_end) only in the chunk's last document, and e^{λ_{L-1}} in P is 0 if the chunk holds
    a reset. Then Za vanishes after the first reset, so P and U depend on the last document only.

    Args:
      r, logw, k, v, a, b: ``[B, T, H, N]``; logw ≥ -0.6066 (see above).
      state: ``[B, H, N, N]`` initial state, ``[value, key]``.
      chunk_size: L; capped at T. 32 or 64 are good choices.
      reset: ``[B, T]`` bool document starts, or None.

    Returns:
      ``(y, final_state)``: y ``[B, T, H, N]`` fp32, final_state ``[B, H, N, N]`` fp32 (after the
      last real token).
    """
    batch, seq_len, heads, dim = r.shape
    chunk_size = max(1, min(chunk_size, seq_len))
    r, logw, k, v, a, b = _chunked(r, logw, k, v, a, b, chunk_size=chunk_size)  # all [B, H, nC, L, N]
    state = state.astype(jnp.float32)
    decays = _chunk_decays(logw, reset, seq_len)
    chunk_p, chunk_u, sa_from_start, sa_from_chunk = _chunk_maps(decays, k, v, a, b)

    # Prepend the constant map S -> state (P = 0, U = state): the inclusive scan then yields the
    # state at every chunk boundary, from the initial state (index 0) to the final one (index nC).
    boundary_p = jnp.concatenate([jnp.zeros_like(state[:, :, None]), chunk_p], axis=2)
    boundary_u = jnp.concatenate([state[:, :, None], chunk_u], axis=2)
    _, boundary_states = associative_scan(
        _compose_chunk_maps, (boundary_p, boundary_u), axis=2
    )
    start_states = boundary_states[:, :, :-1]  # [B, H, nC, N, N]
    final_state = boundary_states[:, :, -1]

    # Pass 2, all chunks at once.
    r_decayed_centred = r * jnp.exp(decays.incl - decays.centre)
    r_b = _pairwise(r_decayed_centred, b * decays.undecay_centred, decays.lower)
    r_k = _pairwise(r_decayed_centred, k * decays.undecay_centred, decays.lower)
    r_from_start = r * jnp.exp(decays.incl)  # Xr
    if decays.before_first_reset is not None:
        r_from_start = jnp.where(decays.before_first_reset, r_from_start, 0.0)
    sa = _einsum("...tc,...ic->...ti", sa_from_start, start_states) + sa_from_chunk
    y = (
        _einsum("...tc,...ic->...ti", r_from_start, start_states)
        + _einsum("...ti,...in->...tn", r_b, sa)
        + _einsum("...ti,...in->...tn", r_k, v)
    )  # [B, H, nC, L, N]

    y = y.transpose(0, 2, 3, 1, 4).reshape(batch, -1, heads, dim)
    return y[:, :seq_len], final_state


def wkv7_transition(
    logw: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    chunk_size: int = 32,
    reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The affine map a stretch of tokens applies to the state it starts from: S_end = S0 P + U.

    P is the product of the tokens' transitions diag(w_t) + a_t b_tᵀ (zero before a document
    start, i.e. after one of them the stretch forgets S0) and U the end state from S0 = 0. Built
    from `wkv7_parallel`'s chunk maps (pass 1 only: no outputs, no r) composed in log₂(T/L)
    rounds; the same decay precondition (logw ≥ -0.6066 at L = 32). Context parallelism
    summarises each device's sequence shard with it (`rwkv_jax.wkv.mesh`).

    Args:
      logw, k, v, a, b: ``[B, T, H, N]``.
      chunk_size: L, capped at T.
      reset: ``[B, T]`` bool document starts, or None.

    Returns:
      ``(P, U)``: P ``[B, H, N(key), N(key)]``, U ``[B, H, N(value), N(key)]``, fp32.
    """
    seq_len = logw.shape[1]
    logw, k, v, a, b = _chunked(logw, k, v, a, b, chunk_size=max(1, min(chunk_size, seq_len)))
    chunk_p, chunk_u, _, _ = _chunk_maps(_chunk_decays(logw, reset, seq_len), k, v, a, b)
    stretch_p, stretch_u = associative_reduce(_compose_chunk_maps, (chunk_p, chunk_u), axis=2)
    return stretch_p[:, :, 0], stretch_u[:, :, 0]
