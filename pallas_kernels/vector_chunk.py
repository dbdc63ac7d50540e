"""Chunk math of the RWKV-4 Pallas kernels, shared by the GPU and the TPU variant.

A chunk is L tokens of one block of channels, walked token by token in log space with the max
trick: each token is `rwkv_jax.wkv.vector.log_space_step` (the parallel form's step: output, then update,
one exp of a non-positive number per merge), so every exponentiated value is ≤ 0 and keys far
beyond fp32's e^k overflow (k ≈ 88) stay finite. Rows are `[1, A]` fp32 values, loaded from refs
one token at a time (Triton cannot slice values). The backward pass is `jax.vjp` of
`chunk_forward` traced inside the kernel: the chunk is recomputed from its stored start state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Rows = tuple[jax.Array, ...]
State = tuple[jax.Array, jax.Array, jax.Array]


def chunk_forward(k: Rows, v: Rows, log_decay: jax.Array, u: jax.Array, state: State,
                  num_real) -> tuple[Rows, State]:
    """One chunk.

    Args:
      k, v: tuples of L `[1, A]` fp32 rows, in token order.
      log_decay, u: `[1, A]` fp32.
      state: `(aa, bb, pp)`, each `[1, A]` fp32, before the chunk.
      num_real: tokens of the chunk that are real (an int, possibly traced); the rest are
        padding and leave the state unchanged.

    Returns:
      y: tuple of L `[1, A]` fp32 rows (padding rows hold the step's value, to be dropped); the
      state `(aa, bb, pp)` after the chunk's real tokens.
    """
    # Imported here, not at the top: rwkv_jax's RWKV-4 module imports this kernel package.
    from rwkv_jax.wkv.vector import log_space_step

    aa, bb, pp = state
    carry = (pp, aa, bb)
    ys = []
    for t, (k_t, v_t) in enumerate(zip(k, v)):
        stepped, y = log_space_step(carry, (k_t, v_t), log_decay, u)
        # A vector predicate: Mosaic selects on vector masks, not on broadcast scalar booleans.
        real = jnp.full(k_t.shape, t, jnp.int32) < num_real
        carry = tuple(jnp.where(real, new, old) for new, old in zip(stepped, carry))
        ys.append(y)
    pp, aa, bb = carry
    return tuple(ys), (aa, bb, pp)


def chunk_backward(k: Rows, v: Rows, log_decay: jax.Array, u: jax.Array, state: State, num_real,
                   d_y: Rows, d_next_state: State):
    """Gradients of one chunk from its stored start state: `(d_k, d_v)` tuples of rows,
    `d_log_decay`, `d_u` `[1, A]`, and the cotangent `(d_aa, d_bb, d_pp)` of the start state."""
    _, pullback = jax.vjp(lambda *args: chunk_forward(*args, num_real), k, v, log_decay, u, state)
    return pullback((tuple(d_y), tuple(d_next_state)))
