"""The inclusive associative scan every parallel form composes its chunk summaries with.

Same algorithm and results as `jax.lax.associative_scan` (the odd/even recursion: combine
neighbouring pairs, scan the half-length sequence, fill in the even positions), with one
difference: a level of two elements is finished with a single combine, where jax's version also
combines two empty slices. Under `jax.shard_map`, jax 0.11.2's Shardy partitioner segfaults while
compiling the gradient of those empty combines (any scan whose recursion reaches two elements,
e.g. 2, 4, 8 or 16 chunks; jax 0.10.2 compiles it), which made context parallelism
(`rwkv_jax.wkv.mesh`) crash there.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def associative_scan(combine: Callable[[Any, Any], Any], elems: Any, axis: int = 0) -> Any:
    """Inclusive scan of the pytree `elems` along `axis` with the associative `combine`.

    Args:
      combine: `(earlier, later) -> combined`, elementwise over the scanned axis (it receives
        slices of `elems` with that axis shortened).
      elems: a pytree of arrays with the same length along `axis`.
      axis: the scanned axis.

    Returns:
      The pytree whose entry i along `axis` is `elems[0] ∘ ... ∘ elems[i]`.
    """
    leaves, tree = jax.tree.flatten(elems)

    def combine_leaves(earlier: list, later: list) -> list:
        return jax.tree.leaves(combine(jax.tree.unflatten(tree, earlier), jax.tree.unflatten(tree, later)))

    def take(xs: list, start: int, stop: int, stride: int = 1) -> list:
        return [jax.lax.slice_in_dim(x, start, stop, stride, axis) for x in xs]

    def scan(xs: list) -> list:
        n = xs[0].shape[axis]
        if n < 2:
            return xs
        first = take(xs, 0, 1)
        if n == 2:
            return [jnp.concatenate([x0, x01], axis) for x0, x01 in zip(first, combine_leaves(first, take(xs, 1, 2)))]
        odd = scan(combine_leaves(take(xs, 0, n - 1, 2), take(xs, 1, n, 2)))  # positions 1, 3, 5, ...
        # Positions 2, 4, ...: the odd prefix before each, then the element itself.
        before = take(odd, 0, odd[0].shape[axis] - 1) if n % 2 == 0 else odd
        even = [jnp.concatenate([x0, e], axis) for x0, e in zip(first, combine_leaves(before, take(xs, 2, n, 2)))]
        return [_interleave(e, o, n, axis) for e, o in zip(even, odd)]

    return jax.tree.unflatten(tree, scan(leaves))


def associative_reduce(combine: Callable[[Any, Any], Any], elems: Any, axis: int = 0) -> Any:
    """`elems[0] ∘ ... ∘ elems[n-1]` along `axis` (kept, with length 1) by pairwise combines.

    The last entry of `associative_scan` for half its combines: n − 1 in log₂ n rounds (an odd
    entry out waits for the next round). Same `combine` and `elems` contract as `associative_scan`.
    """
    leaves, tree = jax.tree.flatten(elems)

    def take(xs: list, start: int, stop: int, stride: int = 1) -> Any:
        return jax.tree.unflatten(tree, [jax.lax.slice_in_dim(x, start, stop, stride, axis) for x in xs])

    while leaves[0].shape[axis] > 1:
        n = leaves[0].shape[axis]
        paired = jax.tree.leaves(combine(take(leaves, 0, n - 1, 2), take(leaves, 1, n, 2)))
        if n % 2:
            paired = [jnp.concatenate([x, jax.lax.slice_in_dim(y, n - 1, n, axis=axis)], axis)
                      for x, y in zip(paired, leaves)]
        leaves = paired
    return jax.tree.unflatten(tree, leaves)


def _interleave(even: jax.Array, odd: jax.Array, n: int, axis: int) -> jax.Array:
    """[e0, o0, e1, o1, ...] along `axis`, `n` entries (even has ceil(n/2), odd floor(n/2))."""
    if odd.shape[axis] < even.shape[axis]:
        odd = jnp.concatenate([odd, jax.lax.slice_in_dim(even, 0, 1, axis=axis)], axis)  # filler, cut below
    pairs = jnp.stack([even, odd], axis=axis + 1)
    merged = pairs.reshape(even.shape[:axis] + (2 * even.shape[axis],) + even.shape[axis + 1:])
    return jax.lax.slice_in_dim(merged, 0, n, axis=axis)
