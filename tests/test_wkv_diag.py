"""Tests of the RWKV-5/6 WKV recurrence (rwkv_jax/wkv/diag.py).

Chain of trust: a float64 NumPy loop written from the equations checks `wkv6_oracle`; the
oracle then checks `wkv6_step` and `wkv6_parallel` (values and gradients).
Errors are relative to the reference's scale: max|Δ| / max|ref|.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax.wkv.diag import wkv6_oracle, wkv6_parallel, wkv6_step

oracle = jax.jit(wkv6_oracle)
parallel = jax.jit(wkv6_parallel, static_argnames="chunk_size")


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    # On GPUs the default matmul precision may be TF32; the tolerances here assume fp32.
    with jax.default_matmul_precision("highest"):
        yield


def relative_error(actual, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


def reference_wkv(r, logw, k, v, u, state):
    """Float64 loop over batch, head and time, straight from the equations:
    y_t[j] = Σ_i r_t[i] (u[i] k_t[i] v_t[j] + S[i, j]);  S ← diag(exp(logw_t)) S + k_t v_tᵀ."""
    r, logw, k, v, u, state = (np.asarray(a, np.float64) for a in (r, logw, k, v, u, state))
    batch, seq_len, heads, _ = r.shape
    y = np.zeros_like(r)
    final_state = state.copy()
    for b in range(batch):
        for h in range(heads):
            s = state[b, h].copy()
            for t in range(seq_len):
                kv = np.outer(k[b, t, h], v[b, t, h])
                y[b, t, h] = r[b, t, h] @ (u[h][:, None] * kv + s)
                s = np.exp(logw[b, t, h])[:, None] * s + kv
            final_state[b, h] = s
    return y, final_state


def make_inputs(shape, seed, decay="random"):
    """Random (r, logw, k, v, u, state) in fp32.

    decay: "random"   — v6-like logw = −exp(w̃), w̃ ∈ [−6, 2): decays from 0.998 to e^{−7};
           "strongest" — per token and channel either −200 (underflows to 0) or ≈ −1e-3, so
                         vanishing and near-1 decays mix inside every chunk;
           "constant"  — v5: one logw per (head, channel), the same for every token.
    """
    batch, seq_len, heads, head_size = shape
    rng = np.random.default_rng(seed)
    r, k, v = (rng.standard_normal(shape) for _ in range(3))
    u = 0.5 * rng.standard_normal((heads, head_size))
    state = rng.standard_normal((batch, heads, head_size, head_size))
    if decay == "random":
        logw = -np.exp(rng.uniform(-6.0, 2.0, shape))
    elif decay == "strongest":
        logw = np.where(rng.random(shape) < 0.5, -200.0, -1e-3 * rng.random(shape))
    elif decay == "constant":
        logw = np.broadcast_to(-np.exp(rng.uniform(-6.0, 1.0, (heads, head_size))), shape)
    else:
        raise ValueError(decay)
    return tuple(jnp.asarray(a, jnp.float32) for a in (r, logw, k, v, u, state))


@pytest.mark.parametrize("decay", ["random", "strongest", "constant"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 17, 2, 16), (1, 40, 1, 64)])
def test_oracle_matches_float64_reference(shape, decay):
    inputs = make_inputs(shape, seed=0, decay=decay)
    y, final_state = oracle(*inputs)
    y_ref, state_ref = reference_wkv(*inputs)
    assert y.dtype == final_state.dtype == jnp.float32
    assert relative_error(y, y_ref) <= 1e-5
    assert relative_error(final_state, state_ref) <= 1e-5


@pytest.mark.parametrize(
    "shape, chunk_size",
    [
        ((1, 1, 1, 8), 16),
        ((2, 17, 2, 16), 16),
        ((2, 100, 3, 64), 16),
        ((1, 33, 1, 32), 8),
        ((1, 32, 1, 16), 16),  # T a multiple of the chunk, B·H = 1
    ],
)
@pytest.mark.parametrize("decay", ["random", "strongest", "constant"])
def test_parallel_matches_oracle(shape, chunk_size, decay):
    inputs = make_inputs(shape, seed=1, decay=decay)
    y, final_state = parallel(*inputs, chunk_size=chunk_size)
    y_ref, state_ref = oracle(*inputs)
    assert y.shape == shape and final_state.shape == state_ref.shape
    assert relative_error(y, y_ref) <= 1e-5
    assert relative_error(final_state, state_ref) <= 1e-5


def test_step_repeated_matches_oracle():
    inputs = make_inputs((2, 9, 2, 16), seed=2)
    r, logw, k, v, u, state = inputs
    step = jax.jit(wkv6_step)
    ys = []
    for t in range(r.shape[1]):
        y_t, state = step(r[:, t], logw[:, t], k[:, t], v[:, t], u, state)
        ys.append(y_t)
    y_ref, state_ref = oracle(*inputs)
    assert relative_error(jnp.stack(ys, axis=1), y_ref) <= 1e-6
    assert relative_error(state, state_ref) <= 1e-6


@pytest.mark.parametrize("split", [16, 21])  # at a chunk boundary and inside a chunk
def test_parallel_split_sequence_carries_state(split):
    r, logw, k, v, u, state = make_inputs((2, 50, 2, 16), seed=3)
    y_full, state_full = parallel(r, logw, k, v, u, state)
    first = (a[:, :split] for a in (r, logw, k, v))
    second = (a[:, split:] for a in (r, logw, k, v))
    y_first, state_mid = parallel(*first, u, state)
    y_second, state_end = parallel(*second, u, state_mid)
    assert relative_error(jnp.concatenate([y_first, y_second], axis=1), y_full) <= 1e-5
    assert relative_error(state_end, state_full) <= 1e-5


def loss_gradients(wkv, inputs, seed):
    """Gradients w.r.t. (r, logw, k, v, u, state) of Σ y·g_y + Σ S_T·g_S with random g."""
    rng = np.random.default_rng(seed)
    r, _, _, _, _, state = inputs
    y_cotangent = jnp.asarray(rng.standard_normal(r.shape), jnp.float32)
    state_cotangent = jnp.asarray(rng.standard_normal(state.shape), jnp.float32)

    def loss(*args):
        y, final_state = wkv(*args)
        return jnp.sum(y * y_cotangent) + jnp.sum(final_state * state_cotangent)

    return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*inputs)


@pytest.mark.parametrize("decay", ["random", "strongest", "constant"])
@pytest.mark.parametrize("shape, chunk_size", [((2, 17, 2, 16), 16), ((1, 33, 1, 32), 8)])
def test_parallel_gradients_match_oracle(shape, chunk_size, decay):
    inputs = make_inputs(shape, seed=4, decay=decay)
    grads = loss_gradients(lambda *a: wkv6_parallel(*a, chunk_size=chunk_size), inputs, seed=5)
    grads_ref = loss_gradients(wkv6_oracle, inputs, seed=5)
    for name, grad, grad_ref in zip(["r", "logw", "k", "v", "u", "state"], grads, grads_ref):
        assert bool(jnp.all(jnp.isfinite(grad))), name
        assert relative_error(grad, grad_ref) <= 1e-4, name


def test_bf16_inputs_give_fp32_outputs():
    inputs = make_inputs((2, 20, 2, 16), seed=6)
    bf16_inputs = tuple(a.astype(jnp.bfloat16) for a in inputs)
    y, final_state = parallel(*bf16_inputs)
    y_ref, state_ref = oracle(*bf16_inputs)
    assert y.dtype == final_state.dtype == jnp.float32
    assert relative_error(y, y_ref) <= 1e-5
    assert relative_error(final_state, state_ref) <= 1e-5
    y_step, state_step = wkv6_step(*(a[:, 0] for a in bf16_inputs[:4]), *bf16_inputs[4:])
    assert y_step.dtype == state_step.dtype == jnp.float32


def test_long_sequence_is_finite_and_matches_oracle():
    inputs = make_inputs((1, 4096, 2, 16), seed=7)
    y, final_state = parallel(*inputs)
    assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.all(jnp.isfinite(final_state)))
    y_ref, state_ref = oracle(*inputs)
    assert relative_error(y, y_ref) <= 1e-5
    assert relative_error(final_state, state_ref) <= 1e-5
    grads = loss_gradients(wkv6_parallel, inputs, seed=8)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


@pytest.mark.parametrize("chunk_size", [1, 12, 64])  # degenerate, not a power of two, ≈ N
@pytest.mark.parametrize("decay", ["random", "strongest", "constant"])
def test_parallel_chunk_sizes_match_oracle(chunk_size, decay):
    inputs = make_inputs((2, 70, 2, 16), seed=9, decay=decay)
    y, final_state = parallel(*inputs, chunk_size=chunk_size)
    y_ref, state_ref = oracle(*inputs)
    assert relative_error(y, y_ref) <= 1e-5
    assert relative_error(final_state, state_ref) <= 1e-5
    grads = loss_gradients(lambda *a: wkv6_parallel(*a, chunk_size=chunk_size), inputs, seed=10)
    grads_ref = loss_gradients(wkv6_oracle, inputs, seed=10)
    for name, grad, grad_ref in zip(["r", "logw", "k", "v", "u", "state"], grads, grads_ref):
        assert bool(jnp.all(jnp.isfinite(grad))), name
        assert relative_error(grad, grad_ref) <= 1e-4, name


def test_parallel_accelerator_path_matches_oracle(monkeypatch):
    """Off CPU all chunks go through one vmap rather than lax.map over groups; same results."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    inputs = make_inputs((2, 100, 3, 64), seed=11, decay="strongest")
    wkv = lambda *a: wkv6_parallel(*a, chunk_size=32)  # a fresh function: no cached trace
    y, final_state = jax.jit(wkv)(*inputs)
    y_ref, state_ref = oracle(*inputs)
    assert relative_error(y, y_ref) <= 1e-5
    assert relative_error(final_state, state_ref) <= 1e-5
    grads, grads_ref = loss_gradients(wkv, inputs, seed=12), loss_gradients(wkv6_oracle, inputs, seed=12)
    for name, grad, grad_ref in zip(["r", "logw", "k", "v", "u", "state"], grads, grads_ref):
        assert relative_error(grad, grad_ref) <= 1e-4, name
