"""Pallas kernels for the RWKV-5/6 WKV recurrence (diagonal decay with bonus), GPU and TPU.

`wkv6_pallas` has the contract of `rwkv_jax.wkv.diag.wkv6_parallel`: r, logw, k, v
`[B, T, H, N]` (bf16 or fp32), u `[H, N]`, state `[B, H, N, N]` laid out [key, value]; it returns
y `[B, T, H, N]` and the final state, both fp32. RWKV-5 is the same call with logw constant over T.

Forward: the chunks of each (batch, head) run in order with the state on chip; each chunk's
start state is stored (fp32). Backward (`jax.custom_vjp`): the chunks run in reverse, each
recomputed from its stored start state (`diag_chunk.chunk_backward`), never dividing by a decay;
gradients reach r, logw, k, v, u and the initial state, and the final state's cotangent flows in.
Any T: the sequence is padded to whole chunks with identity tokens (r = k = v = 0, logw = 0),
which leave the state unchanged. Strong decays are exact (see `diag_chunk`): logw = −200 next
to logw ≈ 0 in one chunk gives oracle-accurate values and finite gradients.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import diag_gpu, diag_tpu
from pallas_kernels.platform import resolve_platform

_F32 = jnp.float32
# Tokens per chunk (one stored state each). GPU: the sequential walk takes one step of
# chunk-sized matmuls per chunk, the parallel intra kernel walks the chunk's 16-token sub-blocks
# (as flash-linear-attention's chunk 64 with sub-chunks of 16); TPU: longer chunks amortise the
# ≈0.35 µs per grid step.
DEFAULT_CHUNK = {"gpu": 64, "tpu": 64}
_HEAD_SIZES = (32, 64)
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def supports(head_size: int, dtype, platform: str) -> bool:
    """True for the head sizes, input dtypes and platforms the tests cover."""
    return head_size in _HEAD_SIZES and jnp.dtype(dtype) in _DTYPES and platform in ("gpu", "tpu")


class _Config(NamedTuple):
    platform: str
    chunk_size: int
    interpret: bool


def _pad_tokens(x: jax.Array, padded_len: int) -> jax.Array:
    """Zero tokens appended along T (axis 1): identity tokens for r, logw, k, v."""
    return jnp.pad(x, ((0, 0), (0, padded_len - x.shape[1]), (0, 0), (0, 0)))


def _padded_len(seq_len: int, chunk_size: int) -> int:
    return -(-seq_len // chunk_size) * chunk_size


def _to_tpu_layout(x: jax.Array, padded_len: int) -> jax.Array:
    """[B, T, H, N] any dtype -> [B, H, T_pad, N] fp32, the layout Mosaic tiles."""
    return jnp.swapaxes(_pad_tokens(x, padded_len), 1, 2).astype(_F32)


def _forward(r, logw, k, v, u, state, config: _Config):
    seq_len = r.shape[1]
    padded_len = _padded_len(seq_len, config.chunk_size)
    state_vk = jnp.swapaxes(state.astype(_F32), -1, -2)
    if config.platform == "gpu":
        inputs = (_pad_tokens(x, padded_len) for x in (r, logw, k, v))
        y, final_vk, chunk_states = diag_gpu.forward(
            *inputs, u, state_vk, chunk_size=config.chunk_size, interpret=config.interpret)
    else:
        inputs = (_to_tpu_layout(x, padded_len) for x in (r, logw, k, v))
        y, final_vk, chunk_states = diag_tpu.forward(
            *inputs, u.astype(_F32)[:, None, :], state_vk, chunk_size=config.chunk_size,
            input_dtype=r.dtype, interpret=config.interpret)
        y = jnp.swapaxes(y, 1, 2)
    return (y[:, :seq_len], jnp.swapaxes(final_vk, -1, -2)), chunk_states


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _wkv6(r, logw, k, v, u, state, config: _Config):
    return _forward(r, logw, k, v, u, state, config)[0]


def _wkv6_fwd(r, logw, k, v, u, state, config: _Config):
    outputs, chunk_states = _forward(r, logw, k, v, u, state, config)
    return outputs, (r, logw, k, v, u, state, chunk_states)


def _wkv6_bwd(config: _Config, residuals, cotangents):
    r, logw, k, v, u, state, chunk_states = residuals
    d_y, d_final_state = cotangents
    seq_len = r.shape[1]
    padded_len = _padded_len(seq_len, config.chunk_size)
    d_final_vk = jnp.swapaxes(d_final_state.astype(_F32), -1, -2)
    if config.platform == "gpu":
        inputs = tuple(_pad_tokens(x, padded_len) for x in (r, logw, k, v, d_y.astype(_F32)))
        *d_inputs, d_u, d_state_vk = diag_gpu.backward(
            *inputs[:4], u, chunk_states, inputs[4], d_final_vk, chunk_size=config.chunk_size,
            interpret=config.interpret)
    else:
        inputs = tuple(_to_tpu_layout(x, padded_len) for x in (r, logw, k, v, d_y))
        *d_inputs, d_u, d_state_vk = diag_tpu.backward(
            *inputs[:4], u.astype(_F32)[:, None, :], chunk_states, inputs[4], d_final_vk,
            chunk_size=config.chunk_size, input_dtype=r.dtype, interpret=config.interpret)
        d_inputs = [jnp.swapaxes(d, 1, 2) for d in d_inputs]
    d_inputs = [d[:, :seq_len].astype(x.dtype) for d, x in zip(d_inputs, (r, logw, k, v))]
    # [B, H, X, N]: per batch row (and on GPU per chunk), all sharing the bonus.
    d_u = jnp.sum(d_u, axis=(0, 2)).astype(u.dtype)
    d_state = jnp.swapaxes(d_state_vk, -1, -2).astype(state.dtype)
    return (*d_inputs, d_u, d_state)


_wkv6.defvjp(_wkv6_fwd, _wkv6_bwd)


def wkv6_pallas(
    r: jax.Array,
    logw: jax.Array,
    k: jax.Array,
    v: jax.Array,
    u: jax.Array,
    state: jax.Array,
    *,
    chunk_size: int | None = None,
    platform: str | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Chunked WKV recurrence of RWKV-5/6 as a Pallas kernel; same results as `wkv6_oracle`.

    Args:
      r, logw, k, v: `[B, T, H, N]` receptance, log-decay (≤ 0), key, value; bf16 or fp32.
      u: `[H, N]` bonus.
      state: `[B, H, N, N]` initial state, layout [key, value].
      chunk_size: tokens per chunk (one stored state each); a power of two ≥ 16 on GPU, a
        multiple of 8 on TPU. None: `DEFAULT_CHUNK[platform]`.
      platform: "gpu" (Triton lowering), "tpu" (Mosaic) or None (from the default backend).
      interpret: run the chosen variant in Pallas interpret mode (on CPU, for tests).

    Returns:
      y: `[B, T, H, N]` fp32 outputs.
      final_state: `[B, H, N, N]` fp32 state after the last token, [key, value].
    """
    platform = resolve_platform(platform, interpret)
    chunk_size = DEFAULT_CHUNK[platform] if chunk_size is None else chunk_size
    if platform == "gpu":  # Triton tiles are powers of two; sub-blocks of 16
        valid, rule = chunk_size >= diag_gpu.SUB_BLOCK and chunk_size & (chunk_size - 1) == 0, \
            f"a power of two ≥ {diag_gpu.SUB_BLOCK}"
    else:
        valid, rule = chunk_size > 0 and chunk_size % 8 == 0, "a positive multiple of 8"
    if not valid:
        raise ValueError(f"chunk_size on {platform} must be {rule}, got {chunk_size}")
    return _wkv6(r, logw, k, v, u, state, _Config(platform, chunk_size, interpret))
