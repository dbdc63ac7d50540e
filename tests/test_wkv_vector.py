"""Tests of the RWKV-4 WKV recurrence (rwkv_jax/wkv/vector.py).

Chain of trust: a float64 NumPy loop written from the defining sums checks `wkv4_oracle`; the
oracle then checks `wkv4_step` and `wkv4_parallel` (values, final state and gradients).
Errors are relative to the reference's scale: max|Δ| / max|ref|.

The state (aa, bb, pp) stands for the sums (aa·e^pp, bb·e^pp). It is compared both component by
component (as the model-level tests do) and through those invariant sums, rescaled by the
reference's pp so that they stay in range.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax.wkv.vector import EMPTY_LOG_SCALE, wkv4_oracle, wkv4_parallel, wkv4_step, zero_state

oracle = jax.jit(wkv4_oracle)
parallel = jax.jit(wkv4_parallel)


def relative_error(actual, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


def reference_wkv4(k, v, log_decay, u, state):
    """Float64, straight from the defining sums: every term's exponent is formed directly, and a
    common factor e^{−max exponent} only keeps the sums in range.

    With the initial state counted as the sums (aa·e^pp, bb·e^pp) as of just before token 0:
        num_t = aa·e^{pp + t·w} + Σ_{i<t} e^{(t−1−i)·w + k_i} v_i
        den_t = bb·e^{pp + t·w} + Σ_{i<t} e^{(t−1−i)·w + k_i}
        y_t   = (num_t + e^{u + k_t} v_t) / (den_t + e^{u + k_t})
    Returns y and the final state as (a, b, p): p is the largest exponent among the final sums'
    terms and (a, b) = (num_T, den_T)·e^{−p}.
    """
    k, v, w, u = (np.asarray(x, np.float64) for x in (k, v, log_decay, u))
    aa, bb, pp = (np.asarray(x, np.float64) for x in state)
    batch, seq_len, channels = k.shape
    y = np.zeros_like(k)
    for t in range(seq_len + 1):
        # Exponents of the terms before token t: the initial state's, then tokens 0 … t−1.
        exponents = [pp + t * w] + [k[:, i] + (t - 1 - i) * w for i in range(t)]
        a_terms, b_terms = [aa] + [v[:, i] for i in range(t)], [bb] + [np.ones_like(aa)] * t
        if t < seq_len:
            exponents.append(u + k[:, t])
            a_terms.append(v[:, t])
            b_terms.append(np.ones_like(aa))
        scale = np.max(exponents, axis=0)  # cancels in y
        weights = [np.exp(x - scale) for x in exponents]
        num = sum(wt * a for wt, a in zip(weights, a_terms))
        den = sum(wt * b for wt, b in zip(weights, b_terms))
        if t < seq_len:
            y[:, t] = num / den
    return y, (num, den, scale)


def assert_states_close(actual, expected, tol=1e-5):
    """Component by component and through the invariant sums (aa·e^pp, bb·e^pp) / e^{pp_ref}."""
    aa, bb, pp = (np.asarray(x, np.float64) for x in actual)
    aa_ref, bb_ref, pp_ref = (np.asarray(x, np.float64) for x in expected)
    errors = {"aa": relative_error(aa, aa_ref), "bb": relative_error(bb, bb_ref),
              "pp": relative_error(pp, pp_ref), "aa·e^pp": relative_error(aa * np.exp(pp - pp_ref), aa_ref),
              "bb·e^pp": relative_error(bb * np.exp(pp - pp_ref), bb_ref)}
    assert max(errors.values()) <= tol, errors
    return errors


def make_inputs(batch, seq_len, channels, seed, key_scale=1.0, state="random"):
    """Random (k, v, log_decay, u, state) in fp32. log_decay = −exp(N(0, 1.5²)): decays per step
    from ≈ 0.99 to e^{−90}; state "random" is a nonzero state, "zero" the official empty one."""
    rng = np.random.default_rng(seed)
    k = key_scale * rng.standard_normal((batch, seq_len, channels))
    v = rng.standard_normal((batch, seq_len, channels))
    log_decay = -np.exp(1.5 * rng.standard_normal(channels))
    u = rng.standard_normal(channels)
    k, v, log_decay, u = (jnp.asarray(x, jnp.float32) for x in (k, v, log_decay, u))
    if state == "zero":
        return k, v, log_decay, u, zero_state(batch, channels)
    aa, pp = rng.standard_normal((2, batch, channels))
    bb = 0.5 + rng.random((batch, channels))  # a denominator: positive
    return k, v, log_decay, u, tuple(jnp.asarray(x, jnp.float32) for x in (aa, bb, pp))


SHAPES = [(1, 1, 8), (2, 17, 16), (3, 64, 8), (1, 100, 32), (2, 257, 8)]  # T = 1, odd, multiple of 32


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 17, 16), (1, 100, 32)])
@pytest.mark.parametrize("state", ["random", "zero"])
def test_oracle_matches_float64_reference(shape, state):
    inputs = make_inputs(*shape, seed=0, state=state)
    y, final_state = oracle(*inputs)
    y_ref, state_ref = reference_wkv4(*inputs)
    assert y.dtype == final_state[0].dtype == jnp.float32
    assert relative_error(y, y_ref) <= 1e-5
    assert relative_error(final_state[2], state_ref[2]) <= 1e-5  # pp: the largest exponent
    aa, bb, pp = (np.asarray(x, np.float64) for x in final_state)
    assert relative_error(aa * np.exp(pp - state_ref[2]), state_ref[0]) <= 1e-5
    assert relative_error(bb * np.exp(pp - state_ref[2]), state_ref[1]) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("state", ["random", "zero"])
def test_parallel_matches_oracle(shape, state):
    inputs = make_inputs(*shape, seed=1, state=state)
    y, final_state = parallel(*inputs)
    y_ref, state_ref = oracle(*inputs)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    assert all(s.shape == r.shape and s.dtype == jnp.float32 for s, r in zip(final_state, state_ref))
    assert relative_error(y, y_ref) <= 1e-5
    assert_states_close(final_state, state_ref)


@pytest.mark.parametrize("shape", [(2, 17, 16), (1, 100, 32)])
def test_parallel_matches_float64_reference(shape):
    inputs = make_inputs(*shape, seed=2)
    y, (aa, bb, pp) = parallel(*inputs)
    y_ref, (a_ref, b_ref, p_ref) = reference_wkv4(*inputs)
    assert relative_error(y, y_ref) <= 1e-5
    assert relative_error(pp, p_ref) <= 1e-5
    aa, bb, pp = (np.asarray(x, np.float64) for x in (aa, bb, pp))
    assert relative_error(aa * np.exp(pp - p_ref), a_ref) <= 1e-5
    assert relative_error(bb * np.exp(pp - p_ref), b_ref) <= 1e-5


def test_step_repeated_matches_oracle():
    k, v, log_decay, u, state = make_inputs(2, 9, 16, seed=3)
    step = jax.jit(wkv4_step)
    ys, carried = [], state
    for t in range(k.shape[1]):
        y_t, carried = step(k[:, t], v[:, t], log_decay, u, carried)
        ys.append(y_t)
    y_ref, state_ref = oracle(k, v, log_decay, u, state)
    assert relative_error(jnp.stack(ys, axis=1), y_ref) <= 1e-6
    assert_states_close(carried, state_ref, tol=1e-6)


@pytest.mark.parametrize("split", [32, 21])  # at a chunk boundary and inside a chunk
def test_parallel_split_sequence_carries_state(split):
    k, v, log_decay, u, state = make_inputs(2, 75, 16, seed=4)
    y_full, state_full = parallel(k, v, log_decay, u, state)
    y_first, state_mid = parallel(k[:, :split], v[:, :split], log_decay, u, state)
    y_second, state_end = parallel(k[:, split:], v[:, split:], log_decay, u, state_mid)
    assert relative_error(jnp.concatenate([y_first, y_second], axis=1), y_full) <= 1e-5
    assert_states_close(state_end, state_full)


def loss_gradients(wkv, inputs, seed):
    """Gradients w.r.t. (k, v, log_decay, u, (aa, bb, pp)) of Σ y·g_y + Σ (aa, bb)·e^{pp − c}·g with
    random g: the final state enters through the sums it stands for (what a later call's y depends
    on), rescaled by a fixed c, the oracle's final pp. (pp on its own is only a scale.)"""
    rng = np.random.default_rng(seed)
    k, *_, state = inputs
    y_cotangent = jnp.asarray(rng.standard_normal(k.shape), jnp.float32)
    a_cotangent, b_cotangent = (jnp.asarray(rng.standard_normal(state[0].shape), jnp.float32) for _ in "ab")
    scale = oracle(*inputs)[1][2]

    def loss(*args):
        y, (aa, bb, pp) = wkv(*args)
        decay = jnp.exp(pp - scale)
        state_terms = jnp.sum(aa * decay * a_cotangent) + jnp.sum(bb * decay * b_cotangent)
        return jnp.sum(y * y_cotangent) + state_terms

    return jax.jit(jax.grad(loss, argnums=tuple(range(5))))(*inputs)


@pytest.mark.parametrize("shape", [(2, 17, 16), (1, 70, 8), (3, 1, 4)])
@pytest.mark.parametrize("state", ["random", "zero"])
def test_parallel_gradients_match_oracle(shape, state):
    inputs = make_inputs(*shape, seed=5, state=state)
    grads = loss_gradients(wkv4_parallel, inputs, seed=6)
    grads_ref = loss_gradients(wkv4_oracle, inputs, seed=6)
    names = ["k", "v", "log_decay", "u", "aa", "bb", "pp"]
    flat, flat_ref = grads[:4] + tuple(grads[4]), grads_ref[:4] + tuple(grads_ref[4])
    for name, grad, grad_ref in zip(names, flat, flat_ref):
        assert bool(jnp.all(jnp.isfinite(grad))), name
        if np.max(np.abs(np.asarray(grad_ref))) == 0:  # e.g. the empty state's aa, bb, pp
            assert np.max(np.abs(np.asarray(grad))) == 0, name
        else:
            assert relative_error(grad, grad_ref) <= 1e-4, name


@pytest.mark.parametrize("state", ["random", "zero"])
@pytest.mark.parametrize("with_reset", [False, True])
def test_parallel_final_log_scale_has_the_oracle_gradient(state, with_reset):
    # pp on its own: its gradient goes to the key (and decay) that attains the maximum, in
    # whichever chunk it lies, as the oracle's running maximum's does.
    k, v, log_decay, u, initial = make_inputs(2, 300, 16, seed=7, key_scale=3.0, state=state)
    reset = jnp.zeros((2, 300), bool).at[0, 100].set(True) if with_reset else None
    weights = jnp.cos(jnp.arange(32, dtype=jnp.float32)).reshape(2, 16)

    def pp_gradients(wkv):
        loss = lambda k, log_decay, initial: jnp.sum(weights * wkv(k, v, log_decay, u, initial, reset=reset)[1][2])
        return jax.grad(loss, argnums=(0, 1, 2))(k, log_decay, initial)

    grads, grads_ref = pp_gradients(wkv4_parallel), pp_gradients(wkv4_oracle)
    for grad, grad_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        assert np.max(np.abs(np.asarray(grad - grad_ref))) <= 1e-5 * max(np.max(np.abs(np.asarray(grad_ref))), 1.0)


@pytest.mark.parametrize("key_scale, max_key", [(30.0, 60.0), (60.0, 88.0), (100.0, 200.0)])
def test_large_keys_stay_finite(key_scale, max_key):
    """e^k overflows fp32 from k ≈ 88.7; the max trick must never exponentiate such a k."""
    k, v, log_decay, u, state = make_inputs(2, 70, 16, seed=7, key_scale=key_scale)
    k = jnp.clip(k, -max_key, max_key).at[:, ::7].set(max_key)  # many keys exactly at the bound
    inputs = (k, v, log_decay, u, state)
    for wkv in (wkv4_parallel, wkv4_oracle):
        y, final_state = jax.jit(wkv)(*inputs)
        assert bool(jnp.all(jnp.isfinite(y))) and all(bool(jnp.all(jnp.isfinite(s))) for s in final_state)
        grads = loss_gradients(wkv, inputs, seed=8)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    y, _ = parallel(*inputs)
    y_ref, _ = reference_wkv4(*inputs)
    # Rounding a log-scale of size |k| costs |k|·eps relative; y is a weighted mean of v, so
    # its error stays at that level: ≈ 1e-5 for |k| ≈ 100.
    assert relative_error(y, y_ref) <= 1e-5 * max(1.0, max_key / 60)


def test_empty_state_is_the_official_one():
    aa, bb, pp = zero_state(2, 3)
    assert float(jnp.max(jnp.abs(aa))) == float(jnp.max(jnp.abs(bb))) == 0.0
    assert float(jnp.max(pp)) == float(np.float32(EMPTY_LOG_SCALE))


def test_bf16_inputs_give_fp32_outputs():
    k, v, log_decay, u, state = make_inputs(2, 40, 16, seed=9)
    k16, v16 = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    y, final_state = parallel(k16, v16, log_decay, u, state)
    y_ref, state_ref = oracle(k16, v16, log_decay, u, state)
    assert y.dtype == jnp.float32 and all(s.dtype == jnp.float32 for s in final_state)
    assert relative_error(y, y_ref) <= 1e-5
    assert_states_close(final_state, state_ref)


def test_long_sequence_matches_oracle():
    inputs = make_inputs(1, 2048, 16, seed=10)
    y, final_state = parallel(*inputs)
    y_ref, state_ref = oracle(*inputs)
    assert relative_error(y, y_ref) <= 1e-5
    assert_states_close(final_state, state_ref)
