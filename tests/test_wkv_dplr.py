"""Tests for the RWKV-7 DPLR recurrence (rwkv_jax/wkv/dplr.py).

Chain of trust: an independent float64 NumPy loop over the equations -> wkv7_oracle (lax.scan) ->
wkv7_parallel (chunked) and wkv7_step. Errors are relative: max|Δ| / max|reference|.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax.wkv.dplr import (
    RWKV7_MIN_LOG_DECAY,
    _solve_unit_lower,
    wkv7_oracle,
    wkv7_parallel,
    wkv7_step,
)

ARG_NAMES = ("r", "logw", "k", "v", "a", "b", "state")

oracle = jax.jit(wkv7_oracle)
parallel = jax.jit(wkv7_parallel, static_argnames="chunk_size")
step = jax.jit(wkv7_step)


def relative_error(actual, reference) -> float:
    actual = np.asarray(actual, np.float64)
    reference = np.asarray(reference, np.float64)
    return float(np.max(np.abs(actual - reference)) / np.max(np.abs(reference)))


def make_inputs(
    seed: int,
    batch: int,
    seq_len: int,
    heads: int,
    dim: int,
    *,
    decay: str = "random",
    parallel_keys: bool = False,
    state_scale: float = 1.0,
) -> tuple[np.ndarray, ...]:
    """RWKV-7-shaped inputs (r, logw, k, v, a, b, state) as float32 NumPy arrays.

    a = -κ̂, b = κ̂ α with κ̂ unit per head and α ∈ (0, 1); logw = -e^{-0.5} σ(3·noise).
    decay: "random", "strongest" (logw at its RWKV-7 floor everywhere) or "weakest" (logw = -1e-6:
    nothing is forgotten, so with parallel_keys only the projection limits the state).
    parallel_keys: κ̂ is nearly the same unit vector at every step and α → 1, so the transition
    diag(w) + a bᵀ is close to diag(w) - κ̂κ̂ᵀ (a near-projection), the case that breaks
    power-series inverses.
    """
    rng = np.random.default_rng(seed)
    shape = (batch, seq_len, heads, dim)

    def sigmoid(x):
        return 1.0 / (1.0 + np.exp(-x))

    if parallel_keys:
        shared_direction = rng.standard_normal((batch, 1, heads, dim))
        kappa = shared_direction + 1e-3 * rng.standard_normal(shape)
        alpha = 1.0 - 1e-4 * rng.random(shape)
    else:
        kappa = rng.standard_normal(shape)
        alpha = sigmoid(rng.standard_normal(shape))
    kappa_hat = kappa / np.linalg.norm(kappa, axis=-1, keepdims=True)
    if decay == "strongest":
        logw = np.full(shape, RWKV7_MIN_LOG_DECAY)
    elif decay == "weakest":
        logw = np.full(shape, -1e-6)
    else:
        logw = -np.exp(-0.5) * sigmoid(3.0 * rng.standard_normal(shape))
    r, k, v = (rng.standard_normal(shape) for _ in range(3))
    state = state_scale * rng.standard_normal((batch, heads, dim, dim))
    return tuple(
        x.astype(np.float32) for x in (r, logw, k, v, -kappa_hat, kappa_hat * alpha, state)
    )


def numpy_reference(r, logw, k, v, a, b, state):
    """Float64 loops over the defining equations, independent of the JAX code.

    S[i,j] <- S[i,j] w[j] + (Σ_c S[i,c] a[c]) b[j] + v[i] k[j];  y[i] = Σ_j S[i,j] r[j].
    """
    r, logw, k, v, a, b, state = (np.asarray(x, np.float64) for x in (r, logw, k, v, a, b, state))
    batch, seq_len, heads, _ = r.shape
    y = np.zeros_like(r)
    final_state = state.copy()
    for bi in range(batch):
        for h in range(heads):
            s = state[bi, h].copy()
            for t in range(seq_len):
                sa = s @ a[bi, t, h]
                s = (
                    s * np.exp(logw[bi, t, h])[None, :]
                    + np.outer(sa, b[bi, t, h])
                    + np.outer(v[bi, t, h], k[bi, t, h])
                )
                y[bi, t, h] = s @ r[bi, t, h]
            final_state[bi, h] = s
    return y, final_state


def loss_and_cotangent_fn(fn, seed, y_shape, state_shape):
    """Scalar <y, cy> + <S_T, cS> with random cotangents, so grads check the full VJP."""
    rng = np.random.default_rng(seed)
    cotangent_y = jnp.asarray(rng.standard_normal(y_shape), jnp.float32)
    cotangent_state = jnp.asarray(rng.standard_normal(state_shape), jnp.float32)

    def loss(*args):
        y, final_state = fn(*args)
        return jnp.sum(y * cotangent_y) + jnp.sum(final_state * cotangent_state)

    return loss


@functools.lru_cache(maxsize=None)
def _grad_fns(chunk_size):
    """Jitted all-argument gradients of oracle and parallel for fixed random cotangents."""

    def grads(fn, *args):
        loss = loss_and_cotangent_fn(fn, 123, args[0].shape, args[-1].shape)
        return jax.grad(loss, argnums=tuple(range(7)))(*args)

    return (
        jax.jit(functools.partial(grads, wkv7_oracle)),
        jax.jit(functools.partial(grads, functools.partial(wkv7_parallel, chunk_size=chunk_size))),
    )


# ---------------------------------------------------------------------------------------------
# Oracle and step against the float64 reference.


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 37, 2, 16), (1, 64, 1, 64)])
def test_oracle_matches_float64_reference(shape):
    inputs = make_inputs(0, *shape)
    y_ref, state_ref = numpy_reference(*inputs)
    y, final_state = oracle(*inputs)
    assert y.dtype == jnp.float32 and final_state.dtype == jnp.float32
    assert relative_error(y, y_ref) <= 1e-5
    assert relative_error(final_state, state_ref) <= 1e-5


def test_step_repeated_equals_oracle():
    r, logw, k, v, a, b, state = make_inputs(2, 2, 9, 2, 16)
    y_oracle, state_oracle = oracle(r, logw, k, v, a, b, state)
    y_steps = []
    for t in range(r.shape[1]):
        y_t, state = step(r[:, t], logw[:, t], k[:, t], v[:, t], a[:, t], b[:, t], state)
        y_steps.append(y_t)
    assert relative_error(jnp.stack(y_steps, axis=1), y_oracle) <= 1e-6
    assert relative_error(state, state_oracle) <= 1e-6


# ---------------------------------------------------------------------------------------------
# Chunked form against the oracle.


@pytest.mark.parametrize(
    "shape, chunk_size, state_scale",
    [
        ((1, 1, 1, 8), 32, 1.0),  # T < chunk
        ((2, 17, 2, 16), 32, 1.0),
        ((2, 100, 3, 64), 32, 1.0),  # ragged last chunk
        ((1, 33, 1, 32), 16, 1.0),  # B·H = 1, one token spills into a new chunk
        ((2, 64, 2, 16), 16, 1.0),  # T a multiple of the chunk
        ((2, 64, 2, 16), 16, 0.0),  # zero initial state
        ((1, 200, 2, 64), 64, 1.0),
    ],
)
def test_parallel_matches_oracle(shape, chunk_size, state_scale):
    inputs = make_inputs(3, *shape, state_scale=state_scale)
    y_oracle, state_oracle = oracle(*inputs)
    y, final_state = parallel(*inputs, chunk_size=chunk_size)
    assert y.shape == shape and y.dtype == jnp.float32
    assert final_state.shape == inputs[-1].shape and final_state.dtype == jnp.float32
    assert relative_error(y, y_oracle) <= 1e-5
    assert relative_error(final_state, state_oracle) <= 1e-5


@pytest.mark.parametrize("chunk_size", [32, 64])
@pytest.mark.parametrize(
    "options",
    [
        {"decay": "strongest"},
        {"parallel_keys": True},
        {"parallel_keys": True, "decay": "strongest"},
        {"parallel_keys": True, "decay": "weakest"},
    ],
    ids=["strongest_decay", "parallel_keys", "parallel_keys_strongest", "parallel_keys_weakest"],
)
def test_hard_cases_match_float64_reference(options, chunk_size):
    # Both fp32 implementations against float64: with nothing decaying, the oracle's own
    # sequential rounding grows with T (≈1.5e-6 on CPU, ≈7e-6 on an H200 at T = 160), so the
    # chunked form is held to the truth rather than to the oracle.
    inputs = make_inputs(4, 1, 160, 2, 64, **options)
    y_ref, state_ref = numpy_reference(*inputs)
    for fn in (oracle, functools.partial(parallel, chunk_size=chunk_size)):
        y, final_state = fn(*inputs)
        assert relative_error(y, y_ref) <= 1e-5
        assert relative_error(final_state, state_ref) <= 1e-5


def test_parallel_long_sequence():
    inputs = make_inputs(5, 1, 4096, 1, 64, parallel_keys=True)
    y_oracle, state_oracle = oracle(*inputs)
    y, final_state = parallel(*inputs, chunk_size=64)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(final_state))
    assert relative_error(y, y_oracle) <= 1e-5
    assert relative_error(final_state, state_oracle) <= 1e-5


def test_empty_sequence_returns_initial_state():
    inputs = make_inputs(9, 1, 0, 2, 8)
    for fn in (oracle, parallel):
        y, final_state = fn(*inputs)
        assert y.shape == (1, 0, 2, 8)
        np.testing.assert_array_equal(final_state, inputs[-1])


def test_split_sequence_with_carried_state_equals_one_call():
    inputs = make_inputs(6, 2, 50, 2, 16)
    split = 23
    first = [x[:, :split] for x in inputs[:-1]]
    second = [x[:, split:] for x in inputs[:-1]]
    for fn in (oracle, functools.partial(parallel, chunk_size=16)):
        y_full, state_full = fn(*inputs)
        y_first, state_mid = fn(*first, inputs[-1])
        y_second, state_end = fn(*second, state_mid)
        assert relative_error(jnp.concatenate([y_first, y_second], axis=1), y_full) <= 1e-5
        assert relative_error(state_end, state_full) <= 1e-5


def test_bf16_inputs():
    inputs = make_inputs(7, 1, 40, 2, 32)
    inputs_bf16 = [jnp.asarray(x, jnp.bfloat16) for x in inputs[:-1]] + [inputs[-1]]
    # The reference sees exactly the bf16-rounded values, upcast.
    inputs_rounded = [jnp.asarray(x, jnp.float32) for x in inputs_bf16]
    y_ref, state_ref = oracle(*inputs_rounded)
    for fn in (oracle, functools.partial(parallel, chunk_size=16)):
        y, final_state = fn(*inputs_bf16)
        assert y.dtype == jnp.float32 and final_state.dtype == jnp.float32
        assert relative_error(y, y_ref) <= 1e-5
        assert relative_error(final_state, state_ref) <= 1e-5
    y_t, state_t = step(*(x[:, 0] for x in inputs_bf16[:-1]), inputs_bf16[-1])
    assert y_t.dtype == jnp.float32 and state_t.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Gradients (plain autodiff through the chunked form) against the oracle's.


@pytest.mark.parametrize(
    "shape, chunk_size, options",
    [
        ((2, 40, 2, 16), 16, {}),
        ((1, 70, 1, 64), 32, {}),
        ((1, 130, 1, 64), 64, {"decay": "strongest"}),
        ((1, 130, 1, 64), 64, {"parallel_keys": True}),
        ((1, 130, 1, 64), 64, {"parallel_keys": True, "decay": "weakest"}),
    ],
    ids=["small", "n64", "strongest_decay", "parallel_keys", "parallel_keys_weakest"],
)
def test_parallel_gradients_match_oracle(shape, chunk_size, options):
    inputs = make_inputs(8, *shape, **options)
    oracle_grads, parallel_grads = _grad_fns(chunk_size)
    expected = oracle_grads(*inputs)
    actual = parallel_grads(*inputs)
    for name, g_actual, g_expected in zip(ARG_NAMES, actual, expected):
        assert np.all(np.isfinite(g_actual)), name
        assert relative_error(g_actual, g_expected) <= 1e-4, name


@pytest.mark.parametrize("use_substitution", [True, False], ids=["jnp_substitution", "library_solve"])
def test_unit_lower_solve_and_its_gradients_match_float64(use_substitution):
    # Both ways the parallel form solves (I - B̃) x = rhs: the jnp substitution (CPU backends) and
    # jax.lax.linalg.triangular_solve (cuBLAS on a GPU; here LAPACK, at a batch of 2, far below
    # the size at which jaxlib 0.10's CPU solve can deadlock). Entries near -1 make the inverse
    # grow like binomial coefficients, so a sloppy solve would show.
    rng = np.random.default_rng(3)
    length, width = 16, 5
    strictly_lower = np.tril(-1.0 + 1e-2 * rng.standard_normal((2, length, length)), k=-1) / 4
    rhs = rng.standard_normal((2, length, width))
    cotangent = rng.standard_normal((2, length, width))
    solve = functools.partial(_solve_unit_lower, use_substitution=use_substitution)
    x, pullback = jax.vjp(solve, jnp.asarray(strictly_lower, jnp.float32), jnp.asarray(rhs, jnp.float32))
    d_matrix, d_rhs = pullback(jnp.asarray(cotangent, jnp.float32))

    system = np.eye(length) - strictly_lower
    x_ref = np.linalg.solve(system, rhs)
    d_rhs_ref = np.linalg.solve(np.swapaxes(system, -1, -2), cotangent)
    # x = (I - A)⁻¹ rhs: dA = d_rhs xᵀ, kept on the strictly lower part A lives on.
    d_matrix_ref = np.tril(d_rhs_ref @ np.swapaxes(x_ref, -1, -2), k=-1)
    assert relative_error(x, x_ref) <= 1e-5
    assert relative_error(d_rhs, d_rhs_ref) <= 1e-5
    assert relative_error(np.tril(np.asarray(d_matrix), k=-1), d_matrix_ref) <= 1e-5


def test_parallel_form_with_the_library_solve_matches_oracle(monkeypatch):
    # The parallel form as it runs off CPU (the solve is picked from the default backend at trace
    # time): values and every gradient against the oracle. B·H·T/L = 2·1·3 keeps the CPU LAPACK
    # solve far from jaxlib 0.10's deadlock size.
    inputs = make_inputs(9, 2, 40, 1, 16, parallel_keys=True)
    expected_y, expected_state = oracle(*inputs)
    expected_grads = _grad_fns(16)[0](*inputs)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    y, final_state = jax.jit(functools.partial(wkv7_parallel, chunk_size=16))(*inputs)
    grads = _grad_fns(16)[1](*inputs)
    assert relative_error(y, expected_y) <= 1e-5
    assert relative_error(final_state, expected_state) <= 1e-5
    for name, actual, expected in zip(ARG_NAMES, grads, expected_grads):
        assert relative_error(actual, expected) <= 1e-4, name
