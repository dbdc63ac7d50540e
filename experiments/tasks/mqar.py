"""Multi-query associative recall (MQAR), the Zoology protocol (Arora, Eyuboglu et al. 2023).

One example of length T with P key-value pairs over a vocabulary V (default 8192):

    position:  0   1   2   3  ...  2P-2 2P-1 | 2P ... T-1
    input:     k0  v0  k1  v1 ...  kP-1 vP-1 | each key once more, at an even offset from 2P,
                                               every other slot filler
    label:     -100 everywhere except at a query position, whose label is that key's value

Keys are distinct and drawn from [1, V/2), values distinct from [V/2, V). The query of pair i
sits at position 2P + 2·gap_i, with the P gaps drawn without replacement from
{0, ..., (T-2P)/2 - 1} with probability ∝ (gap+1)^(power_a-1): `power_a = 0.01` puts most
queries close to the pairs. With `random_non_queries` (upstream's default in its configs) the
filler slots are uniform tokens over the whole vocabulary, else 0.

This follows `zoology/data/associative_recall.py::multiquery_ar` (same layout, label
convention and gap law); the random draws use a `numpy.random.Generator` seeded with `seed`
instead of the global numpy seed, so the exact examples differ from upstream's.
"""

from __future__ import annotations

import numpy as np

from experiments.tasks import IGNORE_INDEX

DEFAULT_VOCAB_SIZE = 8192


def gap_probabilities(space: int, power_a: float) -> np.ndarray:
    """`[space]` float64: p(gap = g) ∝ (g + 1)^(power_a - 1), normalised."""
    weights = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1.0)
    return weights / weights.sum()


def multiquery_ar(num_examples: int, seq_len: int, num_kv_pairs: int, seed: int,
                  vocab_size: int = DEFAULT_VOCAB_SIZE, power_a: float = 0.01,
                  random_non_queries: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """MQAR examples: `(inputs [B, T] int32, labels [B, T] int32)` with B = `num_examples`,
    T = `seq_len`; labels are `IGNORE_INDEX` except at the P query positions of each row."""
    if seq_len % 2:
        raise ValueError(f"MQAR: seq_len must be even, got {seq_len}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"MQAR: need 4 * num_kv_pairs <= seq_len (pairs, then room for the queries), "
                         f"got {num_kv_pairs} pairs for length {seq_len}")
    half = vocab_size // 2
    if num_kv_pairs > half - 1:
        raise ValueError(f"MQAR: vocab_size={vocab_size} has only {half - 1} distinct keys for {num_kv_pairs} pairs")
    rng = np.random.default_rng(seed)
    context = 2 * num_kv_pairs
    space = (seq_len - context) // 2
    p = gap_probabilities(space, power_a)

    inputs = np.zeros((num_examples, seq_len), np.int32)
    labels = np.full((num_examples, seq_len), IGNORE_INDEX, np.int32)
    for row in range(num_examples):
        keys = rng.choice(np.arange(1, half), size=num_kv_pairs, replace=False)
        values = rng.choice(np.arange(half, vocab_size), size=num_kv_pairs, replace=False)
        gaps = rng.choice(space, size=num_kv_pairs, replace=False, p=p)
        inputs[row, 0:context:2] = keys
        inputs[row, 1:context:2] = values
        query_positions = context + 2 * gaps
        inputs[row, query_positions] = keys
        labels[row, query_positions] = values
    if random_non_queries:
        filler = inputs == 0
        inputs[filler] = rng.integers(0, vocab_size, size=int(filler.sum()), dtype=np.int32)
    return inputs, labels
