"""Group word problems (Merrill et al., "The Illusion of State"; the RWKV-7 paper's state tracking).

A sequence of group elements g_1 ... g_T is the input; the label at position t is the prefix
product g_1 · g_2 · ... · g_t. Tracking it needs a state that can represent the whole group:
for the solvable groups (Z60, A4×Z5) a fixed-depth model with a diagonal (commuting) state
update can in principle do it, for the non-solvable A5 and S5 it cannot (NC1-complete).

Element tables are generated here by code: S5 is every permutation of 5 points, A5 the even
ones, A4×Z5 pairs of an even permutation of 4 points and a residue mod 5, Z60 residues mod 60.
Permutations compose as functions, `(p·q)[i] = q[p[i]]` (apply p first, then q), so a prefix
product reads left to right. Element 0 is always the identity; token id = element index.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np

GROUPS = ("Z60", "A4xZ5", "A5", "S5")


@dataclasses.dataclass(frozen=True)
class Group:
    """A finite group as a multiplication table: `table[a, b]` = index of a·b (0 = identity)."""

    name: str
    elements: tuple
    table: np.ndarray

    @property
    def order(self) -> int:
        return len(self.elements)


def _parity(perm: tuple[int, ...]) -> int:
    """0 for an even permutation, 1 for an odd one (counting inversions)."""
    return sum(perm[i] > perm[j] for i in range(len(perm)) for j in range(i + 1, len(perm))) % 2


def _compose(p: tuple[int, ...], q: tuple[int, ...]) -> tuple[int, ...]:
    """p then q: i -> q[p[i]]."""
    return tuple(q[p[i]] for i in range(len(p)))


def _table(elements: list, multiply) -> np.ndarray:
    index = {element: i for i, element in enumerate(elements)}
    return np.array([[index[multiply(a, b)] for b in elements] for a in elements], np.int32)


@functools.lru_cache(maxsize=None)
def make_group(name: str) -> Group:
    """One of `GROUPS`, with its multiplication table built from the elements' definition."""
    if name == "Z60":
        elements = list(range(60))
        multiply = lambda a, b: (a + b) % 60  # noqa: E731
    elif name in ("S5", "A5"):
        elements = [p for p in itertools.permutations(range(5)) if name == "S5" or _parity(p) == 0]
        multiply = _compose
    elif name == "A4xZ5":
        a4 = [p for p in itertools.permutations(range(4)) if _parity(p) == 0]
        elements = [(p, z) for p in a4 for z in range(5)]
        multiply = lambda a, b: (_compose(a[0], b[0]), (a[1] + b[1]) % 5)  # noqa: E731
    else:
        raise ValueError(f"unknown group {name!r}; choose from {GROUPS}")
    # itertools.permutations starts with the identity, and range/product start with 0: element 0 is e.
    return Group(name, tuple(elements), _table(elements, multiply))


def prefix_products(group: Group, words: np.ndarray) -> np.ndarray:
    """`words [B, T]` element ids -> `[B, T]` ids of g_1···g_t (a scan over the table)."""
    out = np.empty_like(words)
    acc = np.zeros(words.shape[0], words.dtype)  # the identity
    for t in range(words.shape[1]):
        acc = group.table[acc, words[:, t]]
        out[:, t] = acc
    return out


def word_problems(group_name: str, num_examples: int, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`(inputs [B, T] int32, labels [B, T] int32)`: uniform random words and their prefix products.
    The vocabulary is the group's order (60 or 120)."""
    group = make_group(group_name)
    rng = np.random.default_rng(seed)
    words = rng.integers(0, group.order, size=(num_examples, seq_len), dtype=np.int32)
    return words, prefix_products(group, words)
