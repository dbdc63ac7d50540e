"""RWKV-7 kernels for TPUs through Pallas' Mosaic lowering.

Grid ``(batch, head, chunk)`` with the chunk axis sequential ("arbitrary"): the fp32 ``[N, N]``
state lives in a VMEM scratch buffer across the chunk steps, and Pallas' pipelining streams the
``[L, N]`` input tiles in. Mosaic tiles the last two block dimensions, so the kernels take
``[B, H, T, N]`` fp32 inputs (the wrapper transposes and upcasts in one pass); L must be a
multiple of 8. The forward stores each chunk's start state; the backward visits the chunks in
reverse through its index maps, recomputing each chunk from its stored start state, with the
state cotangent in a second VMEM scratch. All dots request ``Precision.HIGHEST`` (fp32 on the MXU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.dplr_chunk import ChunkOps, chunk_backward, chunk_forward

_F32 = jnp.float32
_OPS = ChunkOps(precision=jax.lax.Precision.HIGHEST, native_cumsum=False)
_COMPILER_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _interpret_mode(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def _forward_kernel(
    r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref, state_ref,
    y_ref, final_state_ref, chunk_state_ref, state_scratch, *, block: int,
):
    chunk = pl.program_id(2)

    @pl.when(chunk == 0)
    def _load_initial_state():
        state_scratch[...] = state_ref[...]

    start_state = state_scratch[...]
    chunk_state_ref[...] = start_state
    inputs = (ref[...] for ref in (r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref))
    y, end_state = chunk_forward(_OPS, block, *inputs, start_state)
    y_ref[...] = y
    state_scratch[...] = end_state

    @pl.when(chunk == pl.num_programs(2) - 1)
    def _store_final_state():
        final_state_ref[...] = end_state


def _backward_kernel(
    r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref, chunk_state_ref, d_y_ref, d_final_ref,
    d_r_ref, d_logw_ref, d_k_ref, d_v_ref, d_a_ref, d_b_ref, d_state_ref,
    d_state_scratch, *, block: int,
):
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _load_final_cotangent():
        d_state_scratch[...] = d_final_ref[...]

    inputs = [ref[...] for ref in (r_ref, logw_ref, k_ref, v_ref, a_ref, b_ref)]
    *d_inputs, d_start = chunk_backward(
        _OPS, block, *inputs, chunk_state_ref[...], d_y_ref[...], d_state_scratch[...]
    )
    for ref, grad in zip((d_r_ref, d_logw_ref, d_k_ref, d_v_ref, d_a_ref, d_b_ref), d_inputs):
        ref[...] = grad
    d_state_scratch[...] = d_start

    @pl.when(step == pl.num_programs(2) - 1)
    def _store_initial_cotangent():
        d_state_ref[...] = d_start


def _specs(chunk_size: int, dim: int, num_chunks: int, *, reverse: bool):
    def chunk_index(c):
        return num_chunks - 1 - c if reverse else c

    tokens = pl.BlockSpec((None, None, chunk_size, dim), lambda b, h, c: (b, h, chunk_index(c), 0))
    state = pl.BlockSpec((None, None, dim, dim), lambda b, h, c: (b, h, 0, 0))
    chunk_state = pl.BlockSpec(
        (None, None, None, dim, dim), lambda b, h, c: (b, h, chunk_index(c), 0, 0)
    )
    return tokens, state, chunk_state


@functools.partial(jax.jit, static_argnames=("chunk_size", "block", "interpret"))
def forward(r, logw, k, v, a, b, state, *, chunk_size: int, block: int, interpret: bool):
    """Inputs ``[B, H, T, N]`` fp32 with T a multiple of chunk_size, state ``[B, H, N, N]`` fp32.

    Returns ``(y [B, H, T, N], final_state [B, H, N, N], chunk_states [B, H, T/L, N, N])``, fp32.
    """
    batch, heads, seq_len, dim = r.shape
    num_chunks = seq_len // chunk_size
    tokens, state_spec, chunk_state = _specs(chunk_size, dim, num_chunks, reverse=False)
    return pl.pallas_call(
        functools.partial(_forward_kernel, block=block),
        grid=(batch, heads, num_chunks),
        in_specs=[tokens] * 6 + [state_spec],
        out_specs=(tokens, state_spec, chunk_state),
        out_shape=(
            jax.ShapeDtypeStruct((batch, heads, seq_len, dim), _F32),
            jax.ShapeDtypeStruct((batch, heads, dim, dim), _F32),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, dim, dim), _F32),
        ),
        scratch_shapes=[pltpu.VMEM((dim, dim), _F32)],
        compiler_params=_COMPILER_PARAMS,
        interpret=_interpret_mode(interpret),
        name="wkv7_forward",
    )(r, logw, k, v, a, b, state)


@functools.partial(jax.jit, static_argnames=("chunk_size", "block", "interpret"))
def backward(r, logw, k, v, a, b, chunk_states, d_y, d_final_state, *,
             chunk_size: int, block: int, interpret: bool):
    """fp32 ``[B, H, T, N]`` gradients of r, logw, k, v, a, b and the ``[B, H, N, N]`` d_state."""
    batch, heads, seq_len, dim = r.shape
    num_chunks = seq_len // chunk_size
    tokens, state_spec, chunk_state = _specs(chunk_size, dim, num_chunks, reverse=True)
    token_shape = jax.ShapeDtypeStruct(r.shape, _F32)
    return pl.pallas_call(
        functools.partial(_backward_kernel, block=block),
        grid=(batch, heads, num_chunks),
        in_specs=[tokens] * 6 + [chunk_state, tokens, state_spec],
        out_specs=(tokens,) * 6 + (state_spec,),
        out_shape=(token_shape,) * 6 + (jax.ShapeDtypeStruct((batch, heads, dim, dim), _F32),),
        scratch_shapes=[pltpu.VMEM((dim, dim), _F32)],
        compiler_params=_COMPILER_PARAMS,
        interpret=_interpret_mode(interpret),
        name="wkv7_backward",
    )(r, logw, k, v, a, b, chunk_states, d_y, d_final_state)
