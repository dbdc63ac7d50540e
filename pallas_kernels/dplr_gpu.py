"""RWKV-7 kernels for GPUs through Pallas' Triton lowering.

One program per (batch, head) walks its chunks in order with the ``[N, N]`` fp32 state in
registers (``fori_loop`` carry); inputs stay in their ``[B, T, H, N]`` HBM layout and are read
chunk by chunk as strided ``[L, N]`` tiles, so no transpose or upcast pass is spent outside the
kernel. The forward stores each chunk's start state (fp32, ``[B, H, T/L, N, N]``); the backward
walks the chunks in reverse, recomputes each chunk from its stored start state and carries the
state cotangent in registers.

Matmul precision: on the device every dot runs as TF32x3 (three tensor-core passes, ≈ fp32
accuracy); in interpret mode on CPU, where that algorithm does not exist, as fp32 (``HIGHEST``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.dplr_chunk import ChunkOps, chunk_backward, chunk_forward

_F32 = jnp.float32


def _ops(interpret: bool) -> ChunkOps:
    precision = (
        jax.lax.Precision.HIGHEST if interpret else jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    )
    return ChunkOps(precision=precision, native_cumsum=True)


def _compiler_params(chunk_size: int) -> plgpu.CompilerParams:
    # Larger chunks hold more [L, L] and [L, N] tiles live at once; more warps spread them.
    return plgpu.CompilerParams(num_warps=4 if chunk_size <= 32 else 8, num_stages=1)


def _forward_kernel(
    r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref, state_ref,
    y_ref, final_state_ref, chunk_states_ref,
    *, chunk_size: int, num_chunks: int, block: int, ops: ChunkOps,
):
    batch, head = pl.program_id(0), pl.program_id(1)

    def one_chunk(chunk, state):
        rows = pl.ds(pl.multiple_of(chunk * chunk_size, chunk_size), chunk_size)
        inputs = (ref[batch, rows, head, :].astype(_F32)
                  for ref in (r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref))
        chunk_states_ref[batch, head, chunk] = state
        y, state = chunk_forward(ops, block, *inputs, state)
        y_ref[batch, rows, head, :] = y
        return state

    initial = state_ref[batch, head].astype(_F32)
    final_state_ref[batch, head] = jax.lax.fori_loop(0, num_chunks, one_chunk, initial)


def _backward_kernel(
    r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref, chunk_states_ref, d_y_ref, d_final_ref,
    d_r_ref, d_logw_ref, d_k_ref, d_v_ref, d_a_ref, d_b_ref, d_state_ref,
    *, chunk_size: int, num_chunks: int, block: int, ops: ChunkOps,
):
    batch, head = pl.program_id(0), pl.program_id(1)
    input_refs = (r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref)
    grad_refs = (d_r_ref, d_logw_ref, d_k_ref, d_v_ref, d_a_ref, d_b_ref)

    def one_chunk(step, d_state):
        chunk = num_chunks - 1 - step
        rows = pl.ds(pl.multiple_of(chunk * chunk_size, chunk_size), chunk_size)
        inputs = [ref[batch, rows, head, :].astype(_F32) for ref in input_refs]
        d_y = d_y_ref[batch, rows, head, :].astype(_F32)
        start_state = chunk_states_ref[batch, head, chunk]
        *d_inputs, d_state = chunk_backward(ops, block, *inputs, start_state, d_y, d_state)
        for ref, grad in zip(grad_refs, d_inputs):
            ref[batch, rows, head, :] = grad.astype(ref.dtype)
        return d_state

    d_final = d_final_ref[batch, head].astype(_F32)
    d_state_ref[batch, head] = jax.lax.fori_loop(0, num_chunks, one_chunk, d_final)


@functools.partial(jax.jit, static_argnames=("chunk_size", "block", "interpret"))
def forward(r, logw, k, v, a, b, state, *, chunk_size: int, block: int, interpret: bool):
    """Inputs ``[B, T, H, N]`` with T a multiple of chunk_size, state ``[B, H, N, N]``.

    Returns ``(y [B, T, H, N], final_state [B, H, N, N], chunk_states [B, H, T/L, N, N])``, fp32.
    """
    batch, seq_len, heads, dim = r.shape
    num_chunks = seq_len // chunk_size
    kernel = functools.partial(
        _forward_kernel, chunk_size=chunk_size, num_chunks=num_chunks, block=block,
        ops=_ops(interpret),
    )
    return pl.pallas_call(
        kernel,
        grid=(batch, heads),
        out_shape=(
            jax.ShapeDtypeStruct((batch, seq_len, heads, dim), _F32),
            jax.ShapeDtypeStruct((batch, heads, dim, dim), _F32),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, dim, dim), _F32),
        ),
        compiler_params=_compiler_params(chunk_size),
        interpret=interpret,
        name="wkv7_forward",
    )(r, logw, k, v, a, b, state)


@functools.partial(jax.jit, static_argnames=("chunk_size", "block", "interpret"))
def backward(r, logw, k, v, a, b, chunk_states, d_y, d_final_state, *,
             chunk_size: int, block: int, interpret: bool):
    """Gradients ``(d_r, d_logw, d_k, d_v, d_a, d_b)`` in the inputs' dtypes and fp32 ``d_state``."""
    batch, seq_len, heads, dim = r.shape
    num_chunks = seq_len // chunk_size
    kernel = functools.partial(
        _backward_kernel, chunk_size=chunk_size, num_chunks=num_chunks, block=block,
        ops=_ops(interpret),
    )
    return pl.pallas_call(
        kernel,
        grid=(batch, heads),
        out_shape=tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (r, logw, k, v, a, b))
        + (jax.ShapeDtypeStruct((batch, heads, dim, dim), _F32),),
        compiler_params=_compiler_params(chunk_size),
        interpret=interpret,
        name="wkv7_backward",
    )(r, logw, k, v, a, b, chunk_states, d_y, d_final_state)
