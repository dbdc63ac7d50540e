"""Tests for the Pallas RWKV-7 kernels (pallas_kernels/dplr.py), both variants in interpret mode.

Chain of trust: the float64 NumPy loop of tests/test_wkv_dplr.py -> wkv7_oracle (lax.scan) ->
wkv7_pallas (GPU/Triton and TPU/Mosaic variants run by Pallas' interpreters on CPU). Gradients
are checked against autodiff of the oracle with random cotangents on y AND the final state, for
every input including the initial state. Device lowering is checked by exporting for "cuda" and
"tpu" (this proves the jaxpr -> Triton/Mosaic lowering; tests/test_triton_compile.py compiles the
GPU kernels on down to sm_90 cubins). Interpret mode emulates the GPU's TF32 matmuls for bf16 inputs.
Errors use tests/helpers.py rel_err (max|Δ| / max|reference|).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_err
from test_wkv_dplr import ARG_NAMES, make_inputs, numpy_reference
from pallas_kernels.dplr import default_chunk_size, supports, wkv7_pallas
from pallas_kernels.dplr_chunk import ChunkOps, unit_lower_inverse
from pallas_kernels.platform import TRITON_CUSTOM_CALL, backend_platform, export_ahead_of_time
from rwkv_jax.wkv.dplr import wkv7_oracle

PLATFORMS = ("gpu", "tpu")


@functools.lru_cache(maxsize=None)
def _outputs_and_grads_fn(fn):
    """Jitted ``inputs, cotangents -> (y, final_state, grads of all 7 inputs)``."""

    def run(inputs, cotangent_y, cotangent_state):
        (y, final_state), pullback = jax.vjp(fn, *inputs)
        return y, final_state, pullback((cotangent_y, cotangent_state))

    return jax.jit(run)


def outputs_and_grads(fn, inputs, seed=123):
    rng = np.random.default_rng(seed)
    batch, seq_len, heads, dim = inputs[0].shape
    cotangent_y = jnp.asarray(rng.standard_normal((batch, seq_len, heads, dim)), jnp.float32)
    cotangent_state = jnp.asarray(rng.standard_normal((batch, heads, dim, dim)), jnp.float32)
    return _outputs_and_grads_fn(fn)(tuple(inputs), cotangent_y, cotangent_state)


@functools.lru_cache(maxsize=None)
def pallas(platform, chunk_size):
    return functools.partial(wkv7_pallas, platform=platform, chunk_size=chunk_size, interpret=True)


def assert_matches_oracle(kernel, inputs, *, tolerance, reference_inputs=None):
    """y, final state and all seven gradients of ``kernel`` against the oracle's."""
    reference_inputs = inputs if reference_inputs is None else reference_inputs
    y, final_state, grads = outputs_and_grads(kernel, inputs)
    y_ref, state_ref, grads_ref = outputs_and_grads(wkv7_oracle, reference_inputs)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    assert final_state.shape == state_ref.shape and final_state.dtype == jnp.float32
    assert rel_err(y, y_ref) <= tolerance
    assert rel_err(final_state, state_ref) <= tolerance
    for name, grad, grad_ref, x in zip(ARG_NAMES, grads, grads_ref, inputs):
        assert grad.dtype == x.dtype, name
        assert np.all(np.isfinite(np.asarray(grad, np.float32))), name
        assert rel_err(grad, grad_ref) <= tolerance, name
    return y, final_state


# ---------------------------------------------------------------------------------------------
# The blocked substitution on its own.


@pytest.mark.parametrize("length, block", [(16, 16), (32, 16), (64, 16), (64, 8)])
def test_unit_lower_inverse_matches_float64_solve(length, block):
    # B̃-like entries near -1 (nearly parallel unit keys, α -> 1): the powers of A grow like
    # binomial coefficients, so any truncated or doubling power series would lose everything.
    rng = np.random.default_rng(length + block)
    strictly_lower = np.tril(-1.0 + 1e-3 * rng.standard_normal((length, length)), k=-1)
    ops = ChunkOps(precision=jax.lax.Precision.HIGHEST, native_cumsum=True)
    inverse = jax.jit(unit_lower_inverse, static_argnums=(0, 2))(
        ops, jnp.asarray(strictly_lower, jnp.float32), block
    )
    expected = np.linalg.inv(np.eye(length) - strictly_lower)
    assert rel_err(inverse, expected) <= 1e-6


# ---------------------------------------------------------------------------------------------
# Values and gradients, both variants.


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize(
    "shape, chunk_size, options",
    [
        ((2, 37, 1, 32), 16, {}),  # ragged last chunk, N = 32
        ((1, 70, 1, 64), 32, {"decay": "strongest"}),  # B·H = 1, logw at the RWKV-7 floor
        ((1, 80, 1, 64), 64, {"parallel_keys": True}),  # a -> -κ̂, b -> κ̂α with α -> 1
        ((1, 40, 2, 32), 16, {"parallel_keys": True, "decay": "strongest"}),
    ],
    ids=["ragged_n32", "strongest_decay_n64", "parallel_keys_n64", "parallel_keys_strongest"],
)
def test_values_and_gradients_match_oracle(platform, shape, chunk_size, options):
    inputs = make_inputs(11, *shape, **options)
    y, final_state = assert_matches_oracle(pallas(platform, chunk_size), inputs, tolerance=1e-4)
    # The outputs also hold against the float64 truth, not only against the fp32 oracle.
    y_truth, state_truth = numpy_reference(*inputs)
    assert rel_err(y, y_truth) <= 1e-5
    assert rel_err(final_state, state_truth) <= 1e-5


@pytest.mark.parametrize("platform", PLATFORMS)
def test_bf16_inputs(platform):
    inputs = make_inputs(12, 1, 24, 2, 32)
    inputs_bf16 = [jnp.asarray(x, jnp.bfloat16) for x in inputs[:-1]] + [inputs[-1]]
    # The oracle sees exactly the bf16-rounded values, upcast; gradients come back in bf16.
    rounded = [jnp.asarray(x, jnp.float32) for x in inputs_bf16]
    assert_matches_oracle(pallas(platform, 16), inputs_bf16, tolerance=2e-2, reference_inputs=rounded)


@pytest.mark.parametrize(
    "shape, chunk_size, options",
    [
        ((1, 70, 2, 64), 32, {"parallel_keys": True, "decay": "strongest"}),
        ((2, 45, 1, 64), 64, {"parallel_keys": True}),
    ],
    ids=["parallel_keys_strongest_l32", "parallel_keys_l64"],
)
def test_bf16_inputs_with_tf32_dots_hold_in_the_hard_cases(shape, chunk_size, options):
    # bf16 inputs make the GPU kernels run every data matmul as one TF32 pass, which interpret
    # mode emulates by truncating the operands: the nearly-parallel-keys solve must survive it.
    inputs = make_inputs(16, *shape, **options)
    inputs_bf16 = [jnp.asarray(x, jnp.bfloat16) for x in inputs[:-1]] + [inputs[-1]]
    rounded = [jnp.asarray(x, jnp.float32) for x in inputs_bf16]
    y, final_state = assert_matches_oracle(pallas("gpu", chunk_size), inputs_bf16, tolerance=2e-2,
                                           reference_inputs=rounded)
    y_ref, _ = jax.jit(wkv7_oracle)(*rounded)
    assert rel_err(y, y_ref) > 1e-5  # TF32 rounding is visible: the emulation is on


@pytest.mark.parametrize("platform", PLATFORMS)
def test_sequence_shorter_than_chunk(platform):
    inputs = make_inputs(13, 1, 5, 1, 32)
    assert_matches_oracle(pallas(platform, 16), inputs, tolerance=1e-4)


def test_calls_with_different_chunk_counts_in_turn_each_store_their_final_state():
    # jax 0.11.0-0.11.2 reuse a kernel's traced jaxpr across pallas_calls that differ only in the
    # grid (jax-ml/jax#40847), so a kernel that asked pl.num_programs() for the last chunk saw the
    # previous call's count and never stored the final state (NaN in TPU interpret mode).
    for seq_len in (37, 24, 70):  # 3, 2 and 5 chunks of 16
        inputs = make_inputs(17, 1, seq_len, 2, 32)
        y, final_state = pallas("tpu", 16)(*inputs)
        y_ref, state_ref = wkv7_oracle(*inputs)
        assert rel_err(final_state, state_ref) <= 1e-4, seq_len
        assert rel_err(y, y_ref) <= 1e-4, seq_len


def test_padding_leaves_final_state_exact_and_split_calls_compose():
    # T = 17 pads 15 identity tokens; carrying the state across two calls equals one call.
    inputs = make_inputs(14, 1, 33, 2, 32)
    kernel = jax.jit(pallas("gpu", 16))
    y_full, state_full = kernel(*inputs)
    y_first, state_mid = kernel(*(x[:, :17] for x in inputs[:-1]), inputs[-1])
    y_second, state_end = kernel(*(x[:, 17:] for x in inputs[:-1]), state_mid)
    assert rel_err(jnp.concatenate([y_first, y_second], axis=1), y_full) <= 1e-5
    assert rel_err(state_end, state_full) <= 1e-5


def test_empty_sequence_returns_initial_state():
    inputs = make_inputs(15, 1, 0, 2, 32)
    y, final_state = wkv7_pallas(*inputs, interpret=True)
    assert y.shape == (1, 0, 2, 32)
    np.testing.assert_array_equal(final_state, inputs[-1])


# ---------------------------------------------------------------------------------------------
# Compiled kernels on a real accelerator (skipped on CPU): the device's own matmul units (TF32x3
# for fp32 inputs, TF32 for bf16 on a GPU; interpret mode only emulates them) run only here.

@pytest.mark.skipif(backend_platform() is None, reason="needs a GPU or TPU")
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize(
    "options", [{}, {"decay": "strongest"}, {"parallel_keys": True}],
    ids=["random", "strongest_decay", "parallel_keys"],
)
def test_compiled_kernel_on_device_matches_oracle(options, chunk_size):
    inputs = make_inputs(19, 2, 300, 3, 64, **options)
    device_kernel = functools.partial(wkv7_pallas, chunk_size=chunk_size)
    y, final_state, grads = outputs_and_grads(device_kernel, inputs)
    y_ref, state_ref, grads_ref = outputs_and_grads(wkv7_oracle, inputs)
    assert rel_err(y, y_ref) <= 1e-4
    assert rel_err(final_state, state_ref) <= 1e-4
    for name, grad, grad_ref in zip(ARG_NAMES, grads, grads_ref):
        assert rel_err(grad, grad_ref) <= 1e-4, name


@pytest.mark.skipif(backend_platform() is None, reason="needs a GPU or TPU")
@pytest.mark.parametrize(
    "options", [{}, {"parallel_keys": True, "decay": "strongest"}],
    ids=["random", "parallel_keys_strongest"],
)
def test_compiled_kernel_on_device_with_bf16_inputs(options):
    # The training case: bf16 inputs, default chunk, one TF32 pass per data matmul on a GPU.
    inputs = make_inputs(20, 2, 300, 3, 64, **options)
    inputs_bf16 = [jnp.asarray(x, jnp.bfloat16) for x in inputs[:-1]] + [inputs[-1]]
    rounded = [jnp.asarray(x, jnp.float32) for x in inputs_bf16]
    assert_matches_oracle(wkv7_pallas, inputs_bf16, tolerance=2e-2, reference_inputs=rounded)


# ---------------------------------------------------------------------------------------------
# Options and their errors.


def test_cpu_without_interpret_raises():
    if jax.default_backend() != "cpu":
        pytest.skip("only meaningful without an accelerator")
    inputs = make_inputs(16, 1, 4, 1, 32)
    with pytest.raises(ValueError, match="interpret=True"):
        wkv7_pallas(*inputs)


def test_default_chunk_is_16_tokens_only_for_all_fp32_inputs_on_gpu():
    # fp32 inputs take three TF32 passes per matmul; 32-token chunks then spill (see the function).
    fp32 = [jnp.zeros((1, 4, 1, 32), jnp.float32)] * 6
    one_bf16 = [fp32[0].astype(jnp.bfloat16)] + fp32[1:]
    assert default_chunk_size("gpu", *fp32) == 16
    assert default_chunk_size("gpu", *one_bf16) == 32
    assert default_chunk_size("tpu", *fp32) == default_chunk_size("tpu", *one_bf16) == 64


@pytest.mark.parametrize("platform, chunk_size", [("gpu", 24), ("gpu", 128), ("tpu", 12), ("tpu", 128)])
def test_invalid_chunk_size_raises(platform, chunk_size):
    inputs = make_inputs(17, 1, 4, 1, 32)
    with pytest.raises(ValueError, match="chunk_size"):
        wkv7_pallas(*inputs, platform=platform, chunk_size=chunk_size, interpret=True)


def test_unknown_platform_raises():
    inputs = make_inputs(18, 1, 4, 1, 32)
    with pytest.raises(ValueError, match="platform"):
        wkv7_pallas(*inputs, platform="cuda", interpret=True)


def test_supports_exactly_the_tested_configurations():
    for platform in PLATFORMS:
        for dtype in (jnp.float32, jnp.bfloat16):
            assert supports(32, dtype, platform) and supports(64, dtype, platform)
        assert not supports(128, jnp.float32, platform)
        assert not supports(64, jnp.float16, platform)
    assert not supports(64, jnp.float32, "cpu")


# ---------------------------------------------------------------------------------------------
# Ahead-of-time lowering for the real devices (no device needed).


@pytest.mark.parametrize("platform", PLATFORMS)
def test_exports_forward_and_gradient_for_device(platform):
    batch, seq_len, heads, dim = 2, 100, 3, 64
    tokens = jax.ShapeDtypeStruct((batch, seq_len, heads, dim), jnp.bfloat16)
    state = jax.ShapeDtypeStruct((batch, heads, dim, dim), jnp.float32)
    forward = functools.partial(wkv7_pallas, platform=platform)

    def loss(*args):
        y, final_state = forward(*args)
        return jnp.sum(y) + jnp.sum(final_state)

    kernel_call = "tpu_custom_call" if platform == "tpu" else TRITON_CUSTOM_CALL
    forward_module = export_ahead_of_time(forward, platform, *[tokens] * 6, state).mlir_module()
    grad_module = export_ahead_of_time(jax.grad(loss, argnums=tuple(range(7))), platform,
                                       *[tokens] * 6, state).mlir_module()
    assert forward_module.count(kernel_call) >= 2  # chunk summaries, then the state pass
    assert grad_module.count(kernel_call) >= 4  # and the cotangent pass, then the gradients

