"""RWKV-5/6 kernels for TPUs through Pallas' Mosaic lowering.

Grid `(batch, head, chunk)` with the chunk axis sequential ("arbitrary"): the fp32 `[N, N]`
state ([value, key]) lives in a VMEM scratch buffer across the chunk steps while Pallas'
pipelining streams the `[L, N]` input tiles in. Mosaic tiles the last two block dimensions, so
the kernels take `[B, H, T, N]` fp32 inputs (the wrapper transposes and upcasts in one pass);
L is a multiple of 8. The forward stores each chunk's start state; the backward visits the chunks
in reverse through its index maps, recomputes each from its stored start state, and keeps the
state cotangent in a second VMEM scratch and the bonus gradient in its resident output block.
All matmuls request `Precision.HIGHEST` for fp32 inputs (fp32 on the MXU); for bf16 inputs
only the log-decay sums do, the data matmuls take Mosaic's default (`Precision.DEFAULT`), which
interpret mode emulates as a single bf16 pass (`platform.kernel_dot`), the worst case.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.diag_chunk import DiagOps, chunk_backward, chunk_forward

_F32 = jnp.float32
_COMPILER_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def sub_block(chunk_size: int) -> int:
    """Tokens per sub-block: 16 where the chunk allows it, else 8 (one sublane tile)."""
    return 16 if chunk_size % 16 == 0 else 8


def _ops(input_dtype, interpret: bool) -> DiagOps:
    fp32 = jnp.dtype(input_dtype) == jnp.float32
    data = jax.lax.Precision.HIGHEST if fp32 else jax.lax.Precision.DEFAULT
    return DiagOps(decay_sums=jax.lax.Precision.HIGHEST, data=data, interpret=interpret)


def _interpret_mode(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def _tiles(ref):
    size = sub_block(ref.shape[0])
    return tuple(ref[pl.ds(i, size), :] for i in range(0, ref.shape[0], size))


def _store_tiles(ref, tiles):
    size = tiles[0].shape[0]
    for i, tile in enumerate(tiles):
        ref[pl.ds(i * size, size), :] = tile


def _forward_kernel(r_ref, logw_ref, k_ref, v_ref, u_ref, state_ref,
                    y_ref, final_state_ref, chunk_state_ref, state_scratch, *, ops: DiagOps,
                    num_chunks: int):
    chunk = pl.program_id(2)

    @pl.when(chunk == 0)
    def _load_initial_state():
        state_scratch[...] = state_ref[...]

    chunk_state_ref[...] = state_scratch[...]
    inputs = (_tiles(ref) for ref in (r_ref, logw_ref, k_ref, v_ref))
    y, state = chunk_forward(ops, *inputs, u_ref[...], state_scratch[...])
    _store_tiles(y_ref, y)
    state_scratch[...] = state

    @pl.when(chunk == num_chunks - 1)
    def _store_final_state():
        final_state_ref[...] = state


def _backward_kernel(r_ref, logw_ref, k_ref, v_ref, u_ref, chunk_state_ref, d_y_ref, d_final_ref,
                     d_r_ref, d_logw_ref, d_k_ref, d_v_ref, d_u_ref, d_state_ref,
                     d_state_scratch, *, ops: DiagOps, num_chunks: int):
    step = pl.program_id(2)  # chunks are visited last to first

    @pl.when(step == 0)
    def _start():
        d_state_scratch[...] = d_final_ref[...]
        d_u_ref[...] = jnp.zeros_like(d_u_ref)

    inputs = tuple(_tiles(ref) for ref in (r_ref, logw_ref, k_ref, v_ref))
    d_r, d_logw, d_k, d_v, d_u, d_state = chunk_backward(
        ops, *inputs, u_ref[...], chunk_state_ref[...], _tiles(d_y_ref), d_state_scratch[...])
    for ref, tiles in zip((d_r_ref, d_logw_ref, d_k_ref, d_v_ref), (d_r, d_logw, d_k, d_v)):
        _store_tiles(ref, tiles)
    d_u_ref[...] += d_u
    d_state_scratch[...] = d_state

    @pl.when(step == num_chunks - 1)
    def _store_initial_cotangent():
        d_state_ref[...] = d_state


def _specs(chunk_size: int, head_size: int, num_chunks: int, *, reverse: bool):
    """BlockSpecs for per-token `[B, H, T, N]` tiles, per-head `[H, 1, N]`, per-(batch, head)
    `[B, H, N, N]` / `[B, H, 1, N]` blocks and per-chunk `[B, H, C, N, N]` states."""
    chunk = (lambda c: num_chunks - 1 - c) if reverse else (lambda c: c)
    tokens = pl.BlockSpec((None, None, chunk_size, head_size), lambda b, h, c: (b, h, chunk(c), 0))
    per_head = pl.BlockSpec((None, 1, head_size), lambda b, h, c: (h, 0, 0))
    matrix = pl.BlockSpec((None, None, head_size, head_size), lambda b, h, c: (b, h, 0, 0))
    row = pl.BlockSpec((None, None, 1, head_size), lambda b, h, c: (b, h, 0, 0))
    chunk_state = pl.BlockSpec((None, None, None, head_size, head_size),
                               lambda b, h, c: (b, h, chunk(c), 0, 0))
    return tokens, per_head, matrix, row, chunk_state


@functools.partial(jax.jit, static_argnames=("chunk_size", "input_dtype", "interpret"))
def forward(r, logw, k, v, u, state, *, chunk_size: int, input_dtype, interpret: bool):
    """r, logw, k, v `[B, H, T, N]` fp32 (T a multiple of `chunk_size`), u `[H, 1, N]`, state
    `[B, H, N, N]` fp32 [value, key] -> y `[B, H, T, N]` fp32, the final state and the chunk start
    states `[B, H, T/L, N, N]` (fp32, [value, key]). `input_dtype`: the caller's dtype, which
    sets the matmul precision."""
    batch, heads, seq_len, head_size = r.shape
    num_chunks = seq_len // chunk_size
    tokens, per_head, matrix, _, chunk_state = _specs(chunk_size, head_size, num_chunks, reverse=False)
    return pl.pallas_call(
        functools.partial(_forward_kernel, ops=_ops(input_dtype, interpret), num_chunks=num_chunks),
        grid=(batch, heads, num_chunks),
        in_specs=[tokens, tokens, tokens, tokens, per_head, matrix],
        out_specs=[tokens, matrix, chunk_state],
        out_shape=(
            jax.ShapeDtypeStruct(r.shape, _F32),
            jax.ShapeDtypeStruct(state.shape, _F32),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, head_size, head_size), _F32),
        ),
        scratch_shapes=[pltpu.VMEM((head_size, head_size), _F32)],
        compiler_params=_COMPILER_PARAMS,
        interpret=_interpret_mode(interpret),
        name="wkv6_forward",
    )(r, logw, k, v, u, state)


@functools.partial(jax.jit, static_argnames=("chunk_size", "input_dtype", "interpret"))
def backward(r, logw, k, v, u, chunk_states, d_y, d_final_state, *, chunk_size: int, input_dtype,
             interpret: bool):
    """Gradients `(d_r, d_logw, d_k, d_v)` `[B, H, T, N]`, `d_u [B, H, 1, N]` (per batch row) and
    the initial state's cotangent `[B, H, N, N]` [value, key], all fp32."""
    batch, heads, seq_len, head_size = r.shape
    num_chunks = seq_len // chunk_size
    tokens, per_head, matrix, row, chunk_state = _specs(chunk_size, head_size, num_chunks, reverse=True)
    return pl.pallas_call(
        functools.partial(_backward_kernel, ops=_ops(input_dtype, interpret), num_chunks=num_chunks),
        grid=(batch, heads, num_chunks),
        in_specs=[tokens, tokens, tokens, tokens, per_head, chunk_state, tokens, matrix],
        out_specs=[tokens, tokens, tokens, tokens, row, matrix],
        out_shape=(
            *(jax.ShapeDtypeStruct(r.shape, _F32) for _ in range(4)),
            jax.ShapeDtypeStruct((batch, heads, 1, head_size), _F32),
            jax.ShapeDtypeStruct(d_final_state.shape, _F32),
        ),
        scratch_shapes=[pltpu.VMEM((head_size, head_size), _F32)],
        compiler_params=_COMPILER_PARAMS,
        interpret=_interpret_mode(interpret),
        name="wkv6_backward",
    )(r, logw, k, v, u, chunk_states, d_y, d_final_state)
