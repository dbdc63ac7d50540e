"""Pallas kernels for the RWKV-4 WKV recurrence (vector state in log space), GPU and TPU.

`wkv4_pallas` has the contract of `rwkv_jax.wkv.vector.wkv4_parallel`: k, v `[B, T, C]` (bf16
or fp32), log_decay and u `[C]`, state `(aa, bb, pp)` each `[B, C]` fp32 (empty state:
`rwkv_jax.wkv.vector.zero_state`); it returns y `[B, T, C]` fp32 and the final state.

The grid runs over (batch, channel blocks); each program walks its tokens in order with the
state on chip, in log space with the max trick (`vector_chunk`), storing the state at every
chunk boundary. Backward (`jax.custom_vjp`): the chunks run in reverse, each recomputed from its
stored start state; gradients reach k, v, log_decay, u and the initial (aa, bb, pp), and the
final state's cotangent flows in. Any T: the last chunk is padded and its padding tokens leave
the state unchanged; C is padded to whole channel blocks with zeros (inert channels).

As for `wkv4_parallel`, the returned state has the oracle's values; its gradients agree with the
oracle's through what the state means, the sums aa·e^pp and bb·e^pp (pp alone is a scale).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import vector_gpu, vector_tpu
from pallas_kernels.platform import resolve_platform

_F32 = jnp.float32
# Tokens per chunk (one stored state each; the walk inside a chunk is unrolled, and the backward
# differentiates it). GPU: 8, because compiling the unrolled backward for sm_90 takes 27 s at 16
# tokens and 4.7 s at 8 (223 and 128 registers; experiments/triton_compile_check.py), while the
# per-token work is the same; TPU: 16 (a multiple of 8 sublanes, fewer grid steps).
DEFAULT_CHUNK = {"gpu": 8, "tpu": 16}
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

State = tuple[jax.Array, jax.Array, jax.Array]


def supports(head_size: int, dtype, platform: str) -> bool:
    """True for the input dtypes and platforms the tests cover. RWKV-4 has no heads: any
    channel count works, so `head_size` (the channel count, C) only needs to be positive."""
    return head_size > 0 and jnp.dtype(dtype) in _DTYPES and platform in ("gpu", "tpu")


class _Config(NamedTuple):
    platform: str
    chunk_size: int
    interpret: bool


def _kernels(platform: str):
    return vector_gpu if platform == "gpu" else vector_tpu


def _padded(x: jax.Array, length: int | None, channels: int) -> jax.Array:
    """Zero-pad the time axis (if `length`) and the last (channel) axis."""
    pads = [(0, 0)] * x.ndim
    if length is not None:
        pads[1] = (0, length - x.shape[1])
    pads[-1] = (0, channels - x.shape[-1])
    return jnp.pad(x, pads)


def _layout(k, v, log_decay, u, config: _Config):
    """Padded kernel inputs and the sizes they were padded to."""
    seq_len, channels = k.shape[1], k.shape[2]
    padded_len = -(-seq_len // config.chunk_size) * config.chunk_size
    block = _kernels(config.platform).channel_block(channels)
    padded_channels = -(-channels // block) * block
    dtype = None if config.platform == "gpu" else _F32  # Mosaic gets fp32 tiles
    tokens = tuple(_padded(x if dtype is None else x.astype(dtype), padded_len, padded_channels)
                   for x in (k, v))
    params = tuple(_padded(x.astype(_F32)[None, :], None, padded_channels) for x in (log_decay, u))
    return tokens, params, padded_len, padded_channels


def _per_batch(x: jax.Array, padded_channels: int) -> jax.Array:
    """`[B, C]` -> `[B, 1, C_pad]` fp32."""
    return _padded(x.astype(_F32)[:, None, :], None, padded_channels)


def _forward(k, v, log_decay, u, state, config: _Config):
    seq_len, channels = k.shape[1], k.shape[2]
    tokens, params, _, padded_channels = _layout(k, v, log_decay, u, config)
    y, aa, bb, pp, *chunk_states = _kernels(config.platform).forward(
        *tokens, *params, *(_per_batch(x, padded_channels) for x in state),
        chunk_size=config.chunk_size, seq_len=seq_len, interpret=config.interpret)
    final_state = tuple(x[:, 0, :channels] for x in (aa, bb, pp))
    return (y[:, :seq_len, :channels], final_state), tuple(chunk_states)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _wkv4(k, v, log_decay, u, state, config: _Config):
    return _forward(k, v, log_decay, u, state, config)[0]


def _wkv4_fwd(k, v, log_decay, u, state, config: _Config):
    outputs, chunk_states = _forward(k, v, log_decay, u, state, config)
    return outputs, (k, v, log_decay, u, state, chunk_states)


def _wkv4_bwd(config: _Config, residuals, cotangents):
    k, v, log_decay, u, state, chunk_states = residuals
    d_y, d_final_state = cotangents
    seq_len, channels = k.shape[1], k.shape[2]
    tokens, params, padded_len, padded_channels = _layout(k, v, log_decay, u, config)
    d_y = _padded(d_y.astype(_F32), padded_len, padded_channels)
    d_k, d_v, d_log_decay, d_u, *d_state = _kernels(config.platform).backward(
        *tokens, *params, *chunk_states, d_y, *(_per_batch(x, padded_channels) for x in d_final_state),
        chunk_size=config.chunk_size, seq_len=seq_len, interpret=config.interpret)
    d_k, d_v = (d[:, :seq_len, :channels].astype(x.dtype) for d, x in zip((d_k, d_v), (k, v)))
    d_log_decay, d_u = (jnp.sum(d[:, 0, :channels], axis=0).astype(x.dtype)
                        for d, x in zip((d_log_decay, d_u), (log_decay, u)))
    d_state = tuple(d[:, 0, :channels].astype(x.dtype) for d, x in zip(d_state, state))
    return d_k, d_v, d_log_decay, d_u, d_state


_wkv4.defvjp(_wkv4_fwd, _wkv4_bwd)


def wkv4_pallas(
    k: jax.Array,
    v: jax.Array,
    log_decay: jax.Array,
    u: jax.Array,
    state: State,
    *,
    chunk_size: int | None = None,
    platform: str | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, State]:
    """RWKV-4 WKV recurrence as a Pallas kernel; same results as `wkv4_oracle`.

    Args:
      k, v: `[B, T, C]` key and value; bf16 or fp32.
      log_decay: `[C]` per-channel log-decay w < 0 (the official `-exp(time_decay)`).
      u: `[C]` bonus.
      state: `(aa, bb, pp)`, each `[B, C]` fp32.
      chunk_size: tokens per chunk (one stored state each); a multiple of 8 on TPU.
        None: `DEFAULT_CHUNK[platform]`.
      platform: "gpu" (Triton lowering), "tpu" (Mosaic) or None (from the default backend).
      interpret: run the chosen variant in Pallas interpret mode (on CPU, for tests).

    Returns:
      y: `[B, T, C]` fp32 outputs.
      final_state: `(aa, bb, pp)`, each `[B, C]` fp32.
    """
    platform = resolve_platform(platform, interpret)
    chunk_size = DEFAULT_CHUNK[platform] if chunk_size is None else chunk_size
    granule = 8 if platform == "tpu" else 1
    if chunk_size <= 0 or chunk_size % granule:
        raise ValueError(
            f"chunk_size must be a positive multiple of {granule} on {platform}, got {chunk_size}")
    return _wkv4(k, v, log_decay, u, tuple(state), _Config(platform, chunk_size, interpret))
