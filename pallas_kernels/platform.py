"""Which Pallas variant runs where: "gpu" (Triton lowering) or "tpu" (Mosaic), and the matmul
precisions the kernels request, as the device runs them or as interpret mode emulates them."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

# Tensor-core algorithms the GPU variants request: one TF32 pass, or three (≈ fp32 accuracy).
TF32 = jax.lax.DotAlgorithmPreset.TF32_TF32_F32
TF32_X3 = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3

PLATFORMS = ("gpu", "tpu")
# XLA's custom call for a Pallas Triton kernel (its IR travels in the call's backend config).
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"
# The GPU that ahead-of-time GPU lowering targets (H100, sm_90).
AOT_GPU_KIND = "NVIDIA H100 80GB HBM3"


def backend_platform() -> str | None:
    """The variant for `jax.default_backend()`: "gpu", "tpu", or None on a CPU backend."""
    backend = jax.default_backend()
    return "gpu" if backend in ("cuda", "rocm", "gpu") else "tpu" if backend == "tpu" else None


def resolve_platform(platform: str | None, interpret: bool) -> str:
    """`platform` as given, else the backend's; in interpret mode on a CPU backend the GPU variant.
    ValueError on a CPU backend without `interpret` (`jax.export` for a device names the platform,
    so kernels still lower from a CPU)."""
    if platform is None:
        platform = backend_platform() or ("gpu" if interpret else None)
        if platform is None:
            raise ValueError(
                f"Pallas WKV kernels need a GPU or TPU (the default backend is {jax.default_backend()!r}); "
                "pass interpret=True to run a variant in Pallas interpret mode, or use the XLA forms in rwkv_jax.wkv.")
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS} or None, got {platform!r}")
    return platform


def export_ahead_of_time(fn, platform: str, *args) -> jax.export.Exported:
    """``jax.export`` of ``jax.jit(fn)`` at ``args`` (arrays or ShapeDtypeStructs) for "gpu"
    (CUDA) or "tpu", on any machine: proof that every kernel inside lowers for that device.

    jax ≥ 0.11 asks the device for its compute capability while lowering a Triton kernel, so
    the GPU export runs under an abstract mesh that names an H100. The Triton custom call has no
    export compatibility guarantee; it is allowed here because it is what the kernels ship.
    """
    if platform == "tpu":
        return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    if platform != "gpu":
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    device = jax.sharding.AbstractDevice(device_kind=AOT_GPU_KIND, num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        return jax.export.export(
            jax.jit(fn), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)],
        )(*args)


def gpu_data_precision(*inputs: jax.Array) -> Any:
    """The GPU kernels' precision for matmuls on data: TF32x3 when every input is fp32 (so fp32
    inputs get fp32-accurate results), one TF32 pass otherwise (bf16 inputs carry 8 bits of
    mantissa; TF32 keeps 11, and three passes would triple the tensor-core work and the live
    registers for no visible gain)."""
    return TF32_X3 if all(jnp.dtype(x.dtype) == jnp.float32 for x in inputs) else TF32


def truncate_to_tf32(x: jax.Array) -> jax.Array:
    """fp32 ``x`` with the low 13 mantissa bits cleared: what an NVIDIA tensor core reads of an
    fp32 operand in a TF32 multiply (Triton issues the ``mma`` on the raw fp32 bits, no rounding
    ``cvt``), so the worst case of TF32, not round-to-nearest."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFE000), jnp.float32)


def kernel_dot(x: jax.Array, y: jax.Array, x_axis: int, y_axis: int, precision: Any, *,
               interpret: bool) -> jax.Array:
    """2-D ``x · y`` contracting ``x_axis`` with ``y_axis``, fp32 result, at ``precision``.

    In interpret mode (CPU, where the matrix units' algorithms do not exist) the device's
    numerics are emulated by rounding both operands as the hardware reads them and multiplying in
    fp32, also in the dots of the derivative (the device differentiates a dot into dots of the
    same precision): TF32 (GPU) truncates to 10 mantissa bits; ``Precision.DEFAULT`` (what the TPU
    kernels request for bf16 inputs, Mosaic's default: a single bf16 pass on the MXU, the worst
    case) rounds to bf16; TF32x3 and ``HIGHEST`` run as fp32. So the CPU tests check the
    rounding the kernels really do.
    """
    if interpret:
        if precision == TF32:
            return _emulated_dot(x, y, x_axis, y_axis, "tf32")
        if precision == jax.lax.Precision.DEFAULT:
            return _emulated_dot(x, y, x_axis, y_axis, "bf16")
        if isinstance(precision, jax.lax.DotAlgorithmPreset):
            precision = jax.lax.Precision.HIGHEST
    return _dot_f32(x, y, x_axis, y_axis, precision)


def _dot_f32(x, y, x_axis: int, y_axis: int, precision: Any) -> jax.Array:
    return jax.lax.dot_general(x, y, (((x_axis,), (y_axis,)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)


def _round_operand(x: jax.Array, rounding: str) -> jax.Array:
    if rounding == "tf32":
        return truncate_to_tf32(x)
    return jax.lax.reduce_precision(x.astype(jnp.float32), exponent_bits=8, mantissa_bits=7)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _emulated_dot(x, y, x_axis: int, y_axis: int, rounding: str) -> jax.Array:
    # custom_vjp: the truncation's own derivative is zero; the device differentiates a reduced-
    # precision dot into reduced-precision dots of the cotangent.
    return _dot_f32(_round_operand(x, rounding), _round_operand(y, rounding), x_axis, y_axis,
                    jax.lax.Precision.HIGHEST)


def _emulated_dot_fwd(x, y, x_axis, y_axis, rounding):
    return _emulated_dot(x, y, x_axis, y_axis, rounding), (x, y)


def _emulated_dot_bwd(x_axis, y_axis, rounding, residuals, d_out):
    x, y = residuals  # d_out [m, n]: m the free axis of x, n that of y
    d_x = _emulated_dot(d_out, y, 1, 1 - y_axis, rounding)  # [m, k]
    d_y = _emulated_dot(x, d_out, 1 - x_axis, 0, rounding)  # [k, n]
    return (d_x if x_axis == 1 else d_x.T).astype(x.dtype), \
        (d_y if y_axis == 0 else d_y.T).astype(y.dtype)


_emulated_dot.defvjp(_emulated_dot_fwd, _emulated_dot_bwd)
