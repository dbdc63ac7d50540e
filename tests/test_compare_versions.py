"""experiments/compare_versions.py: matched sizes, the masked loss, and one tiny end-to-end run."""

from __future__ import annotations

import csv
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import compare_versions as cv
from experiments.tasks import IGNORE_INDEX


def test_matched_configs_have_equal_non_embedding_params_within_two_percent():
    configs = cv.matched_configs(cv.VERSIONS, n_layer=2, n_embd=64, head_size=16, vocab_size=256, max_len=128)
    counts = {v: cv.param_counts(cfg)[1] for v, cfg in configs.items()}
    target = max(cv.param_counts(cv.model_config(v, 2, 64, 16, 256, 128))[1] for v in cv.VERSIONS)
    for v, count in counts.items():
        assert abs(count - target) / target < 0.02, (v, count, target)
    assert all(cfg.n_embd == 64 and cfg.n_layer == 2 for cfg in configs.values())
    assert all(configs[v].head_qk == 0 for v in (1, 2, 3))      # no attention-like copy head
    assert configs[1].ctx_len == 128


def test_param_counts_separate_the_embedding_and_head():
    cfg = cv.model_config(4, 1, 32, 16, 100, 16)
    total, non_embedding = cv.param_counts(cfg)
    assert total - non_embedding == 2 * 100 * 32                # emb [V, C] + head [C, V]


def test_state_size_counts_every_recurrent_float():
    L, C, N = 2, 32, 16
    v4 = cv.model_config(4, L, C, N, 64, 16)
    assert cv.state_size(v4) == L * 5 * C                          # att_x, aa, bb, pp, ffn_x
    v7 = cv.model_config(7, L, C, N, 64, 16)
    assert cv.state_size(v7) == L * (2 * C + (C // N) * N * N)     # shifts + H matrices N x N
    v1 = cv.model_config(1, L, C, N, 64, 16)
    assert cv.state_size(v1) == L * (2 * C + 16 * C + C)           # shifts, buffer [TT, A], denominator


def test_masked_cross_entropy_is_the_mean_over_scored_positions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    labels = np.array([[1, IGNORE_INDEX, 3, IGNORE_INDEX, 0], [IGNORE_INDEX] * 4 + [6]], np.int32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    scored = [(b, t) for b in range(2) for t in range(5) if labels[b, t] != IGNORE_INDEX]
    expected = -np.mean([log_probs[b, t, labels[b, t]] for b, t in scored])
    got = float(cv.masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    assert got == pytest.approx(expected, rel=1e-5)
    nll, correct, mask = cv.masked_token_stats(jnp.asarray(logits), jnp.asarray(labels))
    assert float(mask.sum()) == len(scored)
    assert float(correct.sum()) == sum(np.argmax(logits[b, t]) == labels[b, t] for b, t in scored)


TINY = dataclasses.replace(cv.PRESETS["smoke"], n_embd=16, head_size=8, charlm_steps=2, charlm_train_len=8,
                           charlm_eval_len=16, mqar_steps=2, mqar_len=16, mqar_pairs=2, mqar_vocab=64,
                           state_steps=2, state_len=8, state_versions=(4,), eval_examples=3, batch_size=2,
                           log_every=1)


@pytest.mark.slow  # three compiled train steps: about two minutes on a loaded 2-core CPU
def test_a_tiny_run_writes_results_tables_and_plots(tmp_path):
    records = cv.run(TINY, versions=(4,), out=tmp_path, log=lambda line: None)
    assert [(r["task"], r["version"]) for r in records] == [("charlm", 4), ("mqar", 4), ("state", 4)]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["task"] for line in lines] == ["charlm", "mqar", "state"]
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and rows[1]["accuracy"] != "" and rows[0]["val_bpb"] != ""
    for name in ("loss_curves.png", "loss_by_position.png", "mqar_accuracy_vs_state.png",
                 "state_tracking_vs_layers.png", "summary.txt", "preset.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    lm = records[0]
    assert len(lm["loss_by_position"]) == 16 and [s for s, _ in lm["curve"]] == [1, 2]
    assert 0 <= records[1]["accuracy"] <= 1 and len(records[2]["accuracy_by_position"]) == 8
    assert cv.load_results(tmp_path)[2]["group"] == "A5"


def test_preset_overrides_parse_to_the_fields_types():
    preset = cv.PRESETS["cpu"]
    assert cv._parse_override(preset, "mqar_steps=7") == ("mqar_steps", 7)
    assert cv._parse_override(preset, "state_layers=1,2,3") == ("state_layers", (1, 2, 3))
    assert cv._parse_override(preset, "state_groups=S5") == ("state_groups", ("S5",))
    with pytest.raises(SystemExit):
        cv._parse_override(preset, "no_such_field=1")
