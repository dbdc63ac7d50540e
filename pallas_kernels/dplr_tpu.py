"""RWKV-7 kernels for TPUs through Pallas' Mosaic lowering.

The same four kernels as the GPU variant (see ``dplr_gpu`` and ``dplr_chunk``), each on a grid
``(batch, head, chunk)``: the summary and gradient kernels are parallel over all three axes; the
state and cotangent kernels make the chunk axis sequential ("arbitrary") and keep the fp32
``[N, N]`` state (or its cotangent) in a VMEM scratch buffer across chunk steps, the cotangent
kernel visiting chunks in reverse through its index maps. Pallas' pipelining streams the
``[L, N]`` tiles. Mosaic tiles the last two block dimensions, so the kernels take
``[B, H, T, N]`` fp32 inputs (the wrapper transposes and upcasts in one pass) and L must be a
multiple of 8. All dots request ``Precision.HIGHEST`` (fp32 on the MXU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.dplr_chunk import (
    ChunkOps,
    ChunkSummary,
    chunk_backward,
    chunk_cotangent_step,
    chunk_state_step,
    chunk_summary,
)

_F32 = jnp.float32
_OPS = ChunkOps(precision=jax.lax.Precision.HIGHEST, native_cumsum=False)
_PARALLEL = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
_SEQUENTIAL = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _interpret_mode(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def _specs(chunk_size: int, dim: int, num_chunks: int, *, reverse: bool = False):
    """BlockSpecs: ``[B, H, T, N]`` tiles, ``[B, H, N, N]``, ``[B, H, T/L, N, N]``, ``[B, H, T/L, L, L]``."""

    def chunk_index(c):
        return num_chunks - 1 - c if reverse else c

    tokens = pl.BlockSpec((None, None, chunk_size, dim), lambda b, h, c: (b, h, chunk_index(c), 0))
    state = pl.BlockSpec((None, None, dim, dim), lambda b, h, c: (b, h, 0, 0))
    per_chunk_state = pl.BlockSpec(
        (None, None, None, dim, dim), lambda b, h, c: (b, h, chunk_index(c), 0, 0)
    )
    per_chunk_solve = pl.BlockSpec(
        (None, None, None, chunk_size, chunk_size), lambda b, h, c: (b, h, chunk_index(c), 0, 0)
    )
    return tokens, state, per_chunk_state, per_chunk_solve


def _summary_kernel(r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref, *out_refs, block: int):
    *summary_refs, solve_ref = out_refs
    inputs = (ref[...] for ref in (r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref))
    summary, solve = chunk_summary(_OPS, block, *inputs)
    for ref, value in zip(summary_refs, summary):
        ref[...] = value
    solve_ref[...] = solve


def _states_kernel(logw_ref, k_ref, v_ref, b_ref, *refs, num_chunks: int):
    *summary_refs, state_ref, y_ref, final_state_ref, chunk_state_ref, state_scratch = refs
    chunk = pl.program_id(2)

    @pl.when(chunk == 0)
    def _load_initial_state():
        state_scratch[...] = state_ref[...]

    start_state = state_scratch[...]
    chunk_state_ref[...] = start_state
    summary = ChunkSummary(*(ref[...] for ref in summary_refs))
    y, end_state = chunk_state_step(
        _OPS, logw_ref[...], k_ref[...], v_ref[...], b_ref[...], summary, start_state
    )
    y_ref[...] = y
    state_scratch[...] = end_state

    @pl.when(chunk == num_chunks - 1)
    def _store_final_state():
        final_state_ref[...] = end_state


def _cotangents_kernel(logw_ref, b_ref, a_solved_ref, r_read_ref, d_y_ref, d_final_ref,
                       d_state_ref, d_chunk_end_ref, d_state_scratch, *, num_chunks: int):
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _load_final_cotangent():
        d_state_scratch[...] = d_final_ref[...]

    d_end = d_state_scratch[...]
    d_chunk_end_ref[...] = d_end
    d_start = chunk_cotangent_step(
        _OPS, logw_ref[...], b_ref[...], a_solved_ref[...], r_read_ref[...], d_y_ref[...], d_end
    )
    d_state_scratch[...] = d_start

    @pl.when(step == num_chunks - 1)
    def _store_initial_cotangent():
        d_state_ref[...] = d_start


def _gradients_kernel(r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref, solve_ref, chunk_state_ref,
                      d_chunk_end_ref, d_y_ref, *grad_refs):
    inputs = [ref[...] for ref in (r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref)]
    grads = chunk_backward(
        _OPS, *inputs, solve_ref[...], chunk_state_ref[...], d_y_ref[...], d_chunk_end_ref[...]
    )
    for ref, grad in zip(grad_refs, grads):
        ref[...] = grad


@functools.partial(jax.jit, static_argnames=("chunk_size", "block", "interpret"))
def forward(r, logw, k, v, a, b, state, *, chunk_size: int, block: int, interpret: bool):
    """Inputs ``[B, H, T, N]`` fp32 with T a multiple of chunk_size, state ``[B, H, N, N]`` fp32.

    Returns ``(y [B, H, T, N], final_state [B, H, N, N], residuals)``, fp32.
    """
    batch, heads, seq_len, dim = r.shape
    num_chunks = seq_len // chunk_size
    grid = (batch, heads, num_chunks)
    tokens, state_spec, per_chunk_state, per_chunk_solve = _specs(chunk_size, dim, num_chunks)
    token_f32 = jax.ShapeDtypeStruct(r.shape, _F32)
    *summary, solves = pl.pallas_call(
        functools.partial(_summary_kernel, block=block),
        grid=grid,
        in_specs=[tokens] * 6,
        out_specs=(tokens,) * 4 + (per_chunk_solve,),
        out_shape=(token_f32,) * 4
        + (jax.ShapeDtypeStruct((batch, heads, num_chunks, chunk_size, chunk_size), _F32),),
        compiler_params=_PARALLEL,
        interpret=_interpret_mode(interpret),
        name="wkv7_chunk_summary",
    )(r, logw, k, v, a, b)
    y, final_state, chunk_states = pl.pallas_call(
        functools.partial(_states_kernel, num_chunks=num_chunks),
        grid=grid,
        in_specs=[tokens] * 8 + [state_spec],
        out_specs=(tokens, state_spec, per_chunk_state),
        out_shape=(
            token_f32,
            jax.ShapeDtypeStruct((batch, heads, dim, dim), _F32),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, dim, dim), _F32),
        ),
        scratch_shapes=[pltpu.VMEM((dim, dim), _F32)],
        compiler_params=_SEQUENTIAL,
        interpret=_interpret_mode(interpret),
        name="wkv7_states",
    )(logw, k, v, b, *summary, state)
    a_solved, _, r_read, _ = summary
    return y, final_state, (chunk_states, solves, a_solved, r_read)


@functools.partial(jax.jit, static_argnames=("chunk_size", "block", "interpret"))
def backward(r, logw, k, v, a, b, residuals, d_y, d_final_state, *,
             chunk_size: int, block: int, interpret: bool):
    """fp32 ``[B, H, T, N]`` gradients of r, logw, k, v, a, b and the ``[B, H, N, N]`` d_state."""
    batch, heads, seq_len, dim = r.shape
    num_chunks = seq_len // chunk_size
    grid = (batch, heads, num_chunks)
    chunk_states, solves, a_solved, r_read = residuals
    tokens_rev, state_spec, per_chunk_rev, _ = _specs(chunk_size, dim, num_chunks, reverse=True)
    d_state, d_chunk_ends = pl.pallas_call(
        functools.partial(_cotangents_kernel, num_chunks=num_chunks),
        grid=grid,
        in_specs=[tokens_rev] * 5 + [state_spec],
        out_specs=(state_spec, per_chunk_rev),
        out_shape=(
            jax.ShapeDtypeStruct((batch, heads, dim, dim), _F32),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, dim, dim), _F32),
        ),
        scratch_shapes=[pltpu.VMEM((dim, dim), _F32)],
        compiler_params=_SEQUENTIAL,
        interpret=_interpret_mode(interpret),
        name="wkv7_state_cotangents",
    )(logw, b, a_solved, r_read, d_y, d_final_state)
    tokens, _, per_chunk_state, per_chunk_solve = _specs(chunk_size, dim, num_chunks)
    grads = pl.pallas_call(
        _gradients_kernel,
        grid=grid,
        in_specs=[tokens] * 6 + [per_chunk_solve, per_chunk_state, per_chunk_state, tokens],
        out_specs=(tokens,) * 6,
        out_shape=(jax.ShapeDtypeStruct(r.shape, _F32),) * 6,
        compiler_params=_PARALLEL,
        interpret=_interpret_mode(interpret),
        name="wkv7_gradients",
    )(r, logw, k, v, a, b, solves, chunk_states, d_chunk_ends, d_y)
    return (*grads, d_state)
