"""RWKV-5/6 kernels for GPUs through Pallas' Triton lowering.

One program per (batch, head) walks its chunks in order with the fp32 `[N, N]` state in
registers (the `fori_loop` carry). Inputs stay in their `[B, T, H, N]` HBM layout and dtype
and are read as strided `[S, N]` sub-block tiles, so no transpose or upcast pass runs outside
the kernel. The forward stores each chunk's start state (`[B, H, T/L, N, N]` fp32, [value, key]);
the backward walks the chunks in reverse, recomputes each from its stored start state and
carries the state cotangent and the bonus gradient in registers.

Matmul precision on the device: the log-decay sums always, and for fp32 inputs every matmul, run
as TF32x3 (three tensor-core passes, ≈ fp32 accuracy); the data matmuls of bf16 inputs as TF32.
In interpret mode on CPU, where those algorithms do not exist, everything runs as fp32
(`HIGHEST`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.diag_chunk import DiagOps, chunk_backward, chunk_forward

_F32 = jnp.float32
# tl.dot needs every matmul dimension ≥ 16, and the sub-block is one of them.
SUB_BLOCK = 16


def _ops(dtype, interpret: bool) -> DiagOps:
    if interpret:
        return DiagOps(decay_sums=jax.lax.Precision.HIGHEST, data=jax.lax.Precision.HIGHEST)
    accurate = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    data = accurate if jnp.dtype(dtype) == jnp.float32 else jax.lax.DotAlgorithmPreset.TF32_TF32_F32
    return DiagOps(decay_sums=accurate, data=data)


def _compiler_params(head_size: int) -> plgpu.CompilerParams:
    # The [N, N] state, its cotangent and a sub-block's [S, S] / [S, N] tiles are live at once:
    # at N = 64 eight warps keep them in registers without spilling.
    return plgpu.CompilerParams(num_warps=4 if head_size <= 32 else 8, num_stages=1)


def _tiles(ref, batch, head, start, chunk_size: int):
    """The chunk's `[S, N]` fp32 sub-block tiles of a `[B, T, H, N]` ref, from token `start`."""
    return tuple(ref[batch, pl.ds(start + i, SUB_BLOCK), head, :].astype(_F32)
                 for i in range(0, chunk_size, SUB_BLOCK))


def _store_tiles(ref, batch, head, start, tiles):
    for i, tile in enumerate(tiles):
        ref[batch, pl.ds(start + i * SUB_BLOCK, SUB_BLOCK), head, :] = tile.astype(ref.dtype)


def _forward_kernel(r_ref, logw_ref, k_ref, v_ref, u_ref, state_ref,
                    y_ref, final_state_ref, chunk_states_ref,
                    *, chunk_size: int, num_chunks: int, ops: DiagOps):
    batch, head = pl.program_id(0), pl.program_id(1)
    u = u_ref[pl.ds(head, 1), :].astype(_F32)

    def one_chunk(chunk, state):
        start = pl.multiple_of(chunk * chunk_size, chunk_size)
        chunk_states_ref[batch, head, chunk] = state
        inputs = (_tiles(ref, batch, head, start, chunk_size) for ref in (r_ref, logw_ref, k_ref, v_ref))
        y, state = chunk_forward(ops, *inputs, u, state)
        _store_tiles(y_ref, batch, head, start, y)
        return state

    final_state_ref[batch, head] = jax.lax.fori_loop(0, num_chunks, one_chunk, state_ref[batch, head])


def _backward_kernel(r_ref, logw_ref, k_ref, v_ref, u_ref, chunk_states_ref, d_y_ref, d_final_ref,
                     d_r_ref, d_logw_ref, d_k_ref, d_v_ref, d_u_ref, d_state_ref,
                     *, chunk_size: int, num_chunks: int, ops: DiagOps):
    batch, head = pl.program_id(0), pl.program_id(1)
    u = u_ref[pl.ds(head, 1), :].astype(_F32)

    def one_chunk(step, carry):
        d_state, d_u = carry
        chunk = num_chunks - 1 - step
        start = pl.multiple_of(chunk * chunk_size, chunk_size)
        inputs = tuple(_tiles(ref, batch, head, start, chunk_size) for ref in (r_ref, logw_ref, k_ref, v_ref))
        d_y = _tiles(d_y_ref, batch, head, start, chunk_size)
        d_r, d_logw, d_k, d_v, d_u_chunk, d_state = chunk_backward(
            ops, *inputs, u, chunk_states_ref[batch, head, chunk], d_y, d_state)
        for ref, tiles in zip((d_r_ref, d_logw_ref, d_k_ref, d_v_ref), (d_r, d_logw, d_k, d_v)):
            _store_tiles(ref, batch, head, start, tiles)
        return d_state, d_u + d_u_chunk

    initial = (d_final_ref[batch, head], jnp.zeros(u.shape, _F32))
    d_state, d_u = jax.lax.fori_loop(0, num_chunks, one_chunk, initial)
    d_state_ref[batch, head] = d_state
    d_u_ref[batch, pl.ds(head, 1), :] = d_u


@functools.partial(jax.jit, static_argnames=("chunk_size", "interpret"))
def forward(r, logw, k, v, u, state, *, chunk_size: int, interpret: bool):
    """r, logw, k, v `[B, T, H, N]` (T a multiple of `chunk_size`), u `[H, N]`, state
    `[B, H, N, N]` fp32 [value, key] -> y `[B, T, H, N]` fp32, the final state and the chunk start
    states `[B, H, T/L, N, N]` (both fp32, [value, key])."""
    batch, seq_len, heads, head_size = r.shape
    num_chunks = seq_len // chunk_size
    kernel = functools.partial(_forward_kernel, chunk_size=chunk_size, num_chunks=num_chunks,
                               ops=_ops(r.dtype, interpret))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads),
        out_shape=(
            jax.ShapeDtypeStruct(r.shape, _F32),
            jax.ShapeDtypeStruct(state.shape, _F32),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, head_size, head_size), _F32),
        ),
        compiler_params=_compiler_params(head_size),
        interpret=interpret,
        name="wkv6_forward",
    )(r, logw, k, v, u, state)


@functools.partial(jax.jit, static_argnames=("chunk_size", "interpret"))
def backward(r, logw, k, v, u, chunk_states, d_y, d_final_state, *, chunk_size: int, interpret: bool):
    """Gradients `(d_r, d_logw, d_k, d_v)` in the inputs' dtypes, `d_u [B, H, N]` fp32 (per batch
    row) and the initial state's cotangent `[B, H, N, N]` fp32 [value, key]."""
    batch, seq_len, heads, head_size = r.shape
    kernel = functools.partial(_backward_kernel, chunk_size=chunk_size,
                               num_chunks=seq_len // chunk_size, ops=_ops(r.dtype, interpret))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads),
        out_shape=(
            *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (r, logw, k, v)),
            jax.ShapeDtypeStruct((batch, heads, head_size), _F32),
            jax.ShapeDtypeStruct(d_final_state.shape, _F32),
        ),
        compiler_params=_compiler_params(head_size),
        interpret=interpret,
        name="wkv6_backward",
    )(r, logw, k, v, u, chunk_states, d_y, d_final_state)
