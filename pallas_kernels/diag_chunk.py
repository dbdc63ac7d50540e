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

The backward pass is `jax.vjp` of `chunk_forward` traced inside the kernel: it recomputes the
chunk from its stored start state and never divides by a decay.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

_F32 = jnp.float32
Tiles = tuple[jax.Array, ...]


@dataclasses.dataclass(frozen=True)
class DiagOps:
    """The matmul precisions a Pallas backend uses.

    decay_sums: precision of the masked matmuls that sum log-decays; must be ≈ fp32 (an error
      δ in an exponent is a relative error δ on its decay factor).
    data: precision of the matmuls that touch r, k, v and the state (fp32-accurate for fp32
      inputs; the default, faster, precision suffices for bf16 inputs).
    """

    decay_sums: Any
    data: Any

    def _dot(self, x, y, x_axis: int, y_axis: int, precision) -> jax.Array:
        return jax.lax.dot_general(
            x, y, (((x_axis,), (y_axis,)), ((), ())),
            precision=precision, preferred_element_type=_F32,
        )

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


def _row(x: jax.Array, index: int) -> jax.Array:
    """Row `index` of `x [S, N]` as `[1, N]`; a masked sum, because Triton cannot slice values."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (x.shape[0], 1), 0)
    return jnp.sum(jnp.where(rows == index, x, 0.0), axis=0, keepdims=True)


def _sub_block(ops: DiagOps, r, logw, k, v, u, state):
    """One sub-block (module docstring). r, logw, k, v `[S, N]`; u `[1, N]`; state `[N, N]`
    [value, key]. Returns y `[S, N]` and the state after the sub-block."""
    size = r.shape[0]
    t_index = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    i_index = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
    to_previous = ops.masked_sum((i_index < t_index).astype(_F32), logw)  # a_t
    to_end = ops.masked_sum((i_index > t_index).astype(_F32), logw)  # z_i
    total = jnp.sum(logw, axis=0, keepdims=True)  # g, [1, N]

    # Pairs inside the sub-block: scores[t, i] for i ≤ t, the diagonal carrying the bonus.
    bonus = jnp.sum(r * u * k, axis=1, keepdims=True)  # [S, 1]
    scores = jnp.where(t_index == i_index, bonus, 0.0)
    token = jax.lax.broadcasted_iota(jnp.int32, (size, 1), 0)
    between = jnp.zeros_like(logw)  # D[:, i, :] for the current column i; rows t > i are used
    for i in range(size - 2, -1, -1):
        # D[t, i] = D[t, i + 1] + logw_{i+1} for t ≥ i + 2, and 0 (no token between) for t = i + 1.
        between = jnp.where(token >= i + 2, between + _row(logw, i + 1), 0.0)
        column = jnp.sum(r * _row(k, i) * jnp.exp(between), axis=1, keepdims=True)  # [S, 1]
        scores = scores + jnp.where((i_index == i) & (t_index > i), column, 0.0)

    y = ops.mm_nt(r * jnp.exp(to_previous), state) + ops.mm(scores, v)
    new_state = state * jnp.exp(total) + ops.mm_tn(v, k * jnp.exp(to_end))
    return y, new_state


def chunk_forward(ops: DiagOps, r: Tiles, logw: Tiles, k: Tiles, v: Tiles, u: jax.Array,
                  state: jax.Array) -> tuple[Tiles, jax.Array]:
    """One chunk: its sub-blocks in order.

    Args:
      r, logw, k, v: tuples of `[S, N]` fp32 tiles, one per sub-block, in token order.
      u: `[1, N]` fp32 bonus.
      state: `[N, N]` fp32 state before the chunk, layout [value, key].

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
    """Gradients of one chunk, recomputed from the state it started from.

    Args:
      r, logw, k, v, u, state: as for `chunk_forward` (state: the stored chunk start state).
      d_y: tuple of `[S, N]` cotangents of the outputs.
      d_next_state: `[N, N]` cotangent of the state after the chunk, [value, key].

    Returns:
      (d_r, d_logw, d_k, d_v) tuples of `[S, N]` tiles, d_u `[1, N]`, and the cotangent of the
      chunk's start state `[N, N]`.
    """
    _, pullback = jax.vjp(lambda *args: chunk_forward(ops, *args), r, logw, k, v, u, state)
    return pullback((tuple(d_y), d_next_state))
