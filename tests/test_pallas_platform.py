"""The kernels' matmul precisions and their interpret-mode emulation (pallas_kernels/platform.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.platform import TF32, TF32_X3, gpu_data_precision, kernel_dot, truncate_to_tf32


def test_gpu_data_precision_is_tf32x3_only_for_all_fp32_inputs():
    fp32, bf16 = jnp.zeros(2, jnp.float32), jnp.zeros(2, jnp.bfloat16)
    assert gpu_data_precision(fp32, fp32) == TF32_X3
    assert gpu_data_precision(fp32, bf16) == TF32
    assert gpu_data_precision(bf16) == TF32


def test_truncate_to_tf32_keeps_ten_mantissa_bits_rounding_toward_zero():
    x = jnp.asarray([1.0 + 2.0**-10, 1.0 + 2.0**-11 + 2.0**-12, -(1.0 + 2.0**-11 + 2.0**-12), 3.0 + 2.0**-22],
                    jnp.float32)
    np.testing.assert_array_equal(truncate_to_tf32(x), [1.0 + 2.0**-10, 1.0, -1.0, 3.0])


@pytest.mark.parametrize("precision", ["tf32", "tpu_default_bf16"])
@pytest.mark.parametrize("x_axis, y_axis", [(1, 0), (1, 1), (0, 0), (0, 1)])
def test_emulated_dots_and_their_gradients_round_every_operand(x_axis, y_axis, precision):
    rng = np.random.default_rng(x_axis * 2 + y_axis)
    x = jnp.asarray(rng.standard_normal((6, 4) if x_axis == 1 else (4, 6)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((4, 5) if y_axis == 0 else (5, 4)), jnp.float32)
    as_mk = lambda a: a if x_axis == 1 else a.T  # noqa: E731 - x as [m, k]
    as_kn = lambda b: b if y_axis == 0 else b.T  # noqa: E731 - y as [k, n]
    if precision == "tf32":  # the GPU's TF32: truncated to 10 mantissa bits
        setting, t = TF32, lambda a: np.asarray(truncate_to_tf32(a), np.float64)  # noqa: E731
    else:  # the TPU's default for fp32 operands, one bf16 pass: rounded to nearest bf16
        setting = jax.lax.Precision.DEFAULT
        t = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)  # noqa: E731

    out, pullback = jax.vjp(lambda a, b: kernel_dot(a, b, x_axis, y_axis, setting, interpret=True), x, y)
    np.testing.assert_allclose(out, t(as_mk(x)) @ t(as_kn(y)), rtol=1e-6, atol=1e-6)
    d_out = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    d_x, d_y = pullback(d_out)
    np.testing.assert_allclose(as_mk(d_x), t(d_out) @ t(as_kn(y)).T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(as_kn(d_y), t(as_mk(x)).T @ t(d_out), rtol=1e-6, atol=1e-6)
    # Off the interpreter and for TF32x3 the dot is an ordinary fp32 one.
    exact = kernel_dot(x, y, x_axis, y_axis, TF32_X3, interpret=True)
    np.testing.assert_allclose(exact, np.asarray(as_mk(x), np.float64) @ np.asarray(as_kn(y), np.float64),
                               rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(exact - out))) > 0
