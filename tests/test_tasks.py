"""The task generators against their definitions (experiments/tasks)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from experiments.tasks import IGNORE_INDEX, charlm, mqar
from experiments.tasks import state_tracking as st


# ----------------------------------------------------------------------------- MQAR

@pytest.mark.parametrize("seq_len,pairs", [(64, 4), (128, 16), (512, 64)])
def test_mqar_answers_are_the_values_paired_with_the_queried_keys(seq_len, pairs):
    inputs, labels = mqar.multiquery_ar(8, seq_len, pairs, seed=3)
    assert inputs.shape == labels.shape == (8, seq_len)
    half = mqar.DEFAULT_VOCAB_SIZE // 2
    for x, y in zip(inputs, labels):
        keys, values = x[0:2 * pairs:2], x[1:2 * pairs:2]
        assert len(set(keys)) == pairs and len(set(values)) == pairs
        assert np.all((keys >= 1) & (keys < half)) and np.all(values >= half)
        answer_of = dict(zip(keys, values))
        scored = np.nonzero(y != IGNORE_INDEX)[0]
        assert len(scored) == pairs                       # one query per pair
        assert np.all(scored >= 2 * pairs) and np.all((scored - 2 * pairs) % 2 == 0)
        assert sorted(x[scored]) == sorted(keys)          # each key queried once
        for t in scored:
            assert y[t] == answer_of[x[t]]


def test_mqar_is_deterministic_given_the_seed_and_differs_across_seeds():
    a = mqar.multiquery_ar(4, 64, 8, seed=1)
    b = mqar.multiquery_ar(4, 64, 8, seed=1)
    c = mqar.multiquery_ar(4, 64, 8, seed=2)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_mqar_without_random_filler_matches_the_zoology_layout():
    inputs, labels = mqar.multiquery_ar(16, 32, 4, seed=0, vocab_size=64, random_non_queries=False)
    query_slots = np.zeros_like(inputs, bool)
    query_slots[:, 8::2] = True
    assert np.all(inputs[:, 8:][~query_slots[:, 8:]] == 0)   # odd slots after the pairs are filler
    assert np.all((labels != IGNORE_INDEX) <= query_slots)


def test_mqar_gaps_follow_the_power_law():
    p = mqar.gap_probabilities(100, 0.01)
    assert p.sum() == pytest.approx(1.0)
    assert np.all(np.diff(p) < 0)                                   # nearer gaps more likely
    assert p[0] / p[9] == pytest.approx(10 ** 0.99, rel=1e-12)      # (g+1)^(a-1)
    _, labels = mqar.multiquery_ar(200, 256, 8, seed=0)
    gaps = (np.nonzero(labels != IGNORE_INDEX)[1] - 16) // 2
    assert np.mean(gaps < 60) > np.mean(gaps >= 60)                 # 120 slots, mass skewed to the front


def test_mqar_rejects_too_many_pairs():
    with pytest.raises(ValueError, match="4 \\* num_kv_pairs"):
        mqar.multiquery_ar(1, 64, 17, seed=0)


# ----------------------------------------------------------------------------- state tracking

@pytest.mark.parametrize("name,order,abelian", [("Z60", 60, True), ("A4xZ5", 60, False), ("A5", 60, False),
                                               ("S5", 120, False)])
def test_group_tables_are_groups(name, order, abelian):
    g = st.make_group(name)
    t = g.table
    assert g.order == order and t.shape == (order, order)
    e = np.arange(order)
    assert np.array_equal(t[0], e) and np.array_equal(t[:, 0], e)           # 0 is the identity
    for row in t:                                                           # Latin square: closure + inverses
        assert np.array_equal(np.sort(row), e)
    a, b, c = np.meshgrid(e, e, e, indexing="ij")
    assert np.array_equal(t[t[a, b], c], t[a, t[b, c]])                     # associativity, all triples
    assert np.array_equal(t, t.T) == abelian


def test_group_element_definitions():
    s5 = st.make_group("S5")
    assert set(s5.elements) == set(itertools.permutations(range(5)))
    a5 = st.make_group("A5")
    assert set(a5.elements) <= set(s5.elements)
    # A5 is closed under S5's product, and it is S5's even half: the product of two odd ones is even.
    odd = [p for p in s5.elements if p not in set(a5.elements)]
    assert len(odd) == 60
    index = {p: i for i, p in enumerate(s5.elements)}
    assert s5.elements[s5.table[index[odd[0]], index[odd[1]]]] in set(a5.elements)
    # (p·q) applies p first: (0 1) then (1 2) sends 0 -> 1 -> 2.
    p, q = (1, 0, 2, 3, 4), (0, 2, 1, 3, 4)
    assert s5.elements[s5.table[index[p], index[q]]] == (2, 0, 1, 3, 4)
    z60 = st.make_group("Z60")
    assert z60.table[59, 2] == 1


@pytest.mark.parametrize("name", st.GROUPS)
def test_word_problem_labels_are_prefix_products(name):
    g = st.make_group(name)
    words, labels = st.word_problems(name, 3, 40, seed=5)
    assert words.shape == labels.shape == (3, 40)
    assert words.max() < g.order
    for w, y in zip(words, labels):
        acc = g.elements[0]
        index = {el: i for i, el in enumerate(g.elements)}
        for t, token in enumerate(w):                       # naive product over the element definitions
            acc = _naive_multiply(name, acc, g.elements[token])
            assert y[t] == index[acc]


def _naive_multiply(name, a, b):
    if name == "Z60":
        return (a + b) % 60
    if name == "A4xZ5":
        return (tuple(b[0][a[0][i]] for i in range(4)), (a[1] + b[1]) % 5)
    return tuple(b[a[i]] for i in range(5))


def test_word_problems_are_deterministic_given_the_seed():
    a = st.word_problems("A5", 2, 16, seed=9)
    b = st.word_problems("A5", 2, 16, seed=9)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))


# ----------------------------------------------------------------------------- char LM

def test_charlm_labels_are_the_next_bytes_of_the_corpus():
    data = charlm.corpus_bytes()
    inputs, labels = charlm.train_batch(4, 32, seed=0)
    assert np.array_equal(inputs[:, 1:], labels[:, :-1])
    train, val = charlm.split()
    assert len(train) + len(val) == len(data) and np.array_equal(val, data[len(train):])
    row = inputs[0]
    # the crop occurs in the training split and its label continues it
    windows = np.lib.stride_tricks.sliding_window_view(train, 33)
    matches = np.nonzero(np.all(windows[:, :32] == row, axis=1))[0]
    assert len(matches) and np.any(windows[matches, 32] == labels[0, -1])


def test_charlm_val_windows_tile_the_held_out_split():
    _, val = charlm.split()
    inputs, labels = charlm.val_windows(3, 100)
    assert np.array_equal(inputs.reshape(-1), val[:300]) and np.array_equal(labels.reshape(-1), val[1:301])
