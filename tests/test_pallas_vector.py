"""Tests of the Pallas RWKV-4 kernels (pallas_kernels/vector.py), both variants in interpret mode.

Chain of trust: the float64 loop of tests/test_wkv_vector.py -> wkv4_oracle (lax.scan) ->
wkv4_pallas (GPU/Triton and TPU/Mosaic variants run by Pallas' interpreters on CPU). The final
state (aa, bb, pp) is compared component by component and through the sums aa·e^pp, bb·e^pp it
stands for; gradients of k, v, log_decay, u and the initial (aa, bb, pp) against autodiff of the
oracle, with a loss that reads the final state through those sums (the loss of
test_wkv_vector's `loss_gradients`). Device lowering is checked by exporting for "cuda" and "tpu".
Errors use tests/helpers.py rel_err (max|Δ| / max|reference|).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_err
from pallas_kernels.platform import TRITON_CUSTOM_CALL, backend_platform, export_ahead_of_time
from pallas_kernels.vector import supports, wkv4_pallas
from rwkv_jax.wkv.vector import wkv4_oracle
from test_wkv_vector import assert_states_close, make_inputs, reference_wkv4

PLATFORMS = ("gpu", "tpu")
GRAD_NAMES = ("k", "v", "log_decay", "u", "aa", "bb", "pp")


@functools.lru_cache(maxsize=None)
def pallas(platform, chunk_size):
    return functools.partial(wkv4_pallas, platform=platform, chunk_size=chunk_size, interpret=True)


@functools.lru_cache(maxsize=None)
def _outputs_and_grads_fn(wkv):
    """Jitted `(inputs, cotangents, scale) -> (y, final_state, gradients)`: one compile for the
    forward and the backward. The loss is test_wkv_vector's `loss_gradients` loss,
    Σ y·g_y + Σ (aa·g_a + bb·g_b)·e^{pp − scale}: the final state enters through the sums it
    stands for, rescaled by a fixed scale (the oracle's final pp)."""

    def run(inputs, cotangent_y, cotangent_a, cotangent_b, scale):
        (y, (aa, bb, pp)), pullback = jax.vjp(wkv, *inputs)
        factor = jnp.exp(pp - scale)
        cotangent_state = (cotangent_a * factor, cotangent_b * factor,
                           (aa * cotangent_a + bb * cotangent_b) * factor)
        return y, (aa, bb, pp), pullback((cotangent_y, cotangent_state))

    return jax.jit(run)


def outputs_and_grads(wkv, inputs, seed=6):
    rng = np.random.default_rng(seed)
    k, *_, state = inputs
    cotangent_y = jnp.asarray(rng.standard_normal(k.shape), jnp.float32)
    cotangent_a, cotangent_b = (jnp.asarray(rng.standard_normal(state[0].shape), jnp.float32)
                                for _ in "ab")
    scale = jax.jit(wkv4_oracle)(*inputs)[1][2]
    return _outputs_and_grads_fn(wkv)(tuple(inputs), cotangent_y, cotangent_a, cotangent_b, scale)


def assert_matches_oracle(wkv, inputs, tolerance):
    """y, the final state and the gradients of k, v, log_decay, u and the initial (aa, bb, pp)
    against the oracle's."""
    y, final_state, grads = outputs_and_grads(wkv, inputs)
    y_ref, state_ref, grads_ref = outputs_and_grads(wkv4_oracle, inputs)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    assert all(s.shape == r.shape and s.dtype == jnp.float32 for s, r in zip(final_state, state_ref))
    assert rel_err(y, y_ref) <= tolerance
    assert_states_close(final_state, state_ref, tol=tolerance)
    flat, flat_ref = grads[:4] + tuple(grads[4]), grads_ref[:4] + tuple(grads_ref[4])
    inputs_flat = inputs[:4] + tuple(inputs[4])
    for name, grad, grad_ref, x in zip(GRAD_NAMES, flat, flat_ref, inputs_flat):
        assert grad.shape == x.shape and grad.dtype == x.dtype, name
        assert bool(jnp.all(jnp.isfinite(grad))), name
        if np.max(np.abs(np.asarray(grad_ref, np.float64))) == 0:  # e.g. the empty state's aa, bb, pp
            assert np.max(np.abs(np.asarray(grad, np.float64))) == 0, name
        else:
            assert rel_err(grad, grad_ref) <= tolerance, name


# (B, T, C), chunk per platform, state. T leaves a partial last chunk; C = 40 is padded to two
# 32-channel blocks on GPU and is one 40-channel block on TPU.
CASES = [
    pytest.param((2, 21, 40), {"gpu": 8, "tpu": 8}, "random", id="C40-random-state"),
    pytest.param((1, 19, 8), {"gpu": 5, "tpu": 8}, "zero", id="B1-empty-state"),
]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("shape, chunk_size, state", CASES)
def test_fp32_matches_oracle(platform, shape, chunk_size, state):
    """fp32: y, final state and all gradients within 1e-4 (largest seen ≈ 3e-7)."""
    inputs = make_inputs(*shape, seed=1, state=state)
    assert_matches_oracle(pallas(platform, chunk_size[platform]), inputs, tolerance=1e-4)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_large_keys_match_float64_reference(platform):
    """Keys up to ±200 (e^k overflows fp32 from k ≈ 88.7), many exactly at the bound: finite
    values and gradients, y within test_wkv_vector's rounding bound of the float64 loop."""
    max_key = 200.0
    k, v, log_decay, u, state = make_inputs(2, 30, 16, seed=7, key_scale=100.0)
    k = jnp.clip(k, -max_key, max_key).at[:, ::7].set(max_key)
    inputs = (k, v, log_decay, u, state)
    y, final_state, grads = outputs_and_grads(pallas(platform, 8), inputs)
    assert bool(jnp.all(jnp.isfinite(y))) and all(bool(jnp.all(jnp.isfinite(s))) for s in final_state)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    y_ref, _ = reference_wkv4(*inputs)
    assert rel_err(y, y_ref) <= 1e-5 * max_key / 60


@pytest.mark.parametrize("platform", PLATFORMS)
def test_bf16_inputs_match_oracle(platform):
    """bf16 k, v: fp32 outputs within 2e-2 of the oracle on the same bf16 inputs (the kernel
    upcasts on load, so the error is fp32 rounding); gradients come back in bf16."""
    k, v, log_decay, u, state = make_inputs(2, 20, 16, seed=9)
    inputs = (k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), log_decay, u, state)
    assert_matches_oracle(pallas(platform, 8), inputs, tolerance=2e-2)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_ahead_of_time(platform, dtype):
    """Forward and gradient lower to Triton (exported for "cuda") and to Mosaic ("tpu") at the
    default chunk, C = 256, T not a multiple of the chunk."""
    batch, seq_len, channels = 2, 50, 256
    row = jax.ShapeDtypeStruct((batch, channels), jnp.float32)
    args = [jax.ShapeDtypeStruct((batch, seq_len, channels), dtype)] * 2 + [
        jax.ShapeDtypeStruct((channels,), jnp.float32)] * 2 + [(row, row, row)]
    wkv = functools.partial(wkv4_pallas, platform=platform)

    def loss(*inputs):
        y, final_state = wkv(*inputs)
        return jnp.sum(y) + sum(jnp.sum(s) for s in final_state)

    kernel_call = TRITON_CUSTOM_CALL if platform == "gpu" else "tpu_custom_call"
    forward = export_ahead_of_time(wkv, platform, *args)
    gradient = export_ahead_of_time(jax.grad(loss, argnums=tuple(range(5))), platform, *args)
    assert forward.mlir_module().count(kernel_call) >= 1
    assert gradient.mlir_module().count(kernel_call) >= 2  # the forward and the backward kernel


def test_chunk_checks_and_supports():
    inputs = make_inputs(1, 8, 8, seed=3)
    with pytest.raises(ValueError, match="multiple of 8"):
        wkv4_pallas(*inputs, platform="tpu", chunk_size=12, interpret=True)
    for platform in PLATFORMS:
        assert supports(768, jnp.bfloat16, platform) and supports(40, jnp.float32, platform)
        assert not supports(64, jnp.float16, platform)
    assert not supports(64, jnp.float32, "cpu")


@pytest.mark.skipif(backend_platform() is None, reason="needs a GPU or TPU")
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)])
def test_compiled_on_device_matches_oracle(dtype, tolerance):
    """The compiled kernel (not the interpreter) on this machine's accelerator, default chunk,
    C = 256, T not a multiple of the chunk."""
    k, v, log_decay, u, state = make_inputs(2, 200, 256, seed=12)
    inputs = (k.astype(dtype), v.astype(dtype), log_decay, u, state)
    assert_matches_oracle(functools.partial(wkv4_pallas, platform=backend_platform()), inputs, tolerance)
