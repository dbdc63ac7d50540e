"""Official state-tuning files (`blocks.{l}.att.time_state`, (H, N, N), [value, key]) as initial states.

v5/v6: the `rwkv` package starts a state-tuned model from its time_state when given no state;
our model started from `load_state_pth` must give the same logits and final state (1e-4 relative).
v7: the package's v7 class has no time_state support, so it is handed the state list built by hand
from the file ([value, key] is its own layout: no transpose)."""

from __future__ import annotations

import numpy as np
import pytest

import rwkv_jax as rj
from helpers import forward_fn, rel_err
from official_reference import make_official_checkpoint, official_available, run_official_many
from rwkv_jax.io import convert
from rwkv_jax.io.official import CheckpointError
from rwkv_jax.io.state_files import load_state_pth, save_state_pth, state_from_time_state, time_state_tensors

pytestmark = pytest.mark.skipif(not official_available(), reason="torch and the rwkv package are not installed")
TOL = 1e-4
SIZES = dict(n_layer=2, n_embd=64, vocab_size=80, head_size=16)


def random_time_state(n_layer, n_head, head_size, seed=0):
    rng = np.random.default_rng(seed)
    return {f"blocks.{l}.att.time_state": rng.normal(0, 1.0, (n_head, head_size, head_size)).astype(np.float32)
            for l in range(n_layer)}


def run_ours(cfg, params, tokens, state):
    logits, state = forward_fn(cfg)(params, np.asarray([tokens], np.int32), state)
    return np.asarray(logits[0]), rj.state_to_official(cfg, state)


@pytest.mark.parametrize("version", [5, 6])
def test_state_tuned_model_matches_official_package(tmp_path, version):
    import torch

    model = tmp_path / "model.pth"
    make_official_checkpoint(model, version, seed=version, **SIZES)
    time_state = random_time_state(2, 4, 16, seed=version)
    tuned = tmp_path / "tuned.pth"
    merged = torch.load(model, weights_only=True)
    merged.update({k: torch.from_numpy(v) for k, v in time_state.items()})
    torch.save(merged, tuned)
    state_file = tmp_path / "state.pth"
    torch.save({k: torch.from_numpy(v) for k, v in time_state.items()}, state_file)

    cfg, params = rj.load_pth(tuned)  # the time_state keys are not parameters
    start = load_state_pth(state_file, cfg)
    np.testing.assert_array_equal(np.asarray(load_state_pth(tuned, cfg)["att_kv"]), np.asarray(start["att_kv"]))
    # [value, key] in the file, [key, value] in our v5/v6 state
    np.testing.assert_array_equal(np.asarray(start["att_kv"][1, 0, 2]), time_state["blocks.1.att.time_state"][2].T)

    tokens = np.random.RandomState(version).randint(0, 80, 19).tolist()
    logits, state = run_ours(cfg, params, tokens, start)
    (ref_logits, ref_state), = run_official_many(tuned, version, [(tokens, None)])
    assert rel_err(logits, ref_logits) <= TOL
    assert max(rel_err(a, b) for a, b in zip(state, ref_state)) <= TOL
    (zero_logits, _), = run_official_many(model, version, [(tokens, None)])
    assert rel_err(zero_logits, ref_logits) > 1e-2  # the tuned state does change the output

    # Our export of that state, merged into the model by save_pth, is what the package starts from.
    exported = tmp_path / "exported.pth"
    rj.save_pth(exported, cfg, params, state=start)
    (exported_logits, _), = run_official_many(exported, version, [(tokens, None)])
    np.testing.assert_array_equal(exported_logits, ref_logits)
    _, _, carried = convert.load_checkpoint_with_state(exported)
    np.testing.assert_array_equal(np.asarray(carried["att_kv"]), np.asarray(start["att_kv"]))


def test_v7_time_state_is_the_packages_state_layout(tmp_path):
    model = tmp_path / "v7.pth"
    make_official_checkpoint(model, 7, seed=7, **SIZES)
    cfg, params = rj.load_pth(model)
    time_state = random_time_state(2, 4, 16, seed=7)
    state_file = tmp_path / "state.pth"
    save_state_pth(state_file, cfg, state_from_time_state(cfg, time_state))
    start = load_state_pth(state_file, cfg)
    tokens = np.random.RandomState(7).randint(0, 80, 15).tolist()
    logits, state = run_ours(cfg, params, tokens, start)
    zeros = np.zeros(cfg.n_embd, np.float32)
    by_hand = [entry for l in range(2) for entry in (zeros, time_state[f"blocks.{l}.att.time_state"], zeros)]
    (ref_logits, ref_state), = run_official_many(model, 7, [(tokens, by_hand)])
    assert rel_err(logits, ref_logits) <= TOL
    assert max(rel_err(a, b) for a, b in zip(state, ref_state)) <= TOL


def test_state_file_round_trip_and_errors(tmp_path):
    cfg = rj.RWKVConfig(version=6, **SIZES)
    time_state = random_time_state(2, 4, 16, seed=1)
    state = state_from_time_state(cfg, time_state)
    for key, value in time_state_tensors(cfg, state).items():
        np.testing.assert_array_equal(value, time_state[key])
    path = tmp_path / "state.pth"
    save_state_pth(path, cfg, state)
    np.testing.assert_array_equal(np.asarray(load_state_pth(path, cfg)["att_kv"]), np.asarray(state["att_kv"]))

    partial = dict(time_state)
    del partial["blocks.1.att.time_state"]
    partial["blocks.0.att.time_state"] = np.zeros((4, 16, 8), np.float32)
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.1.att.time_state'\].*"
                                              r"blocks.0.att.time_state: \(4, 16, 8\)"):
        state_from_time_state(cfg, partial)
    with pytest.raises(CheckpointError, match="RWKV-4 has no matrix WKV state"):
        state_from_time_state(rj.RWKVConfig(version=4, n_layer=2, n_embd=64, vocab_size=80), time_state)
    rj.save_pth(tmp_path / "plain.pth", cfg, __import__("helpers").random_params(cfg))
    with pytest.raises(CheckpointError, match="not a state-tuning file"):
        load_state_pth(tmp_path / "plain.pth", cfg)


def test_state_file_is_not_mistaken_for_a_model(tmp_path):
    cfg = rj.RWKVConfig(version=6, **SIZES)
    path = tmp_path / "state.pth"
    save_state_pth(path, cfg, state_from_time_state(cfg, random_time_state(2, 4, 16)))
    for load in (convert.load_checkpoint, rj.load_pth):
        with pytest.raises(CheckpointError, match=r"holds only state-tuning tensors .*load_state_pth"):
            load(path)


def test_save_state_refuses_a_batch_index_out_of_range(tmp_path):
    cfg = rj.RWKVConfig(version=6, **SIZES)
    state = rj.init_state(cfg, 2)
    save_state_pth(tmp_path / "last.pth", cfg, state, batch_index=-1)  # Python indexing, as before
    with pytest.raises(ValueError, match="batch_index 3 is out of range for a state of batch size 2"):
        save_state_pth(tmp_path / "s.pth", cfg, state, batch_index=3)
    assert not (tmp_path / "s.pth").exists()
