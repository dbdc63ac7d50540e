"""The stretch summaries context parallelism composes (`wkv4_transition`, `wkv6_transition`,
`wkv7_transition`): applied to any start state, each gives the oracle's end state, with and without
document resets, and its gradients equal the oracle's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax.wkv.diag import wkv6_oracle, wkv6_transition
from rwkv_jax.wkv.dplr import wkv7_oracle, wkv7_transition
from rwkv_jax.wkv.mesh import DIAG_TRANSITION, DPLR_TRANSITION, VECTOR_TRANSITION
from rwkv_jax.wkv.vector import wkv4_oracle, wkv4_transition

B, T, H, N = 2, 37, 2, 8  # T: one full chunk of 32 and a padded one for v7


def family(name, seed):
    """(oracle(per_token, state, reset) -> end state, summary(per_token, reset), apply, per_token, states)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    if name == "v7":
        kappa = normal(B, T, H, N)
        kappa = kappa / jnp.linalg.norm(kappa, axis=-1, keepdims=True)
        per_token = (-0.6 * jax.nn.sigmoid(normal(B, T, H, N)), normal(B, T, H, N), normal(B, T, H, N),
                     -kappa, 0.5 * kappa)
        zeros = jnp.zeros((B, T, H, N))
        oracle = lambda x, s, reset: wkv7_oracle(zeros, *x, s, reset=reset)[1]
        summary = lambda x, reset: wkv7_transition(*x, reset=reset)
        return oracle, summary, DPLR_TRANSITION.apply, per_token, [normal(B, H, N, N) for _ in range(2)]
    if name == "v6":
        # One very strong decay beside weak ones: the summed-from-the-end decays must not cancel.
        logw = (-jnp.exp(normal(B, T, H, N))).at[:, 5, 0, 0].set(-200.0)
        per_token = (logw, normal(B, T, H, N), normal(B, T, H, N))
        zeros, u = jnp.zeros((B, T, H, N)), normal(H, N)
        oracle = lambda x, s, reset: wkv6_oracle(zeros, *x, u, s, reset=reset)[1]
        summary = lambda x, reset: wkv6_transition(*x, reset=reset)
        return oracle, summary, DIAG_TRANSITION.apply, per_token, [normal(B, H, N, N) for _ in range(2)]
    channels = H * N
    log_decay, u = -jnp.exp(normal(channels)), normal(channels)
    per_token = (3 * normal(B, T, channels), normal(B, T, channels))
    oracle = lambda x, s, reset: wkv4_oracle(*x, log_decay, u, s, reset=reset)[1]
    summary = lambda x, reset: wkv4_transition(*x, log_decay, reset=reset)
    states = [(normal(B, channels), jnp.abs(normal(B, channels)) + 1, 3 * normal(B, channels)) for _ in range(2)]
    return oracle, summary, VECTOR_TRANSITION.apply, per_token, states


def sums(state, name):
    """What a state means: v4's (aa, bb, pp) stands for the sums aa·e^pp and bb·e^pp."""
    if name != "v4":
        return state
    aa, bb, pp = state
    return aa * jnp.exp(pp), bb * jnp.exp(pp)


def relative_error(actual, expected) -> float:
    # A start state a reset forgets has zero gradient: the floor makes any nonzero one fail.
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(e))) / max(np.max(np.abs(np.asarray(e))), 1e-30))
               for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)))


RESETS = {
    "none": None,
    # Row 0: a document starting mid-stretch and one on the last token; row 1: at the first token.
    "resets": jnp.zeros((B, T), bool).at[0, 11].set(True).at[0, T - 1].set(True).at[1, 0].set(True),
}


@pytest.mark.parametrize("reset_case", RESETS)
@pytest.mark.parametrize("name", ["v4", "v6", "v7"])
def test_summary_applied_to_any_start_state_gives_the_oracle_end_state(name, reset_case):
    oracle, summary, apply, per_token, states = family(name, seed=0)
    reset = RESETS[reset_case]
    transition, end_from_zero = summary(per_token, reset)
    for state in states:
        expected = oracle(per_token, state, reset)
        assert relative_error(sums(apply(transition, end_from_zero, state), name), sums(expected, name)) < 1e-5


@pytest.mark.parametrize("reset_case", RESETS)
@pytest.mark.parametrize("name", ["v4", "v6", "v7"])
def test_summary_gradients_equal_the_oracle_end_state_gradients(name, reset_case):
    oracle, summary, apply, per_token, states = family(name, seed=1)
    reset = RESETS[reset_case]

    def loss(end_state):
        # Linear in the state and in what it means (v4's sums reach e^9: a sine of them would be
        # ill-conditioned); v4's pp gets the oracle's gradient, into the key that attains it.
        return sum(jnp.sum(jnp.cos(jnp.arange(x.size)).reshape(x.shape) * x)
                   for x in jax.tree.leaves((end_state, sums(end_state, name))))

    expected = jax.grad(lambda x, s: loss(oracle(x, s, reset)), argnums=(0, 1))(per_token, states[0])
    actual = jax.grad(lambda x, s: loss(apply(*summary(x, reset), s)), argnums=(0, 1))(per_token, states[0])
    assert relative_error(actual, expected) < 1e-5
