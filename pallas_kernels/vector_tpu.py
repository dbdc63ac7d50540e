"""RWKV-4 kernels for TPUs through Pallas' Mosaic lowering.

Grid `(batch, channel block, chunk)` with the chunk axis sequential ("arbitrary"): the state
`(aa, bb, pp)` lives in three `[1, A]` VMEM scratch rows across the chunk steps while Pallas'
pipelining streams the `[L, A]` input tiles in; the tokens of a tile are walked one row at a
time. Mosaic tiles the last two block dimensions, so inputs are fp32 (the wrapper upcasts), L is
a multiple of 8 and A a multiple of 128 or all channels. The forward stores each chunk's start
state; the backward visits the chunks in reverse through its index maps, recomputes each from
its stored start state, keeps the state cotangent in scratch and accumulates the decay and bonus
gradients in their resident output blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.vector_chunk import chunk_backward, chunk_forward

_F32 = jnp.float32
_COMPILER_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def channel_block(channels: int) -> int:
    """Channels per block: up to 512 lanes when C is a multiple of 128, else all C."""
    if channels % 128:
        return channels
    return next(size for size in (512, 256, 128) if channels % size == 0)


def _interpret_mode(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def _rows(ref):
    return tuple(ref[pl.ds(t, 1), :] for t in range(ref.shape[0]))


def _store_rows(ref, rows):
    for t, row in enumerate(rows):
        ref[pl.ds(t, 1), :] = row


def _forward_kernel(k_ref, v_ref, log_decay_ref, u_ref, aa_ref, bb_ref, pp_ref,
                    y_ref, aa_out, bb_out, pp_out, aa_chunk, bb_chunk, pp_chunk,
                    aa_scratch, bb_scratch, pp_scratch, *, seq_len: int, num_chunks: int):
    chunk = pl.program_id(2)
    scratch = (aa_scratch, bb_scratch, pp_scratch)

    @pl.when(chunk == 0)
    def _load_initial_state():
        for ref, initial in zip(scratch, (aa_ref, bb_ref, pp_ref)):
            ref[...] = initial[...]

    state = tuple(ref[...] for ref in scratch)
    for ref, value in zip((aa_chunk, bb_chunk, pp_chunk), state):
        ref[...] = value
    chunk_size = k_ref.shape[0]
    y, state = chunk_forward(_rows(k_ref), _rows(v_ref), log_decay_ref[...], u_ref[...], state,
                             seq_len - chunk * chunk_size)
    _store_rows(y_ref, y)
    for ref, value in zip(scratch, state):
        ref[...] = value

    @pl.when(chunk == num_chunks - 1)
    def _store_final_state():
        for ref, value in zip((aa_out, bb_out, pp_out), state):
            ref[...] = value


def _backward_kernel(k_ref, v_ref, log_decay_ref, u_ref, aa_chunk, bb_chunk, pp_chunk, d_y_ref,
                     d_aa_ref, d_bb_ref, d_pp_ref,
                     d_k_ref, d_v_ref, d_log_decay_ref, d_u_ref, d_aa_out, d_bb_out, d_pp_out,
                     d_aa_scratch, d_bb_scratch, d_pp_scratch, *, seq_len: int, num_chunks: int):
    step = pl.program_id(2)  # chunks are visited last to first
    chunk = num_chunks - 1 - step
    scratch = (d_aa_scratch, d_bb_scratch, d_pp_scratch)

    @pl.when(step == 0)
    def _start():
        for ref, d_final in zip(scratch, (d_aa_ref, d_bb_ref, d_pp_ref)):
            ref[...] = d_final[...]
        d_log_decay_ref[...] = jnp.zeros_like(d_log_decay_ref)
        d_u_ref[...] = jnp.zeros_like(d_u_ref)

    chunk_size = k_ref.shape[0]
    d_k, d_v, d_log_decay, d_u, d_state = chunk_backward(
        _rows(k_ref), _rows(v_ref), log_decay_ref[...], u_ref[...],
        (aa_chunk[...], bb_chunk[...], pp_chunk[...]), seq_len - chunk * chunk_size,
        _rows(d_y_ref), tuple(ref[...] for ref in scratch))
    _store_rows(d_k_ref, d_k)
    _store_rows(d_v_ref, d_v)
    d_log_decay_ref[...] += d_log_decay
    d_u_ref[...] += d_u
    for ref, value in zip(scratch, d_state):
        ref[...] = value

    @pl.when(step == num_chunks - 1)
    def _store_initial_cotangent():
        for ref, value in zip((d_aa_out, d_bb_out, d_pp_out), d_state):
            ref[...] = value


def _specs(chunk_size: int, block: int, num_chunks: int, *, reverse: bool):
    """BlockSpecs for `[B, T, C]` token tiles, `[1, C]` parameters, `[B, 1, C]` per-batch rows
    and `[B, T/L, 1, C]` chunk states."""
    chunk = (lambda c: num_chunks - 1 - c) if reverse else (lambda c: c)
    tokens = pl.BlockSpec((None, chunk_size, block), lambda b, j, c: (b, chunk(c), j))
    parameter = pl.BlockSpec((1, block), lambda b, j, c: (0, j))
    per_batch = pl.BlockSpec((None, 1, block), lambda b, j, c: (b, 0, j))
    chunk_state = pl.BlockSpec((None, None, 1, block), lambda b, j, c: (b, chunk(c), 0, j))
    return tokens, parameter, per_batch, chunk_state


@functools.partial(jax.jit, static_argnames=("chunk_size", "seq_len", "interpret"))
def forward(k, v, log_decay, u, aa, bb, pp, *, chunk_size: int, seq_len: int, interpret: bool):
    """k, v `[B, T_pad, C]` fp32 (T_pad a multiple of `chunk_size`, `seq_len` of them real),
    log_decay, u `[1, C]`, aa, bb, pp `[B, 1, C]` fp32 -> y `[B, T_pad, C]` fp32, the final
    (aa, bb, pp) and the chunk start states `[B, T_pad/L, 1, C]` fp32 each."""
    batch, padded_len, channels = k.shape
    block = channel_block(channels)
    num_chunks = padded_len // chunk_size
    tokens, parameter, per_batch, chunk_state = _specs(chunk_size, block, num_chunks, reverse=False)
    states = jax.ShapeDtypeStruct((batch, num_chunks, 1, channels), _F32)
    return pl.pallas_call(
        functools.partial(_forward_kernel, seq_len=seq_len, num_chunks=num_chunks),
        grid=(batch, channels // block, num_chunks),
        in_specs=[tokens, tokens, parameter, parameter, per_batch, per_batch, per_batch],
        out_specs=[tokens, per_batch, per_batch, per_batch, chunk_state, chunk_state, chunk_state],
        out_shape=(jax.ShapeDtypeStruct(k.shape, _F32), *(jax.ShapeDtypeStruct(aa.shape, _F32),) * 3,
                   *(states,) * 3),
        scratch_shapes=[pltpu.VMEM((1, block), _F32) for _ in range(3)],
        compiler_params=_COMPILER_PARAMS,
        interpret=_interpret_mode(interpret),
        name="wkv4_forward",
    )(k, v, log_decay, u, aa, bb, pp)


@functools.partial(jax.jit, static_argnames=("chunk_size", "seq_len", "interpret"))
def backward(k, v, log_decay, u, aa_chunks, bb_chunks, pp_chunks, d_y, d_aa, d_bb, d_pp, *,
             chunk_size: int, seq_len: int, interpret: bool):
    """Gradients `d_k, d_v` `[B, T_pad, C]`, `d_log_decay, d_u` `[B, 1, C]` (per batch row) and
    the initial state's cotangent `(d_aa, d_bb, d_pp)` `[B, 1, C]`, all fp32."""
    batch, padded_len, channels = k.shape
    block = channel_block(channels)
    num_chunks = padded_len // chunk_size
    tokens, parameter, per_batch, chunk_state = _specs(chunk_size, block, num_chunks, reverse=True)
    row = jax.ShapeDtypeStruct(d_aa.shape, _F32)
    return pl.pallas_call(
        functools.partial(_backward_kernel, seq_len=seq_len, num_chunks=num_chunks),
        grid=(batch, channels // block, num_chunks),
        in_specs=[tokens, tokens, parameter, parameter, chunk_state, chunk_state, chunk_state,
                  tokens, per_batch, per_batch, per_batch],
        out_specs=[tokens, tokens, per_batch, per_batch, per_batch, per_batch, per_batch],
        out_shape=(jax.ShapeDtypeStruct(k.shape, _F32), jax.ShapeDtypeStruct(v.shape, _F32),
                   row, row, row, row, row),
        scratch_shapes=[pltpu.VMEM((1, block), _F32) for _ in range(3)],
        compiler_params=_COMPILER_PARAMS,
        interpret=_interpret_mode(interpret),
        name="wkv4_backward",
    )(k, v, log_decay, u, aa_chunks, bb_chunks, pp_chunks, d_y, d_aa, d_bb, d_pp)
