"""rwkv_jax.wkv.scan: jax's inclusive associative scan without empty combines, and the reduction
to its last entry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax.wkv.scan import associative_reduce, associative_scan


def affine_compose(earlier, later):
    """S -> S P + U maps, applied in order: not commutative, so any misordering shows."""
    p_a, u_a = earlier
    p_b, u_b = later
    return p_a @ p_b, u_a @ p_b + u_b


@pytest.mark.parametrize("length", list(range(1, 19)) + [31, 32, 33])
def test_equals_jax_associative_scan_for_every_length(length):
    rng = np.random.default_rng(length)
    elems = (jnp.asarray(rng.standard_normal((3, length, 4, 4)) / 2, jnp.float32),
             jnp.asarray(rng.standard_normal((3, length, 2, 4)), jnp.float32))
    expected = jax.lax.associative_scan(affine_compose, elems, axis=1)
    actual = associative_scan(affine_compose, elems, axis=1)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


def test_never_combines_empty_slices():
    sizes = []

    def recording(earlier, later):
        sizes.append(earlier[0].shape[0])
        return affine_compose(earlier, later)

    elems = (jnp.ones((16, 2, 2)), jnp.ones((16, 1, 2)))
    jax.make_jaxpr(lambda e: associative_scan(recording, e))(elems)
    assert sizes and min(sizes) >= 1
    sizes.clear()
    jax.make_jaxpr(lambda e: jax.lax.associative_scan(recording, e))(elems)
    assert min(sizes) == 0  # what jax's version does, and jax 0.11.2 cannot partition


@pytest.mark.parametrize("length", [1, 2, 3, 5, 8, 13, 32, 33])
def test_reduce_equals_the_last_entry_of_the_scan_with_n_minus_one_combines(length):
    rng = np.random.default_rng(length)
    elems = (jnp.asarray(rng.standard_normal((3, length, 4, 4)) / 2, jnp.float32),
             jnp.asarray(rng.standard_normal((3, length, 2, 4)), jnp.float32))
    combines = []

    def counting(earlier, later):
        combines.append(earlier[0].shape[1])
        return affine_compose(earlier, later)

    actual = associative_reduce(counting, elems, axis=1)
    expected = jax.lax.associative_scan(affine_compose, elems, axis=1)
    assert sum(combines) == length - 1 and min(combines, default=1) >= 1
    for a, e in zip(actual, expected):
        assert a.shape[1] == 1
        np.testing.assert_allclose(a, e[:, -1:], rtol=1e-5, atol=1e-5)
