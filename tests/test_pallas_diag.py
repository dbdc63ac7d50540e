"""Tests of the Pallas RWKV-5/6 kernels (pallas_kernels/diag.py), both variants in interpret mode.

Chain of trust: the float64 NumPy loop of tests/test_wkv_diag.py -> wkv6_oracle (lax.scan) ->
wkv6_pallas (GPU/Triton and TPU/Mosaic variants run by Pallas' interpreters on CPU). Gradients
are checked against autodiff of the oracle with random cotangents on y AND the final state, for
r, logw, k, v, u and the initial state. Device lowering is checked by exporting for "cuda" and
"tpu" (this proves the jaxpr -> Triton/Mosaic lowering; the device compile needs hardware).
Errors use tests/helpers.py rel_err (max|Δ| / max|reference|).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_err
from pallas_kernels.diag import resolve_platform, supports, wkv6_pallas
from pallas_kernels.platform import TRITON_CUSTOM_CALL, backend_platform, export_ahead_of_time
from rwkv_jax.wkv.diag import wkv6_oracle
from test_wkv_diag import make_inputs, reference_wkv

PLATFORMS = ("gpu", "tpu")
ARG_NAMES = ("r", "logw", "k", "v", "u", "state")


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


@functools.lru_cache(maxsize=None)
def _outputs_and_grads_fn(fn):
    """Jitted `inputs, cotangents -> (y, final_state, gradients of all six inputs)`."""

    def run(inputs, cotangent_y, cotangent_state):
        (y, final_state), pullback = jax.vjp(fn, *inputs)
        return y, final_state, pullback((cotangent_y, cotangent_state))

    return jax.jit(run)


def outputs_and_grads(fn, inputs, seed=5):
    rng = np.random.default_rng(seed)
    r, *_, state = inputs
    cotangent_y = jnp.asarray(rng.standard_normal(r.shape), jnp.float32)
    cotangent_state = jnp.asarray(rng.standard_normal(state.shape), jnp.float32)
    return _outputs_and_grads_fn(fn)(tuple(inputs), cotangent_y, cotangent_state)


@functools.lru_cache(maxsize=None)
def pallas(platform, chunk_size):
    return functools.partial(wkv6_pallas, platform=platform, chunk_size=chunk_size, interpret=True)


def assert_matches_oracle(platform, chunk_size, inputs, tolerance):
    """y, final state and all six gradients of the kernel against the oracle's (on the same
    inputs); returns the largest error seen."""
    y, final_state, grads = outputs_and_grads(pallas(platform, chunk_size), inputs)
    y_ref, state_ref, grads_ref = outputs_and_grads(wkv6_oracle, inputs)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    assert final_state.shape == state_ref.shape and final_state.dtype == jnp.float32
    errors = {"y": rel_err(y, y_ref), "final_state": rel_err(final_state, state_ref)}
    for name, grad, grad_ref, x in zip(ARG_NAMES, grads, grads_ref, inputs):
        assert grad.shape == x.shape and grad.dtype == x.dtype, name
        assert bool(jnp.all(jnp.isfinite(grad))), name
        errors["d_" + name] = rel_err(grad, grad_ref)
    assert max(errors.values()) <= tolerance, errors
    return max(errors.values())


# (B, T, H, N), chunk per platform (None: the default, 64), decay. Every T leaves a partial last
# chunk; the TPU chunks of 24 and 8 use 8-token sub-blocks, the others 16.
CASES = [
    pytest.param((1, 40, 1, 64), {"gpu": 32, "tpu": 24}, "strongest", id="BH1-N64-strongest"),
    pytest.param((2, 21, 2, 32), {"gpu": 16, "tpu": 16}, "random", id="N32-v6"),
    pytest.param((1, 19, 2, 32), {"gpu": 16, "tpu": 8}, "constant", id="N32-v5"),
    pytest.param((1, 130, 1, 64), {"gpu": None, "tpu": None}, "strongest", id="default-chunk",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("shape, chunk_size, decay", CASES)
def test_fp32_matches_oracle(platform, shape, chunk_size, decay):
    """fp32: values, final state and all gradients within 1e-4 (largest seen ≈ 1e-6)."""
    inputs = make_inputs(shape, seed=0, decay=decay)
    assert_matches_oracle(platform, chunk_size[platform], inputs, tolerance=1e-4)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_strongest_decay_matches_float64_reference(platform):
    """logw = −200 beside logw ≈ −1e-3 inside every sub-block: values exact to fp32 rounding
    against the float64 loop (largest error seen ≈ 2e-7)."""
    inputs = make_inputs((1, 40, 1, 64), seed=0, decay="strongest")
    y, final_state = jax.jit(pallas(platform, 16 if platform == "gpu" else 8))(*inputs)
    y_ref, state_ref = reference_wkv(*inputs)
    assert rel_err(y, y_ref) <= 1e-5
    assert rel_err(final_state, state_ref) <= 1e-5


@pytest.mark.parametrize("platform", PLATFORMS)
def test_bf16_inputs_match_oracle(platform):
    """bf16 r, logw, k, v, u, state: fp32 outputs within 2e-2 of the oracle on the same bf16
    inputs; gradients come back in bf16."""
    inputs = tuple(x.astype(jnp.bfloat16) for x in make_inputs((2, 21, 1, 64), seed=1))
    assert_matches_oracle(platform, 16, inputs, tolerance=2e-2)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_split_sequence_carries_state(platform):
    """Two calls chained through the returned state equal one call over the whole sequence
    (default chunk: 64 on both platforms)."""
    r, logw, k, v, u, state = make_inputs((1, 150, 1, 32), seed=2)
    wkv = jax.jit(pallas(platform, None))
    y_full, state_full = wkv(r, logw, k, v, u, state)
    y_first, state_mid = wkv(*(x[:, :85] for x in (r, logw, k, v)), u, state)
    y_second, state_end = wkv(*(x[:, 85:] for x in (r, logw, k, v)), u, state_mid)
    assert rel_err(jnp.concatenate([y_first, y_second], axis=1), y_full) <= 1e-5
    assert rel_err(state_end, state_full) <= 1e-5


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_ahead_of_time(platform, dtype):
    """Forward and gradient lower to Triton (exported for "cuda") and to Mosaic ("tpu") at the
    default chunk, head size 64, T not a multiple of the chunk."""
    batch, seq_len, heads, head_size = 2, 100, 2, 64
    args = [jax.ShapeDtypeStruct((batch, seq_len, heads, head_size), dtype)] * 4 + [
        jax.ShapeDtypeStruct((heads, head_size), dtype),
        jax.ShapeDtypeStruct((batch, heads, head_size, head_size), jnp.float32),
    ]
    wkv = functools.partial(wkv6_pallas, platform=platform)

    def loss(*inputs):
        y, final_state = wkv(*inputs)
        return jnp.sum(y) + jnp.sum(final_state)

    kernel_call = TRITON_CUSTOM_CALL if platform == "gpu" else "tpu_custom_call"
    forward = export_ahead_of_time(wkv, platform, *args)
    gradient = export_ahead_of_time(jax.grad(loss, argnums=tuple(range(6))), platform, *args)
    assert forward.mlir_module().count(kernel_call) >= 1
    assert gradient.mlir_module().count(kernel_call) >= 2  # the forward and the backward kernel


def test_platform_resolution_and_chunk_checks():
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="interpret=True"):
            resolve_platform(None, interpret=False)
        assert resolve_platform(None, interpret=True) == "gpu"
    with pytest.raises(ValueError, match="platform"):
        resolve_platform("cpu", interpret=True)
    inputs = make_inputs((1, 8, 1, 32), seed=3)
    with pytest.raises(ValueError, match="power of two"):
        wkv6_pallas(*inputs, platform="gpu", chunk_size=24, interpret=True)
    with pytest.raises(ValueError, match="multiple of 8"):
        wkv6_pallas(*inputs, platform="tpu", chunk_size=12, interpret=True)


def test_supports_only_tested_configurations():
    for platform in PLATFORMS:
        assert supports(64, jnp.bfloat16, platform) and supports(32, jnp.float32, platform)
        assert not supports(128, jnp.float32, platform)
        assert not supports(64, jnp.float16, platform)
    assert not supports(64, jnp.float32, "cpu")


@pytest.mark.skipif(backend_platform() is None, reason="needs a GPU or TPU")
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("decay", ["random", "strongest", "constant"])
def test_compiled_on_device_matches_oracle(dtype, tolerance, decay):
    """The compiled kernel (not the interpreter) on this machine's accelerator, default chunk,
    head size 64, T not a multiple of the chunk."""
    inputs = tuple(x.astype(dtype) for x in make_inputs((2, 200, 3, 64), seed=11, decay=decay))
    wkv = functools.partial(wkv6_pallas, platform=backend_platform())
    y, final_state, grads = outputs_and_grads(wkv, inputs)
    y_ref, state_ref, grads_ref = outputs_and_grads(wkv6_oracle, inputs)
    errors = {"y": rel_err(y, y_ref), "final_state": rel_err(final_state, state_ref)}
    errors.update({"d_" + n: rel_err(g, g_ref) for n, g, g_ref in zip(ARG_NAMES, grads, grads_ref)})
    assert max(errors.values()) <= tolerance, errors
