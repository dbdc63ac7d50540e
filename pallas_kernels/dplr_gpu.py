"""RWKV-7 kernels for GPUs through Pallas' Triton lowering.

Four kernels (see ``dplr_chunk`` for the math), all reading the ``[B, T, H, N]`` HBM layout
directly as strided ``[L, N]`` tiles, so no transpose or upcast pass is spent outside them:

* summary   grid (B, H, T/L), parallel: the heavy in-chunk work (pairwise matrices, blocked
  substitution) -> Za, Zv, Q, Y_intra, fp32 ``[B, T, H, N]`` each, and (I-B̃)⁻¹
  ``[B, H, T/L, L, L]`` for the backward.
* states    grid (B, H, N/32), a loop over chunks with 32 rows of the fp32 ``[N, N]`` state in
  registers: y, the final state and every chunk's start state (``[B, H, T/L, N, N]``, kept for
  the backward).
* cotangents grid (B, H, N/32), the same loop in reverse for the state cotangent: every chunk's
  end cotangent and the initial state's.
* gradients grid (B, H, T/L), parallel: each chunk's input gradients, recomputed from its stored
  start state, end cotangent and (I-B̃)⁻¹.

The sequential kernels only do a few ``[L, N] x [N, N]`` products per chunk; the parallel ones
give the GPU B·H·T/L independent programs.

Matmul precision (``platform.gpu_data_precision``): TF32x3 (three tensor-core passes, ≈ fp32) when
every input is fp32, one TF32 pass for bf16 inputs; the cumulative sums always TF32x3. In
interpret mode TF32 is emulated by truncating the operands (``platform.kernel_dot``), so the CPU
tests see the device's rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.dplr_chunk import (
    ChunkOps,
    ChunkSummary,
    chunk_backward,
    chunk_cotangent_step,
    chunk_state_step,
    chunk_summary,
)
from pallas_kernels.platform import TF32_X3, gpu_data_precision

_F32 = jnp.float32
# Rows of the state (value index) evolve independently, so the sequential kernels split them
# over programs: more programs in flight (B·H·N/32) for the latency-bound chunk loop.
VALUE_BLOCK = 32


def _ops(inputs, interpret: bool) -> ChunkOps:
    return ChunkOps(precision=gpu_data_precision(*inputs), native_cumsum=True, sums=TF32_X3,
                    interpret=interpret)


def _compiler_params(*, heavy: bool) -> plgpu.CompilerParams:
    # The parallel kernels hold many [L, L] and [L, N] tiles live at once; 8 warps spread them
    # (at 16-token chunks too: ptxas spills 1.3 KB per thread instead of 2.3 KB at 4 warps for
    # fp32 inputs, 80 B instead of 600 B for bf16).
    return plgpu.CompilerParams(num_warps=8 if heavy else 4, num_stages=1)


def _rows(chunk, chunk_size: int):
    return pl.ds(pl.multiple_of(chunk * chunk_size, chunk_size), chunk_size)


def _summary_kernel(r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref, *out_refs,
                    chunk_size: int, block: int, ops: ChunkOps):
    *summary_refs, solve_ref = out_refs
    batch, head, chunk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = _rows(chunk, chunk_size)
    inputs = (ref[batch, rows, head, :].astype(_F32)
              for ref in (r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref))
    summary, solve = chunk_summary(ops, block, *inputs)
    for ref, value in zip(summary_refs, summary):
        ref[batch, rows, head, :] = value
    solve_ref[batch, head, chunk] = solve


def _states_kernel(logw_ref, k_ref, v_ref, b_ref, *refs, chunk_size: int, num_chunks: int,
                   value_block: int, ops: ChunkOps):
    a_solved_ref, v_solved_ref, r_read_ref, y_intra_ref, state_ref, *out_refs = refs
    y_ref, final_state_ref, chunk_states_ref = out_refs
    batch, head = pl.program_id(0), pl.program_id(1)
    values = _rows(pl.program_id(2), value_block)  # this program's rows of the state

    def one_chunk(chunk, state):
        rows = _rows(chunk, chunk_size)
        logw, k, b, a_solved, r_read = (
            ref[batch, rows, head, :].astype(_F32)
            for ref in (logw_ref, k_ref, b_ref, a_solved_ref, r_read_ref)
        )
        v, v_solved, y_intra = (ref[batch, rows, head, values].astype(_F32)
                                for ref in (v_ref, v_solved_ref, y_intra_ref))
        summary = ChunkSummary(a_solved, v_solved, r_read, y_intra)
        chunk_states_ref[batch, head, chunk, values, :] = state
        y, state = chunk_state_step(ops, logw, k, v, b, summary, state)
        y_ref[batch, rows, head, values] = y
        return state

    initial = state_ref[batch, head, values, :].astype(_F32)
    final_state_ref[batch, head, values, :] = jax.lax.fori_loop(0, num_chunks, one_chunk, initial)


def _cotangents_kernel(logw_ref, b_ref, a_solved_ref, r_read_ref, d_y_ref, d_final_ref,
                       d_state_ref, d_chunk_ends_ref, *, chunk_size: int, num_chunks: int,
                       value_block: int, ops: ChunkOps):
    batch, head = pl.program_id(0), pl.program_id(1)
    values = _rows(pl.program_id(2), value_block)

    def one_chunk(step, d_state):
        chunk = num_chunks - 1 - step
        rows = _rows(chunk, chunk_size)
        logw, b, a_solved, r_read = (
            ref[batch, rows, head, :].astype(_F32)
            for ref in (logw_ref, b_ref, a_solved_ref, r_read_ref)
        )
        d_y = d_y_ref[batch, rows, head, values].astype(_F32)
        d_chunk_ends_ref[batch, head, chunk, values, :] = d_state
        return chunk_cotangent_step(ops, logw, b, a_solved, r_read, d_y, d_state)

    d_final = d_final_ref[batch, head, values, :].astype(_F32)
    d_state_ref[batch, head, values, :] = jax.lax.fori_loop(0, num_chunks, one_chunk, d_final)


def _gradients_kernel(r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref, solves_ref, chunk_states_ref,
                      d_chunk_ends_ref, d_y_ref, *grad_refs, chunk_size: int, ops: ChunkOps):
    batch, head, chunk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = _rows(chunk, chunk_size)
    inputs = [ref[batch, rows, head, :].astype(_F32)
              for ref in (r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref)]
    grads = chunk_backward(
        ops, *inputs, solves_ref[batch, head, chunk], chunk_states_ref[batch, head, chunk],
        d_y_ref[batch, rows, head, :].astype(_F32), d_chunk_ends_ref[batch, head, chunk],
    )
    for ref, grad in zip(grad_refs, grads):
        ref[batch, rows, head, :] = grad.astype(ref.dtype)


@functools.partial(jax.jit, static_argnames=("chunk_size", "block", "interpret"))
def forward(r, logw, k, v, a, b, state, *, chunk_size: int, block: int, interpret: bool):
    """Inputs ``[B, T, H, N]`` with T a multiple of chunk_size, state ``[B, H, N, N]``.

    Returns ``(y [B, T, H, N], final_state [B, H, N, N], residuals)``, fp32; residuals are what
    ``backward`` needs besides the inputs.
    """
    batch, seq_len, heads, dim = r.shape
    num_chunks = seq_len // chunk_size
    ops = _ops((r, logw, k, v, a, b), interpret)
    token_f32 = jax.ShapeDtypeStruct((batch, seq_len, heads, dim), _F32)
    *summary, solves = pl.pallas_call(
        functools.partial(_summary_kernel, chunk_size=chunk_size, block=block, ops=ops),
        grid=(batch, heads, num_chunks),
        out_shape=(token_f32,) * 4
        + (jax.ShapeDtypeStruct((batch, heads, num_chunks, chunk_size, chunk_size), _F32),),
        compiler_params=_compiler_params(heavy=True),
        interpret=interpret,
        name="wkv7_chunk_summary",
    )(r, logw, k, v, a, b)
    value_block = min(VALUE_BLOCK, dim)
    y, final_state, chunk_states = pl.pallas_call(
        functools.partial(_states_kernel, chunk_size=chunk_size, num_chunks=num_chunks,
                          value_block=value_block, ops=ops),
        grid=(batch, heads, dim // value_block),
        out_shape=(
            token_f32,
            jax.ShapeDtypeStruct((batch, heads, dim, dim), _F32),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, dim, dim), _F32),
        ),
        compiler_params=_compiler_params(heavy=False),
        interpret=interpret,
        name="wkv7_states",
    )(logw, k, v, b, *summary, state)
    a_solved, _, r_read, _ = summary
    return y, final_state, (chunk_states, solves, a_solved, r_read)


@functools.partial(jax.jit, static_argnames=("chunk_size", "block", "interpret"))
def backward(r, logw, k, v, a, b, residuals, d_y, d_final_state, *,
             chunk_size: int, block: int, interpret: bool):
    """Gradients ``(d_r, d_logw, d_k, d_v, d_a, d_b)`` in the inputs' dtypes and fp32 ``d_state``."""
    batch, seq_len, heads, dim = r.shape
    num_chunks = seq_len // chunk_size
    ops = _ops((r, logw, k, v, a, b), interpret)
    chunk_states, solves, a_solved, r_read = residuals
    value_block = min(VALUE_BLOCK, dim)
    d_state, d_chunk_ends = pl.pallas_call(
        functools.partial(_cotangents_kernel, chunk_size=chunk_size, num_chunks=num_chunks,
                          value_block=value_block, ops=ops),
        grid=(batch, heads, dim // value_block),
        out_shape=(
            jax.ShapeDtypeStruct((batch, heads, dim, dim), _F32),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, dim, dim), _F32),
        ),
        compiler_params=_compiler_params(heavy=False),
        interpret=interpret,
        name="wkv7_state_cotangents",
    )(logw, b, a_solved, r_read, d_y, d_final_state)
    grads = pl.pallas_call(
        functools.partial(_gradients_kernel, chunk_size=chunk_size, ops=ops),
        grid=(batch, heads, num_chunks),
        out_shape=tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (r, logw, k, v, a, b)),
        compiler_params=_compiler_params(heavy=True),
        interpret=interpret,
        name="wkv7_gradients",
    )(r, logw, k, v, a, b, solves, chunk_states, d_chunk_ends, d_y)
    return (*grads, d_state)
