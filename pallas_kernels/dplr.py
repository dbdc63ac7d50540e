"""Pallas RWKV-7 WKV (generalised delta rule) for GPU (Triton) and TPU (Mosaic).

``wkv7_pallas`` has the signature and results of ``rwkv_jax.wkv.dplr.wkv7_parallel``: inputs
``[B, T, H, N]`` (bf16 or fp32), state ``[B, H, N, N]`` laid out ``[value, key]``, y and final state
fp32. Both variants run the same chunk math (``pallas_kernels.dplr_chunk``): the heavy in-chunk
work in parallel over chunks, then a light sequential pass over chunks with the state on chip that
stores every chunk's start state in fp32; the ``jax.custom_vjp`` backward runs the transposed
sequential pass for the state cotangents and then recomputes each chunk, in parallel, from its
stored start state, returning gradients for every input including the initial state, with the
final state's cotangent flowing in.

Decay precondition (as ``wkv7_parallel``): logw ≥ -0.6066, RWKV-7's own bound, keeps the centred
in-chunk exponents within fp32 range at chunk 64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import dplr_gpu, dplr_tpu
from pallas_kernels.platform import PLATFORMS, TF32_X3, gpu_data_precision, resolve_platform

SUPPORTED_HEAD_SIZES = (32, 64)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_SUBSTITUTION_BLOCK = 16
_MAX_CHUNK_SIZE = 64  # the decay bound keeps fp32 exponents safe up to here (tested at 64)


def supports(head_size: int, dtype, platform: str) -> bool:
    """True for the configurations the tests cover: head size 32/64, fp32/bf16 inputs, gpu/tpu."""
    return (
        head_size in SUPPORTED_HEAD_SIZES
        and jnp.dtype(dtype) in SUPPORTED_DTYPES
        and platform in PLATFORMS
    )


def default_chunk_size(platform: str, *inputs: jax.Array) -> int:
    """Tokens per chunk when none is given: 64 on TPU; on GPU 32, or 16 when every input is fp32.

    fp32 inputs make every data matmul three TF32 passes (``platform.gpu_data_precision``), and
    at 32 tokens the gradient kernel's live tiles no longer fit in registers: ptxas (sm_90, 8
    warps) gives it 36 KB of spill loads per thread, 1.4 KB at 16 tokens (experiments/RESULTS.md).
    """
    if platform == "tpu":
        return 64
    return 16 if gpu_data_precision(*inputs) == TF32_X3 else 32


def _check_chunk_size(chunk_size: int, platform: str) -> None:
    if platform == "gpu":
        valid = chunk_size in (16, 32, 64)  # Triton tiles are powers of 2, dots need ≥ 16
        rule = "16, 32 or 64"
    else:
        valid = chunk_size % 8 == 0 and 8 <= chunk_size <= _MAX_CHUNK_SIZE
        rule = f"a multiple of 8 up to {_MAX_CHUNK_SIZE}"
    if not valid:
        raise ValueError(f"chunk_size for platform {platform!r} must be {rule}, got {chunk_size}")


def _pad_tokens(x: jax.Array, padded_len: int, time_axis: int) -> jax.Array:
    # Identity tokens (r = k = v = a = b = 0, logw = 0) leave the state unchanged.
    pad = [(0, 0)] * x.ndim
    pad[time_axis] = (0, padded_len - x.shape[time_axis])
    return jnp.pad(x, pad)


@functools.lru_cache(maxsize=None)
def _wkv7_with_vjp(platform: str, chunk_size: int, interpret: bool, dtypes: tuple[str, ...]):
    """The custom_vjp function of (r, logw, k, v, a, b, state) for one static configuration.

    dtypes: the seven inputs' dtype names, so cotangents come back in the inputs' dtypes.
    """
    block = min(_SUBSTITUTION_BLOCK, chunk_size)
    kernels = dplr_gpu if platform == "gpu" else dplr_tpu
    options = dict(chunk_size=chunk_size, block=block, interpret=interpret)
    time_axis = 1 if platform == "gpu" else 2

    def to_kernel_layout(x: jax.Array, padded_len: int) -> jax.Array:
        if platform == "gpu":  # native [B, T, H, N] layout and dtype
            return _pad_tokens(x, padded_len, time_axis)
        return _pad_tokens(jnp.swapaxes(x, 1, 2).astype(jnp.float32), padded_len, time_axis)

    def from_kernel_layout(x: jax.Array, seq_len: int) -> jax.Array:
        if platform == "gpu":
            return x[:, :seq_len]
        return jnp.swapaxes(x[:, :, :seq_len], 1, 2)

    def wkv7_fwd(r, logw, k, v, a, b, state):
        seq_len = r.shape[1]
        padded_len = -(-seq_len // chunk_size) * chunk_size
        tokens = tuple(to_kernel_layout(x, padded_len) for x in (r, logw, k, v, a, b))
        y, final_state, kernel_residuals = kernels.forward(
            *tokens, state.astype(jnp.float32), **options
        )
        return (from_kernel_layout(y, seq_len), final_state), (tokens, kernel_residuals)

    @jax.custom_vjp
    def wkv7(r, logw, k, v, a, b, state):
        return wkv7_fwd(r, logw, k, v, a, b, state)[0]

    def wkv7_bwd(residuals, cotangents):
        tokens, kernel_residuals = residuals
        d_y, d_final_state = cotangents
        *d_tokens, d_state = kernels.backward(
            *tokens, kernel_residuals, to_kernel_layout(d_y, tokens[0].shape[time_axis]),
            d_final_state.astype(jnp.float32), **options,
        )
        grads = [from_kernel_layout(d, d_y.shape[1]) for d in d_tokens] + [d_state]
        return tuple(g.astype(dtype) for g, dtype in zip(grads, dtypes))

    wkv7.defvjp(wkv7_fwd, wkv7_bwd)
    return wkv7


def wkv7_pallas(
    r: jax.Array,
    logw: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array,
    b: jax.Array,
    state: jax.Array,
    *,
    chunk_size: int | None = None,
    platform: str | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """RWKV-7 WKV with Pallas kernels; same semantics as ``wkv7_parallel``.

    Args:
      r, logw, k, v, a, b: ``[B, T, H, N]`` bf16 or fp32 (any T; padded internally with tokens
        that leave the state unchanged); logw ≥ -0.6066.
      state: ``[B, H, N, N]`` initial state, ``[value, key]``.
      chunk_size: tokens per chunk; default ``default_chunk_size`` (GPU 32, 16 for fp32 inputs;
        TPU 64). GPU: 16, 32 or 64; TPU: a multiple of 8 up to 64.
      platform: "gpu" (Triton), "tpu" (Mosaic) or None (from ``jax.default_backend()``; on CPU
        with ``interpret=True`` the GPU variant, without it a ValueError).
      interpret: run the chosen variant in Pallas interpret mode (works on CPU).

    Differentiable in reverse mode only (``jax.custom_vjp``); use ``wkv7_parallel`` for
    forward-mode derivatives.

    Returns:
      ``(y, final_state)``: y ``[B, T, H, N]`` fp32, final_state ``[B, H, N, N]`` fp32.
    """
    platform = resolve_platform(platform, interpret)
    inputs = (r, logw, k, v, a, b, state)
    if chunk_size is None:
        chunk_size = default_chunk_size(platform, *inputs[:-1])
    _check_chunk_size(chunk_size, platform)
    if r.shape[1] == 0:
        return jnp.zeros(r.shape, jnp.float32), state.astype(jnp.float32)
    dtypes = tuple(jnp.dtype(x.dtype).name for x in inputs)
    return _wkv7_with_vjp(platform, chunk_size, interpret, dtypes)(*inputs)
