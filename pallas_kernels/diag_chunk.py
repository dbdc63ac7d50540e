"""Chunk math of the RWKV-5/6 Pallas kernels, shared by the GPU and the TPU variant.

Everything here works on values already loaded from refs: `[S, N]` fp32 tiles of S tokens
("sub-blocks"), the bonus `u [1, N]` and the fp32 state `[N, N]`. Inside the kernels the state is
kept transposed, laid out [value, key], so that the per-key decay scales its columns (a row
vector broadcast) and the token's output is an "NT" matmul; the wrappers transpose the [key,
value] state of `rwkv_jax.wkv.diag` at the boundary.

A chunk is a few sub-blocks walked in order, the state advancing from one to the next. Within a
sub-block of S tokens starting from state S₀ (equations of docs/rwkv_versions.md §8.3, per key
channel c, a_t = Σ_{j<t} logw_j the decay from the sub-block start to t−1, z_i = Σ_{j>i} logw_j
from i+1 to its end, g = Σ_j logw_j):

    y_t = (r_t ⊙ e^{a_t}) S₀ᵀ + Σ_{i<t} [Σ_c r_t[c] k_i[c] e^{D[t,i,c]}] v_i + (Σ_c r_t u k_t) v_t
    S₁  = S₀ ⊙ e^{g} (per key column) + Σ_i v_i (k_i ⊙ e^{z_i})ᵀ
    D[t, i, c] = Σ_{i<j<t} logw_j[c]

Exactness at any decay (v6's logw reaches −200 and below): every exponent above is a sum of the
logw of one contiguous run of tokens, formed directly and never as a difference of two cumulative
sums (a difference of sums near −3000 keeps only ~1e-4 absolute precision, which would be a 1e-4
relative error on a decay factor near 1). All exponents are ≤ 0, so nothing overflows, and a
factor that underflows to 0 is one whose true value is below fp32's range. D is built column by
column, each column a running sum that adds one more token's logw: S·N work per column, the
"exact element-wise decay product" of the diagonal blocks that flash-linear-attention's
chunk_rwkv6 computes from chunk-wide sums instead.

The first term and the state update ("inter", `_inter`) are a few matmuls, exact for a tile of
any length (their exponents run from the tile's start or to its end); the pairs inside the
sub-block ("intra", `_intra`) are most of the arithmetic and do not depend on the state. The
TPU kernel walks the sub-blocks of each chunk with the real state (`chunk_forward`). The GPU
splits the work: a fully parallel kernel runs `chunk_forward` from a zero state, which yields
every pair inside the chunk, and the sequential walk only applies `inter_forward` to whole chunks
(one step per chunk, with chunk-sized matmuls).

The backward pass is `jax.vjp` of each sub-block traced inside the kernel, from the sub-block
start states recomputed from the chunk's stored start state; it never divides by a decay. The
pairwise decays have a hand-written VJP (`_pair_scores_with_vjp`) that recomputes them column
by column.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.platform import kernel_dot

_F32 = jnp.float32
Tiles = tuple[jax.Array, ...]


@dataclasses.dataclass(frozen=True)
class DiagOps:
    """The matmul precisions a Pallas backend uses.

    decay_sums: precision of the masked matmuls that sum log-decays; must be ≈ fp32 (an error
      δ in an exponent is a relative error δ on its decay factor).
    data: precision of the matmuls that touch r, k, v and the state (fp32-accurate for fp32
      inputs; the default, faster, precision suffices for bf16 inputs).
    interpret: the kernels run in Pallas interpret mode, so reduced-precision algorithms are
      emulated (`platform.kernel_dot`).
    """

    decay_sums: Any
    data: Any
    interpret: bool = False

    def _dot(self, x, y, x_axis: int, y_axis: int, precision) -> jax.Array:
        return kernel_dot(x, y, x_axis, y_axis, precision, interpret=self.interpret)

    def mm(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """x @ y."""
        return self._dot(x, y, 1, 0, self.data)

    def mm_nt(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """x @ yᵀ."""
        return self._dot(x, y, 1, 1, self.data)

    def mm_tn(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """xᵀ @ y."""
        return self._dot(x, y, 0, 0, self.data)

    def masked_sum(self, mask: jax.Array, logw: jax.Array) -> jax.Array:
        """mask @ logw with a 0/1 mask: sums of log-decays over runs of tokens."""
        return self._dot(mask, logw, 1, 0, self.decay_sums)


def _row(x: jax.Array, index: int | jax.Array) -> jax.Array:
    """Row `index` of `x [S, N]` as `[1, N]`; a masked sum, because Triton cannot slice values."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (x.shape[0], 1), 0)
    return jnp.sum(jnp.where(rows == index, x, 0.0), axis=0, keepdims=True)


def _indices(size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Row index t and column index i of an `[S, S]` matrix, and the token index `[S, 1]`."""
    t_index = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    i_index = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
    return t_index, i_index, jax.lax.broadcasted_iota(jnp.int32, (size, 1), 0)


def _walk_columns(logw: jax.Array, body, init):
    """Folds ``body(i, between, carry) -> carry`` over the columns i = S−2 … 0 of the pairwise
    decays, with ``between = D[:, i, :]`` `[S, N]`, D[t, i] = Σ_{i<j<t} logw_j for t > i (rows
    t ≤ i hold 0). Each step adds one token's logw to every run that covers it, so each entry is
    a running sum of non-positive numbers: no cancellation. A rolled loop (``fori_loop``, one
    column per iteration): unrolled, the S−1 columns of every sub-block made the GPU backward
    kernel's Triton module ~0.7 MB and its compile take minutes."""
    size = logw.shape[0]
    token = _indices(size)[2]

    def step(count, state):
        between, carry = state
        i = size - 2 - count
        # D[t, i] = D[t, i + 1] + logw_{i+1} for t ≥ i + 2, and 0 (no token between) for t = i + 1.
        between = jnp.where(token >= i + 2, between + _row(logw, i + 1), 0.0)
        return between, body(i, between, carry)

    return jax.lax.fori_loop(0, size - 1, step, (jnp.zeros_like(logw), init))[1]


def _pair_scores(r, logw, k):
    """scores[t, i] = Σ_c r_t[c] k_i[c] e^{D[t,i,c]} for i < t, 0 elsewhere; r, logw, k `[S, N]`."""
    size = r.shape[0]
    t_index, i_index, _ = _indices(size)

    def add_column(i, between, scores):
        column = jnp.sum(r * _row(k, i) * jnp.exp(between), axis=1, keepdims=True)  # [S, 1]
        return scores + jnp.where((i_index == i) & (t_index > i), column, 0.0)

    return _walk_columns(logw, add_column, jnp.zeros((size, size), _F32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pair_scores_with_vjp(ops: DiagOps, r, logw, k):
    """`_pair_scores` whose backward pass recomputes the S−1 `[S, N]` decay columns one at a time
    instead of keeping all of them (S·S·N floats) as residuals. Only for use under `jax.vjp`: the
    Triton lowering has no rule for a custom_vjp call that is not differentiated away."""
    return _pair_scores(r, logw, k)


def _pair_scores_fwd(ops: DiagOps, r, logw, k):
    return _pair_scores(r, logw, k), (r, logw, k)


def _pair_scores_bwd(ops: DiagOps, residuals, d_scores):
    """With F_i[t] = d_scores[t, i] r_t k_i e^{D[t,i]} (per channel), the exponent D[t, i] holds
    logw_j for i < j < t, so d logw_j = Σ_{i<j} Σ_{t>j} F_i[t]: per column a masked suffix sum."""
    r, logw, k = residuals
    size = r.shape[0]
    t_index, i_index, token = _indices(size)
    later = (i_index > t_index).astype(_F32)  # later @ x: Σ_{t>j} x_t in row j

    def add_column(i, between, grads):
        d_r, d_logw, d_k = grads
        weight = jnp.sum(jnp.where((i_index == i) & (t_index > i), d_scores, 0.0), axis=1,
                         keepdims=True)  # d_scores[t, i], [S, 1]
        weighted_decay = weight * jnp.exp(between)
        k_i = _row(k, i)
        r_term = r * weighted_decay
        return (d_r + weighted_decay * k_i,
                d_logw + jnp.where(token > i, ops.masked_sum(later, r_term * k_i), 0.0),
                d_k + jnp.where(token == i, jnp.sum(r_term, axis=0, keepdims=True), 0.0))

    return _walk_columns(logw, add_column, (jnp.zeros_like(r), jnp.zeros_like(logw), jnp.zeros_like(k)))


_pair_scores_with_vjp.defvjp(_pair_scores_fwd, _pair_scores_bwd)


def _decays(ops: DiagOps, logw):
    """(a, z, g): a_t = Σ_{j<t} logw_j, z_i = Σ_{j>i} logw_j `[S, N]`, g = Σ_j logw_j `[1, N]`."""
    t_index, i_index, _ = _indices(logw.shape[0])
    to_previous = ops.masked_sum((i_index < t_index).astype(_F32), logw)
    to_end = ops.masked_sum((i_index > t_index).astype(_F32), logw)
    return to_previous, to_end, jnp.sum(logw, axis=0, keepdims=True)


def _next_state(ops: DiagOps, logw, k, v, state, decays=None):
    """The state after a sub-block: S₀ ⊙ e^{g} (per key column) + Σ_i v_i (k_i ⊙ e^{z_i})ᵀ."""
    _, to_end, total = _decays(ops, logw) if decays is None else decays
    return state * jnp.exp(total) + ops.mm_tn(v, k * jnp.exp(to_end))


def _intra(ops: DiagOps, r, logw, k, v, u, *, for_vjp: bool = False):
    """The part of a sub-block's y that does not read the state: the pairs inside the sub-block,
    the diagonal carrying the bonus. r, logw, k, v `[S, N]`; u `[1, N]` -> `[S, N]`. `for_vjp`:
    the pairwise scores carry their memory-saving VJP (only when differentiated in a kernel)."""
    t_index, i_index, _ = _indices(r.shape[0])
    bonus = jnp.sum(r * u * k, axis=1, keepdims=True)  # [S, 1]
    pair_scores = functools.partial(_pair_scores_with_vjp, ops) if for_vjp else _pair_scores
    scores = pair_scores(r, logw, k) + jnp.where(t_index == i_index, bonus, 0.0)
    return ops.mm(scores, v)


def _inter(ops: DiagOps, r, logw, k, v, state):
    """The part of a sub-block that reads the state: its contribution to y `[S, N]` and the state
    after the sub-block `[N, N]` ([value, key])."""
    decays = _decays(ops, logw)
    y = ops.mm_nt(r * jnp.exp(decays[0]), state)
    return y, _next_state(ops, logw, k, v, state, decays)


def _sub_block(ops: DiagOps, r, logw, k, v, u, state, *, for_vjp: bool = False):
    """One sub-block (module docstring): y `[S, N]` and the state after it."""
    y, state = _inter(ops, r, logw, k, v, state)
    return y + _intra(ops, r, logw, k, v, u, for_vjp=for_vjp), state


def inter_forward(ops: DiagOps, r, logw, k, v, state) -> tuple[jax.Array, jax.Array]:
    """The state's part of y and the state update for one tile of any length L (`[L, N]` fp32
    tiles, state `[N, N]` [value, key]): `(r ⊙ e^{a}) Sᵀ` and `S ⊙ e^{g} + vᵀ (k ⊙ e^{z})`. Its
    exponents are runs from the tile's start or to its end, exact at any L; the GPU walks whole
    chunks with it, and adds the pairs inside each chunk from `chunk_forward` from a zero state."""
    return _inter(ops, r, logw, k, v, state)


def inter_backward(ops: DiagOps, r, logw, k, v, state, d_y, d_next_state):
    """Gradients `(d_r, d_logw, d_k, d_v, d_state)` of `inter_forward` from the tile's start
    state, for the cotangents of its y and of the state after it."""
    _, pullback = jax.vjp(lambda *args: _inter(ops, *args), r, logw, k, v, state)
    return pullback((d_y, d_next_state))


def chunk_forward(ops: DiagOps, r: Tiles, logw: Tiles, k: Tiles, v: Tiles, u: jax.Array,
                  state: jax.Array) -> tuple[Tiles, jax.Array]:
    """One chunk: its sub-blocks in order.

    Args:
      r, logw, k, v: tuples of `[S, N]` fp32 tiles, one per sub-block, in token order.
      u: `[1, N]` fp32 bonus.
      state: `[N, N]` fp32 state before the chunk, layout [value, key] (zeros: y holds only the
        pairs inside the chunk).

    Returns:
      y: tuple of `[S, N]` fp32 output tiles; the state after the chunk, [value, key].
    """
    ys = []
    for tiles in zip(r, logw, k, v):
        y, state = _sub_block(ops, *tiles, u, state)
        ys.append(y)
    return tuple(ys), state


def chunk_backward(ops: DiagOps, r: Tiles, logw: Tiles, k: Tiles, v: Tiles, u: jax.Array,
                   state: jax.Array, d_y: Tiles, d_next_state: jax.Array):
    """Gradients of `chunk_forward`, recomputed from the state the chunk started from.

    The sub-blocks' start states are recomputed first (state updates only), then each sub-block's
    VJP runs from the last to the first, so only one sub-block's residuals are live at a time.

    Args:
      r, logw, k, v, u, state: as for `chunk_forward` (state: the stored chunk start state).
      d_y: tuple of `[S, N]` cotangents of the outputs.
      d_next_state: `[N, N]` cotangent of the state after the chunk, [value, key].

    Returns:
      (d_r, d_logw, d_k, d_v) tuples of `[S, N]` tiles, d_u `[1, N]`, and the cotangent of the
      chunk's start state `[N, N]`.
    """
    starts = [state]
    for logw_s, k_s, v_s in list(zip(logw, k, v))[:-1]:
        starts.append(_next_state(ops, logw_s, k_s, v_s, starts[-1]))
    d_state, d_u = d_next_state, jnp.zeros_like(u)
    d_tiles = []
    for index in reversed(range(len(r))):
        _, pullback = jax.vjp(lambda *args: _sub_block(ops, *args, for_vjp=True),
                              r[index], logw[index], k[index], v[index], u, starts[index])
        *d_inputs, d_u_sub, d_state = pullback((d_y[index], d_state))
        d_tiles.append(d_inputs)
        d_u = d_u + d_u_sub
    d_r, d_logw, d_k, d_v = (tuple(reversed(tiles)) for tiles in zip(*d_tiles))
    return d_r, d_logw, d_k, d_v, d_u, d_state
