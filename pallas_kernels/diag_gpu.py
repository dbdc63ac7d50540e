"""RWKV-5/6 kernels for GPUs through Pallas' Triton lowering.

Each direction is two kernels. Inputs stay in their `[B, T, H, N]` HBM layout and dtype and are
read as strided tiles, so no transpose or upcast pass runs outside the kernels.

* intra (grid `(B, H, T/L)`, every chunk independent): the pairs inside each chunk, i.e.
  `diag_chunk.chunk_forward` from a zero state over the chunk's `[S, N]` sub-blocks (S = 16),
  with their exact pairwise decays; in the backward, its gradients. Most of the arithmetic lives
  here, spread over all SMs.
* inter (grid `(B, H)`): one program per (batch, head) walks the chunks in order with the fp32
  `[N, N]` state in registers (the `fori_loop` carry), one `[L, N]` tile per chunk
  (`diag_chunk.inter_forward`), adding the state's part of y to the intra part in place, and
  stores each chunk's start state (`[B, H, T/L, N, N]` fp32, [value, key]). The backward walks
  the chunks in reverse from their stored start states, adds the state's gradients to the intra
  ones, and carries the state cotangent in registers.

Matmul precision: the log-decay sums always, and for fp32 inputs every matmul, run as TF32x3
(three tensor-core passes, ≈ fp32 accuracy); the data matmuls of bf16 inputs as one TF32 pass
(`platform.gpu_data_precision`). Interpret mode emulates TF32 by truncating the operands
(`platform.kernel_dot`), so the CPU tests see the device's rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.diag_chunk import (DiagOps, chunk_backward, chunk_forward, inter_backward,
                                       inter_forward)
from pallas_kernels.platform import TF32_X3, gpu_data_precision

_F32 = jnp.float32
# tl.dot needs every matmul dimension ≥ 16, and the sub-block is one of them.
SUB_BLOCK = 16


def _ops(inputs, interpret: bool) -> DiagOps:
    return DiagOps(decay_sums=TF32_X3, data=gpu_data_precision(*inputs), interpret=interpret)


def _compiler_params(chunk_size: int, head_size: int) -> plgpu.CompilerParams:
    # Live at once: the [N, N] state (and its cotangent, or a sub-block start state) and a few
    # [L, N] / [L, L] tiles; eight warps once those reach 64 × 64.
    return plgpu.CompilerParams(num_warps=8 if max(chunk_size, head_size) >= 64 else 4, num_stages=1)


def _tile(ref, batch, head, start, size: int):
    return ref[batch, pl.ds(start, size), head, :].astype(_F32)


def _store(ref, batch, head, start, tile):
    ref[batch, pl.ds(start, tile.shape[0]), head, :] = tile.astype(ref.dtype)


def _sub_blocks(ref, batch, head, start, chunk_size: int):
    """The chunk's `[S, N]` fp32 sub-block tiles of a `[B, T, H, N]` ref, from token `start`."""
    return tuple(_tile(ref, batch, head, start + i, SUB_BLOCK) for i in range(0, chunk_size, SUB_BLOCK))


def _store_sub_blocks(ref, batch, head, start, tiles):
    for i, tile in enumerate(tiles):
        _store(ref, batch, head, start + i * SUB_BLOCK, tile)


def _intra_forward_kernel(r_ref, logw_ref, k_ref, v_ref, u_ref, y_ref, *, chunk_size: int,
                          ops: DiagOps):
    batch, head, chunk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start = pl.multiple_of(chunk * chunk_size, chunk_size)
    inputs = (_sub_blocks(ref, batch, head, start, chunk_size) for ref in (r_ref, logw_ref, k_ref, v_ref))
    u = u_ref[pl.ds(head, 1), :].astype(_F32)
    y, _ = chunk_forward(ops, *inputs, u, jnp.zeros((u.shape[1], u.shape[1]), _F32))
    _store_sub_blocks(y_ref, batch, head, start, y)


def _inter_forward_kernel(r_ref, logw_ref, k_ref, v_ref, state_ref, y_intra_ref,
                          y_ref, final_state_ref, chunk_states_ref,
                          *, chunk_size: int, num_chunks: int, ops: DiagOps):
    del y_intra_ref  # aliased to y_ref: y_ref holds the intra part on entry
    batch, head = pl.program_id(0), pl.program_id(1)

    def one_chunk(chunk, state):
        start = pl.multiple_of(chunk * chunk_size, chunk_size)
        chunk_states_ref[batch, head, chunk] = state
        inputs = (_tile(ref, batch, head, start, chunk_size) for ref in (r_ref, logw_ref, k_ref, v_ref))
        y_inter, state = inter_forward(ops, *inputs, state)
        _store(y_ref, batch, head, start, y_inter + _tile(y_ref, batch, head, start, chunk_size))
        return state

    final_state_ref[batch, head] = jax.lax.fori_loop(0, num_chunks, one_chunk, state_ref[batch, head])


def _intra_backward_kernel(r_ref, logw_ref, k_ref, v_ref, u_ref, d_y_ref,
                           d_r_ref, d_logw_ref, d_k_ref, d_v_ref, d_u_ref, *, chunk_size: int,
                           ops: DiagOps):
    batch, head, chunk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start = pl.multiple_of(chunk * chunk_size, chunk_size)
    inputs = (_sub_blocks(ref, batch, head, start, chunk_size) for ref in (r_ref, logw_ref, k_ref, v_ref))
    u = u_ref[pl.ds(head, 1), :].astype(_F32)
    zeros = jnp.zeros((u.shape[1], u.shape[1]), _F32)
    *d_inputs, d_u, _ = chunk_backward(ops, *inputs, u, zeros,
                                       _sub_blocks(d_y_ref, batch, head, start, chunk_size), zeros)
    for ref, tiles in zip((d_r_ref, d_logw_ref, d_k_ref, d_v_ref), d_inputs):
        _store_sub_blocks(ref, batch, head, start, tiles)
    d_u_ref[batch, head, pl.ds(chunk, 1), :] = d_u


def _inter_backward_kernel(r_ref, logw_ref, k_ref, v_ref, chunk_states_ref, d_y_ref, d_final_ref,
                           d_r_intra, d_logw_intra, d_k_intra, d_v_intra,
                           d_r_ref, d_logw_ref, d_k_ref, d_v_ref, d_state_ref,
                           *, chunk_size: int, num_chunks: int, ops: DiagOps):
    batch, head = pl.program_id(0), pl.program_id(1)

    def one_chunk(step, d_state):
        chunk = num_chunks - 1 - step
        start = pl.multiple_of(chunk * chunk_size, chunk_size)
        inputs = (_tile(ref, batch, head, start, chunk_size) for ref in (r_ref, logw_ref, k_ref, v_ref))
        *d_inputs, d_state = inter_backward(
            ops, *inputs, chunk_states_ref[batch, head, chunk],
            _tile(d_y_ref, batch, head, start, chunk_size), d_state)
        for out, intra, d_inter in zip((d_r_ref, d_logw_ref, d_k_ref, d_v_ref),
                                       (d_r_intra, d_logw_intra, d_k_intra, d_v_intra), d_inputs):
            _store(out, batch, head, start, d_inter + _tile(intra, batch, head, start, chunk_size))
        return d_state

    d_state_ref[batch, head] = jax.lax.fori_loop(0, num_chunks, one_chunk, d_final_ref[batch, head])


@functools.partial(jax.jit, static_argnames=("chunk_size", "interpret"))
def forward(r, logw, k, v, u, state, *, chunk_size: int, interpret: bool):
    """r, logw, k, v `[B, T, H, N]` (T a multiple of `chunk_size`, a power of two ≥ 16), u
    `[H, N]`, state `[B, H, N, N]` fp32 [value, key] -> y `[B, T, H, N]` fp32, the final state
    and the chunk start states `[B, H, T/L, N, N]` (both fp32, [value, key])."""
    batch, seq_len, heads, head_size = r.shape
    num_chunks = seq_len // chunk_size
    ops = _ops((r, logw, k, v), interpret)
    params = _compiler_params(chunk_size, head_size)
    y_intra = pl.pallas_call(
        functools.partial(_intra_forward_kernel, chunk_size=chunk_size, ops=ops),
        grid=(batch, heads, num_chunks),
        out_shape=jax.ShapeDtypeStruct(r.shape, _F32),
        compiler_params=params,
        interpret=interpret,
        name="wkv6_intra_forward",
    )(r, logw, k, v, u)
    return pl.pallas_call(
        functools.partial(_inter_forward_kernel, chunk_size=chunk_size, num_chunks=num_chunks, ops=ops),
        grid=(batch, heads),
        out_shape=(
            jax.ShapeDtypeStruct(r.shape, _F32),
            jax.ShapeDtypeStruct(state.shape, _F32),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, head_size, head_size), _F32),
        ),
        input_output_aliases={5: 0},  # y_intra -> y, completed in place
        compiler_params=params,
        interpret=interpret,
        name="wkv6_inter_forward",
    )(r, logw, k, v, state, y_intra)


@functools.partial(jax.jit, static_argnames=("chunk_size", "interpret"))
def backward(r, logw, k, v, u, chunk_states, d_y, d_final_state, *, chunk_size: int, interpret: bool):
    """Gradients `(d_r, d_logw, d_k, d_v)` in the inputs' dtypes, `d_u [B, H, T/L, N]` fp32 (per
    batch row and chunk, to be summed) and the initial state's cotangent `[B, H, N, N]` fp32
    [value, key]."""
    batch, seq_len, heads, head_size = r.shape
    num_chunks = seq_len // chunk_size
    ops = _ops((r, logw, k, v), interpret)
    params = _compiler_params(chunk_size, head_size)
    *d_intra, d_u = pl.pallas_call(
        functools.partial(_intra_backward_kernel, chunk_size=chunk_size, ops=ops),
        grid=(batch, heads, num_chunks),
        out_shape=(
            *(jax.ShapeDtypeStruct(r.shape, _F32) for _ in range(4)),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, head_size), _F32),
        ),
        compiler_params=params,
        interpret=interpret,
        name="wkv6_intra_backward",
    )(r, logw, k, v, u, d_y)
    *d_inputs, d_state = pl.pallas_call(
        functools.partial(_inter_backward_kernel, chunk_size=chunk_size, num_chunks=num_chunks, ops=ops),
        grid=(batch, heads),
        out_shape=(
            *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (r, logw, k, v)),
            jax.ShapeDtypeStruct(d_final_state.shape, _F32),
        ),
        compiler_params=params,
        interpret=interpret,
        name="wkv6_inter_backward",
    )(r, logw, k, v, chunk_states, d_y, d_final_state, *d_intra)
    return (*d_inputs, d_u, d_state)
