"""Chunk math of the RWKV-7 (DPLR) kernels, shared by the GPU (Triton) and TPU (Mosaic) variants.

Everything here works on one head and one chunk of ``L`` tokens held as 2-D fp32 arrays
(``[L, N]`` token rows, ``[N, N]`` state laid out ``[value, key]``) and uses only operations both
Pallas lowerings accept: 2-D dots, elementwise maths, ``where`` with iota masks, full-axis sums and
``fori_loop``. Rows are never sliced (Triton cannot slice register tensors); single rows and
columns are read with one-hot masks and sums, which are exact.

The algorithm is the one of ``rwkv_jax.wkv.dplr.wkv7_parallel`` (see its docstring for the
derivation), restricted to a single chunk with a known start state ``S0``:

    λ_t = Σ_{s≤t} logw_s, λ⁻_t = λ_t - logw_t, c = λ⁻_{L/2} (centre), λ_L = λ_{L-1}
    B̃ = tril₋₁((a e^{λ⁻-c}) (b e^{c-λ})ᵀ),  K̃ = tril₋₁((a e^{λ⁻-c}) (k e^{c-λ})ᵀ)
    Rb = tril((r e^{λ-c}) (b e^{c-λ})ᵀ),     Rk = tril((r e^{λ-c}) (k e^{c-λ})ᵀ)
    SA = (I - B̃)⁻¹ ((a e^{λ⁻}) S0ᵀ + K̃ V)                           rows sa_t = S_{t-1} a_t
    Y  = (r e^{λ}) S0ᵀ + Rb SA + Rk V
    S_end = S0 diag(e^{λ_L}) + SAᵀ (b e^{λ_L-λ}) + Vᵀ (k e^{λ_L-λ})

``(I - B̃)⁻¹`` comes from blocked forward substitution (``unit_lower_inverse``), never from a power
series of B̃. The backward recomputes all of this from the stored ``S0`` (never dividing by a
decay) and applies the transposed steps by hand; the centre ``c`` is a constant for
differentiation because the result does not depend on it.

The kernels split the work so that everything heavy is parallel over chunks:

1. ``chunk_summary`` (parallel): the state-independent parts Za = (I-B̃)⁻¹ Xa, Zv = (I-B̃)⁻¹ K̃ V,
   Q = Xr + Rb Za and Y_intra = Rb Zv + Rk V, so that SA = Za S0ᵀ + Zv and Y = Q S0ᵀ + Y_intra.
2. ``chunk_state_step`` (sequential over chunks, light): y and the end state from S0.
3. ``chunk_cotangent_step`` (sequential, reverse, light): the transposed map,
   dS0 = dS_end ⊙ e^{λ_L} + (dS_end Bdᵀ) Za + dYᵀ Q.
4. ``chunk_backward`` (parallel): all input gradients of a chunk from its S0, dS_end and the
   stored (I-B̃)⁻¹.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.platform import kernel_dot

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ChunkOps:
    """The matmul precisions and cumulative-sum strategy a Pallas backend needs.

    precision: of the matmuls on data (r, k, v, a, b, the state and their products): a
      ``Precision`` or a ``DotAlgorithmPreset``.
    sums: of the masked matmuls that form cumulative sums (log-decays, their gradients); must
      be ≈ fp32.
    native_cumsum: use ``jnp.cumsum`` (Triton lowers it to a scan of fp32 adds); otherwise a dot
      with a lower-triangular ones matrix (Mosaic TPU has no cumsum).
    interpret: the kernels run in Pallas interpret mode, so reduced-precision algorithms are
      emulated (``platform.kernel_dot``).
    """

    precision: Any
    native_cumsum: bool
    sums: Any = jax.lax.Precision.HIGHEST
    interpret: bool = False

    def _dot(self, x: jax.Array, y: jax.Array, x_axis: int, y_axis: int) -> jax.Array:
        return kernel_dot(x, y, x_axis, y_axis, self.precision, interpret=self.interpret)

    def _sum_rows(self, mask: jax.Array, x: jax.Array, mask_axis: int) -> jax.Array:
        """Sums of the rows of ``x`` selected by a 0/1 ``mask`` (contracted over ``mask_axis``),
        at the cumulative sums' precision."""
        return kernel_dot(mask.astype(_F32), x, mask_axis, 0, self.sums, interpret=self.interpret)

    def mm(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """``x @ y``."""
        return self._dot(x, y, 1, 0)

    def mm_nt(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """``x @ yᵀ``."""
        return self._dot(x, y, 1, 1)

    def mm_tn(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """``xᵀ @ y``."""
        return self._dot(x, y, 0, 0)

    def cumsum(self, x: jax.Array) -> jax.Array:
        """Inclusive cumulative sum over rows of ``[L, N]``."""
        if self.native_cumsum:
            return jnp.cumsum(x, axis=0)
        return self._sum_rows(_lower_mask(x.shape[0], strict=False), x, 1)

    def reverse_cumsum(self, x: jax.Array) -> jax.Array:
        """``out[s] = Σ_{t≥s} x[t]`` over rows of ``[L, N]`` (Triton has no reverse scan)."""
        return self._sum_rows(_lower_mask(x.shape[0], strict=False), x, 0)


def _lower_mask(length: int, *, strict: bool) -> jax.Array:
    rows = jax.lax.broadcasted_iota(jnp.int32, (length, length), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (length, length), 1)
    return rows > cols if strict else rows >= cols


def _row(x: jax.Array, index: int) -> jax.Array:
    """``x[index:index+1]`` of a 2-D array via a one-hot mask (exact)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.sum(jnp.where(rows == index, x, 0.0), axis=0, keepdims=True)


def _block_index(index: jax.Array, block: int, length: int) -> jax.Array:
    """``index // block`` for ``0 <= index < length`` by comparisons: vector integer division
    (and jnp's floor semantics, which need sign()) are not reliably lowered by Mosaic."""
    result = jnp.zeros_like(index)
    for boundary in range(block, length, block):
        result = result + jnp.where(index >= boundary, 1, 0).astype(index.dtype)
    return result


def unit_lower_inverse(ops: ChunkOps, strictly_lower: jax.Array, block: int) -> jax.Array:
    """``(I - A)⁻¹`` for strictly lower-triangular ``A`` ``[L, L]`` by blocked forward substitution.

    Diagonal ``block x block`` blocks: column-oriented substitution, all blocks at once (step s
    finalises rows with ``row % block == s`` and pushes them into the later rows of their block
    with one masked dot). Off-diagonal blocks: block forward substitution
    ``X <- D⁻¹ (I + E X)`` (D = I minus the diagonal blocks, E = the rest of A), which finalises
    one more block row per pass, in L/block - 1 passes. Each row is computed exactly as in
    sequential forward substitution, so no power of A is ever formed.
    """
    length = strictly_lower.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (length, length), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (length, length), 1)
    identity = jnp.where(rows == cols, 1.0, 0.0).astype(_F32)
    row_block, col_block = _block_index(rows, block, length), _block_index(cols, block, length)
    same_block = row_block == col_block
    col_in_block = cols - block * col_block
    in_block = jnp.where(same_block, strictly_lower, 0.0)

    def substitute_column(step, inverse):
        column_part = jnp.where(col_in_block == step, in_block, 0.0)
        return inverse + ops.mm(column_part, inverse)

    block_inverse = jax.lax.fori_loop(0, block, substitute_column, identity)
    if length == block:
        return block_inverse
    across_blocks = jnp.where(same_block, 0.0, strictly_lower)

    def substitute_block_row(_, inverse):
        return block_inverse + ops.mm(block_inverse, ops.mm(across_blocks, inverse))

    return jax.lax.fori_loop(0, length // block - 1, substitute_block_row, block_inverse)


class _ChunkFactors(NamedTuple):
    """Decay-weighted inputs of one chunk (all ``[L, N]`` except ``decay_last`` ``[1, N]``)."""

    a_centred: jax.Array  # a e^{λ⁻-c}
    r_centred: jax.Array  # r e^{λ-c}
    b_uncentred: jax.Array  # b e^{c-λ}
    k_uncentred: jax.Array  # k e^{c-λ}
    a_from_start: jax.Array  # a e^{λ⁻}
    r_from_start: jax.Array  # r e^{λ}
    b_to_end: jax.Array  # b e^{λ_L-λ}
    k_to_end: jax.Array  # k e^{λ_L-λ}
    decay_last: jax.Array  # e^{λ_L}
    log_decay_excl: jax.Array  # λ⁻
    log_decay_incl: jax.Array  # λ
    centre: jax.Array  # c
    log_decay_last: jax.Array  # λ_L


def _factors(ops: ChunkOps, r, logw, k, a, b) -> _ChunkFactors:
    length = r.shape[0]
    log_decay_incl = ops.cumsum(logw)
    log_decay_excl = log_decay_incl - logw
    # c = λ⁻ at the middle row keeps every centred exponent within L/2 steps (|.| ≤ 0.61·L/2).
    centre = _row(log_decay_excl, length // 2)
    log_decay_last = _row(log_decay_incl, length - 1)
    undecay_centred = jnp.exp(centre - log_decay_incl)
    decay_to_end = jnp.exp(log_decay_last - log_decay_incl)
    return _ChunkFactors(
        a_centred=a * jnp.exp(log_decay_excl - centre),
        r_centred=r * jnp.exp(log_decay_incl - centre),
        b_uncentred=b * undecay_centred,
        k_uncentred=k * undecay_centred,
        a_from_start=a * jnp.exp(log_decay_excl),
        r_from_start=r * jnp.exp(log_decay_incl),
        b_to_end=b * decay_to_end,
        k_to_end=k * decay_to_end,
        decay_last=jnp.exp(log_decay_last),
        log_decay_excl=log_decay_excl,
        log_decay_incl=log_decay_incl,
        centre=centre,
        log_decay_last=log_decay_last,
    )


class _PairwiseMatrices(NamedTuple):
    """``[L, L]`` in-chunk interaction matrices."""

    b_tilde: jax.Array
    k_tilde: jax.Array
    r_b: jax.Array
    r_k: jax.Array


def _pairwise(ops: ChunkOps, f: _ChunkFactors) -> _PairwiseMatrices:
    length = f.a_centred.shape[0]
    strict = _lower_mask(length, strict=True)
    lower = _lower_mask(length, strict=False)
    # Entries above the diagonal can be large (each factor ≤ e^{0.61·L/2}) but are finite at
    # L ≤ 64 and are selected away.
    return _PairwiseMatrices(
        b_tilde=jnp.where(strict, ops.mm_nt(f.a_centred, f.b_uncentred), 0.0),
        k_tilde=jnp.where(strict, ops.mm_nt(f.a_centred, f.k_uncentred), 0.0),
        r_b=jnp.where(lower, ops.mm_nt(f.r_centred, f.b_uncentred), 0.0),
        r_k=jnp.where(lower, ops.mm_nt(f.r_centred, f.k_uncentred), 0.0),
    )


def chunk_backward(
    ops: ChunkOps, r, logw, k, v, a, b, solve, state, d_y, d_end_state
) -> tuple[jax.Array, ...]:
    """Gradients of a chunk's token inputs, recomputed from its start state.

    Args:
      ops: backend matmul/cumsum strategy.
      r, logw, k, v, a, b: ``[L, N]`` fp32.
      solve: ``[L, L]`` (I - B̃)⁻¹ from ``chunk_summary``.
      state: ``[N, N]`` fp32 start state, ``[value, key]``.
      d_y: ``[L, N]`` cotangent of y; d_end_state: ``[N, N]`` cotangent of the end state.

    Returns:
      ``(d_r, d_logw, d_k, d_v, d_a, d_b)``, ``[L, N]`` fp32 each (the start state's cotangent is
      ``chunk_cotangent_step``'s job).
    """
    f = _factors(ops, r, logw, k, a, b)
    m = _pairwise(ops, f)
    rhs = ops.mm_nt(f.a_from_start, state) + ops.mm(m.k_tilde, v)
    state_times_a = ops.mm(solve, rhs)
    length = r.shape[0]
    strict = _lower_mask(length, strict=True)
    lower = _lower_mask(length, strict=False)

    # end_state = S0 ⊙ e^{λ_L} + SAᵀ Bd + Vᵀ Kd
    d_log_decay_last = jnp.sum(d_end_state * state, axis=0, keepdims=True) * f.decay_last
    d_state_times_a = ops.mm_nt(f.b_to_end, d_end_state)
    d_b_to_end = ops.mm(state_times_a, d_end_state)
    d_v = ops.mm_nt(f.k_to_end, d_end_state)
    d_k_to_end = ops.mm(v, d_end_state)

    # y = Xr S0ᵀ + Rb SA + Rk V
    d_r_from_start = ops.mm(d_y, state)
    d_r_b = jnp.where(lower, ops.mm_nt(d_y, state_times_a), 0.0)
    d_state_times_a = d_state_times_a + ops.mm_tn(m.r_b, d_y)
    d_r_k = jnp.where(lower, ops.mm_nt(d_y, v), 0.0)
    d_v = d_v + ops.mm_tn(m.r_k, d_y)

    # SA = (I - B̃)⁻¹ rhs: d_rhs = (I - B̃)⁻ᵀ d_SA, d_B̃ = d_rhs SAᵀ
    d_rhs = ops.mm_tn(solve, d_state_times_a)
    d_b_tilde = jnp.where(strict, ops.mm_nt(d_rhs, state_times_a), 0.0)
    # rhs = Xa S0ᵀ + K̃ V
    d_a_from_start = ops.mm(d_rhs, state)
    d_k_tilde = jnp.where(strict, ops.mm_nt(d_rhs, v), 0.0)
    d_v = d_v + ops.mm_tn(m.k_tilde, d_rhs)

    # The four pairwise products.
    d_a_centred = ops.mm(d_b_tilde, f.b_uncentred) + ops.mm(d_k_tilde, f.k_uncentred)
    d_r_centred = ops.mm(d_r_b, f.b_uncentred) + ops.mm(d_r_k, f.k_uncentred)
    d_b_uncentred = ops.mm_tn(d_b_tilde, f.a_centred) + ops.mm_tn(d_r_b, f.r_centred)
    d_k_uncentred = ops.mm_tn(d_k_tilde, f.a_centred) + ops.mm_tn(d_r_k, f.r_centred)

    # Elementwise factors x·e^{±λ...}: d_x = Σ d_factor·e^{...}, d_exponent = d_factor·factor.
    d_a = d_a_centred * jnp.exp(f.log_decay_excl - f.centre) + d_a_from_start * jnp.exp(
        f.log_decay_excl
    )
    d_r = d_r_centred * jnp.exp(f.log_decay_incl - f.centre) + d_r_from_start * jnp.exp(
        f.log_decay_incl
    )
    undecay_centred = jnp.exp(f.centre - f.log_decay_incl)
    decay_to_end = jnp.exp(f.log_decay_last - f.log_decay_incl)
    d_b = d_b_uncentred * undecay_centred + d_b_to_end * decay_to_end
    d_k = d_k_uncentred * undecay_centred + d_k_to_end * decay_to_end

    d_excl = d_a_centred * f.a_centred + d_a_from_start * f.a_from_start
    to_end_terms = d_b_to_end * f.b_to_end + d_k_to_end * f.k_to_end
    d_incl = (
        d_r_centred * f.r_centred
        + d_r_from_start * f.r_from_start
        - d_b_uncentred * f.b_uncentred
        - d_k_uncentred * f.k_uncentred
        - to_end_terms
    )
    d_log_decay_last = d_log_decay_last + jnp.sum(to_end_terms, axis=0, keepdims=True)
    # λ_t sums logw_s over s ≤ t, λ⁻_t over s < t, λ_L over every s.
    d_logw = ops.reverse_cumsum(d_incl + d_excl) - d_excl + d_log_decay_last
    return d_r, d_logw, d_k, d_v, d_a, d_b


class ChunkSummary(NamedTuple):
    """State-independent parts of one chunk, ``[L, N]`` fp32 each (see the module docstring)."""

    a_solved: jax.Array  # Za = (I - B̃)⁻¹ Xa, [L, N(key)]
    v_solved: jax.Array  # Zv = (I - B̃)⁻¹ K̃ V, [L, N(value)]
    r_read: jax.Array  # Q = Xr + Rb Za, [L, N(key)]
    y_intra: jax.Array  # Rb Zv + Rk V, [L, N(value)]


def chunk_summary(
    ops: ChunkOps, block: int, r, logw, k, v, a, b
) -> tuple[ChunkSummary, jax.Array]:
    """The parts of a chunk that do not depend on its start state.

    Args:
      ops: backend matmul/cumsum strategy.
      block: diagonal block size of the substitution (divides L).
      r, logw, k, v, a, b: ``[L, N]`` fp32.

    Returns:
      ``(summary, solve)``: the four ``[L, N]`` arrays and ``(I - B̃)⁻¹`` ``[L, L]`` (kept for
      the backward, which then needs no substitution of its own).
    """
    f = _factors(ops, r, logw, k, a, b)
    m = _pairwise(ops, f)
    solve = unit_lower_inverse(ops, m.b_tilde, block)
    a_solved = ops.mm(solve, f.a_from_start)
    v_solved = ops.mm(solve, ops.mm(m.k_tilde, v))
    summary = ChunkSummary(
        a_solved=a_solved,
        v_solved=v_solved,
        r_read=f.r_from_start + ops.mm(m.r_b, a_solved),
        y_intra=ops.mm(m.r_b, v_solved) + ops.mm(m.r_k, v),
    )
    return summary, solve


def _decays_to_end(ops: ChunkOps, logw: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(e^{λ_L - λ_t} [L, N], e^{λ_L} [1, N])``."""
    log_decay_incl = ops.cumsum(logw)
    log_decay_last = _row(log_decay_incl, logw.shape[0] - 1)
    return jnp.exp(log_decay_last - log_decay_incl), jnp.exp(log_decay_last)


def chunk_state_step(
    ops: ChunkOps, logw, k, v, b, summary: ChunkSummary, state
) -> tuple[jax.Array, jax.Array]:
    """``(y [L, N], end_state [N, N])`` of a chunk from its summary and start state ``[N, N]``."""
    decay_to_end, decay_last = _decays_to_end(ops, logw)
    state_times_a = ops.mm_nt(summary.a_solved, state) + summary.v_solved
    y = ops.mm_nt(summary.r_read, state) + summary.y_intra
    end_state = (
        state * decay_last
        + ops.mm_tn(state_times_a, b * decay_to_end)
        + ops.mm_tn(v, k * decay_to_end)
    )
    return y, end_state


def chunk_cotangent_step(ops: ChunkOps, logw, b, a_solved, r_read, d_y, d_end_state) -> jax.Array:
    """Cotangent ``[N, N]`` of a chunk's start state from that of its end state and ``d_y``."""
    decay_to_end, decay_last = _decays_to_end(ops, logw)
    return (
        d_end_state * decay_last
        + ops.mm(ops.mm_nt(d_end_state, b * decay_to_end), a_solved)
        + ops.mm_tn(d_y, r_read)
    )
