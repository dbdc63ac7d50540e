"""RWKV-4 kernels for GPUs through Pallas' Triton lowering.

One program per (batch, block of A channels) walks its chunks in order with the state
`(aa, bb, pp)` in registers (the `fori_loop` carry) and reads the `[B, T, C]` inputs in their
HBM layout and dtype, one `[1, A]` row per token. The forward stores each chunk's start state
(`[B, T/L, 1, C]` fp32 each); the backward walks the chunks in reverse, recomputes each from its
stored start state and carries the state cotangent and the decay and bonus gradients in
registers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.vector_chunk import chunk_backward, chunk_forward

_F32 = jnp.float32


def channel_block(channels: int) -> int:
    """Channels per program: 32 (a warp's width), fewer for narrower inputs (a power of two)."""
    return min(32, 1 << (channels - 1).bit_length())


# The walk is latency-bound, one [1, 32] row per step: one warp per program, and more programs.
_COMPILER_PARAMS = plgpu.CompilerParams(num_warps=1, num_stages=1)


def _rows(ref, batch, start, channels, chunk_size: int):
    return tuple(ref[batch, pl.ds(start + t, 1), channels].astype(_F32) for t in range(chunk_size))


def _store_rows(ref, batch, start, channels, rows):
    for t, row in enumerate(rows):
        ref[batch, pl.ds(start + t, 1), channels] = row.astype(ref.dtype)


def _forward_kernel(k_ref, v_ref, log_decay_ref, u_ref, aa_ref, bb_ref, pp_ref,
                    y_ref, aa_out, bb_out, pp_out, aa_chunks, bb_chunks, pp_chunks,
                    *, chunk_size: int, seq_len: int, block: int):
    batch = pl.program_id(0)
    channels = pl.ds(pl.program_id(1) * block, block)
    log_decay, u = log_decay_ref[:, channels], u_ref[:, channels]

    def one_chunk(chunk, state):
        start = pl.multiple_of(chunk * chunk_size, chunk_size)
        for ref, value in zip((aa_chunks, bb_chunks, pp_chunks), state):
            ref[batch, chunk, :, channels] = value
        y, state = chunk_forward(_rows(k_ref, batch, start, channels, chunk_size),
                                 _rows(v_ref, batch, start, channels, chunk_size),
                                 log_decay, u, state, seq_len - start)
        _store_rows(y_ref, batch, start, channels, y)
        return state

    initial = tuple(ref[batch, :, channels] for ref in (aa_ref, bb_ref, pp_ref))
    final = jax.lax.fori_loop(0, -(-seq_len // chunk_size), one_chunk, initial)
    for ref, value in zip((aa_out, bb_out, pp_out), final):
        ref[batch, :, channels] = value


def _backward_kernel(k_ref, v_ref, log_decay_ref, u_ref, aa_chunks, bb_chunks, pp_chunks, d_y_ref,
                     d_aa_ref, d_bb_ref, d_pp_ref,
                     d_k_ref, d_v_ref, d_log_decay_ref, d_u_ref, d_aa_out, d_bb_out, d_pp_out,
                     *, chunk_size: int, seq_len: int, block: int):
    batch = pl.program_id(0)
    channels = pl.ds(pl.program_id(1) * block, block)
    log_decay, u = log_decay_ref[:, channels], u_ref[:, channels]
    num_chunks = -(-seq_len // chunk_size)

    def one_chunk(step, carry):
        d_state, d_log_decay, d_u = carry
        chunk = num_chunks - 1 - step
        start = pl.multiple_of(chunk * chunk_size, chunk_size)
        state = tuple(ref[batch, chunk, :, channels] for ref in (aa_chunks, bb_chunks, pp_chunks))
        d_k, d_v, d_log_decay_chunk, d_u_chunk, d_state = chunk_backward(
            _rows(k_ref, batch, start, channels, chunk_size),
            _rows(v_ref, batch, start, channels, chunk_size),
            log_decay, u, state, seq_len - start,
            _rows(d_y_ref, batch, start, channels, chunk_size), d_state)
        _store_rows(d_k_ref, batch, start, channels, d_k)
        _store_rows(d_v_ref, batch, start, channels, d_v)
        return d_state, d_log_decay + d_log_decay_chunk, d_u + d_u_chunk

    d_final = tuple(ref[batch, :, channels] for ref in (d_aa_ref, d_bb_ref, d_pp_ref))
    zeros = jnp.zeros(log_decay.shape, _F32)
    d_state, d_log_decay, d_u = jax.lax.fori_loop(0, num_chunks, one_chunk, (d_final, zeros, zeros))
    for ref, value in zip((d_aa_out, d_bb_out, d_pp_out, d_log_decay_ref, d_u_ref),
                          (*d_state, d_log_decay, d_u)):
        ref[batch, :, channels] = value


@functools.partial(jax.jit, static_argnames=("chunk_size", "seq_len", "interpret"))
def forward(k, v, log_decay, u, aa, bb, pp, *, chunk_size: int, seq_len: int, interpret: bool):
    """k, v `[B, T_pad, C]` (T_pad a multiple of `chunk_size`, `seq_len` of them real; C a
    multiple of `channel_block(C)`), log_decay, u `[1, C]`, aa, bb, pp `[B, 1, C]` fp32 ->
    y `[B, T_pad, C]` fp32, the final (aa, bb, pp) and the chunk start states
    `[B, T_pad/L, 1, C]` fp32 each."""
    batch, padded_len, channels = k.shape
    block = channel_block(channels)
    chunk_states = jax.ShapeDtypeStruct((batch, padded_len // chunk_size, 1, channels), _F32)
    return pl.pallas_call(
        functools.partial(_forward_kernel, chunk_size=chunk_size, seq_len=seq_len, block=block),
        grid=(batch, channels // block),
        out_shape=(jax.ShapeDtypeStruct(k.shape, _F32), *(jax.ShapeDtypeStruct(aa.shape, _F32),) * 3,
                   *(chunk_states,) * 3),
        compiler_params=_COMPILER_PARAMS,
        interpret=interpret,
        name="wkv4_forward",
    )(k, v, log_decay, u, aa, bb, pp)


@functools.partial(jax.jit, static_argnames=("chunk_size", "seq_len", "interpret"))
def backward(k, v, log_decay, u, aa_chunks, bb_chunks, pp_chunks, d_y, d_aa, d_bb, d_pp, *,
             chunk_size: int, seq_len: int, interpret: bool):
    """Gradients `d_k, d_v` (inputs' dtypes), `d_log_decay, d_u` `[B, 1, C]` (per batch row) and
    the initial state's cotangent `(d_aa, d_bb, d_pp)` `[B, 1, C]`, fp32."""
    batch, _, channels = k.shape
    block = channel_block(channels)
    row = jax.ShapeDtypeStruct(d_aa.shape, _F32)
    return pl.pallas_call(
        functools.partial(_backward_kernel, chunk_size=chunk_size, seq_len=seq_len, block=block),
        grid=(batch, channels // block),
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                   row, row, row, row, row),
        compiler_params=_COMPILER_PARAMS,
        interpret=interpret,
        name="wkv4_backward",
    )(k, v, log_decay, u, aa_chunks, bb_chunks, pp_chunks, d_y, d_aa, d_bb, d_pp)
