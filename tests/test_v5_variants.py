"""RWKV-5.0 and 5.1 (the `RWKV_TimeMix_RWKV5_Preview` checkpoints the official package still loads):
per-head decay and bonus, 5.0 without the gate, the bonus stored raw (`time_faaaa`) or as its log
(`time_first`). Parity with the `rwkv` package (CPU fp32, 1e-4 relative on every position's logits
and the final state), bit-exact `.pth` round trips, and the package's detection of what we write."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import rwkv_jax as rj
from helpers import forward_fn, random_params, rel_err
from official_reference import make_official_checkpoint, official_available, run_official_many

pytestmark = pytest.mark.skipif(not official_available(), reason="torch and the rwkv package are not installed")
TOL = 1e-4


def make_preview_checkpoint(path, variant: str, log_bonus: bool, *, n_layer=2, n_embd=64, head_size=16,
                            vocab=97, seed=0) -> None:
    """A random 5.0/5.1 file in the preview trainer's key order, from a random 5.2 file: one decay
    and bonus per head (the head's first channel), no gate for 5.0, `time_first` = log of a
    positive bonus when `log_bonus`."""
    import torch

    base = make_official_checkpoint(str(path) + ".x052", 5, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab,
                                    head_size=head_size, seed=seed)
    H = n_embd // head_size
    rng = np.random.default_rng(seed)
    out = {}
    for key, value in base.items():
        name = key.split(".", 2)[-1] if key.startswith("blocks.") else key
        prefix = key[: len(key) - len(name)]
        if name == "att.time_decay":
            out[key] = value[:, 0] + rng.normal(0, 0.3, H)
            bonus = rng.uniform(0.2, 1.5, H)
            out[prefix + ("att.time_first" if log_bonus else "att.time_faaaa")] = np.log(bonus) if log_bonus else bonus
        elif name == "att.time_faaaa" or (variant == "5.0" and name in ("att.time_mix_g", "att.gate.weight")):
            continue
        else:
            out[key] = value
    cfg = rj.RWKVConfig(version=5, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab, head_size=head_size,
                        v5_variant=variant, v5_log_bonus=log_bonus)
    order = rj.io.official.official_order(cfg, out)
    torch.save({k: torch.from_numpy(np.asarray(out[k], np.float32)) for k in order}, path)


@pytest.mark.parametrize("variant,log_bonus", [("5.0", True), ("5.0", False), ("5.1", True), ("5.1", False)])
def test_preview_logits_and_states_match_official_package(tmp_path, variant, log_bonus):
    path = tmp_path / "preview.pth"
    make_preview_checkpoint(path, variant, log_bonus, seed=int(variant[-1]) + 2 * log_bonus)
    cfg, params = rj.load_pth(path)
    assert (cfg.v5_variant, cfg.v5_log_bonus, cfg.n_head) == (variant, log_bonus, 4)
    assert ("gate" in params["blocks"]["att"]) == (variant == "5.1")

    rng = np.random.RandomState(3)
    prompt, more = rng.randint(0, 97, 21).tolist(), rng.randint(0, 97, 1).tolist()
    state = rj.init_state(cfg, 1)
    logits, state = forward_fn(cfg)(params, np.asarray([prompt], np.int32), state)
    logits_more, state_more = forward_fn(cfg)(params, np.asarray([more], np.int32), state)
    official_state = rj.state_to_official(cfg, state)
    (ref_logits, ref_state), (ref_more, ref_state_more) = run_official_many(
        path, 5, [(prompt, None), (more, official_state)], expect_detected=float(variant))

    assert rel_err(logits[0], ref_logits) <= TOL
    assert max(rel_err(a, b) for a, b in zip(official_state, ref_state)) <= TOL
    assert rel_err(logits_more[0], ref_more) <= TOL  # the package's one-token path
    assert max(rel_err(a, b) for a, b in zip(rj.state_to_official(cfg, state_more), ref_state_more)) <= TOL


@pytest.mark.parametrize("variant,log_bonus", [("5.0", False), ("5.1", True)])
def test_saved_preview_files_round_trip_bit_exactly_and_are_detected_by_the_package(tmp_path, variant, log_bonus):
    cfg = rj.RWKVConfig(version=5, n_layer=2, n_embd=64, vocab_size=50, head_size=32, v5_variant=variant,
                        v5_log_bonus=log_bonus)
    params = random_params(cfg, seed=4)
    path = tmp_path / "ours.pth"
    rj.save_pth(path, cfg, params)
    cfg2, params2 = rj.load_pth(path)
    assert cfg2 == cfg
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(a, b)
    tokens = list(range(1, 12))
    logits, _ = forward_fn(cfg)(params, np.asarray([tokens], np.int32), rj.init_state(cfg, 1))
    (ref_logits, _), = run_official_many(path, 5, [(tokens, None)], expect_detected=float(variant))
    assert rel_err(logits[0], ref_logits) <= TOL


def test_v5_variant_is_validated():
    with pytest.raises(ValueError, match="v5_variant"):
        rj.RWKVConfig(version=5, n_layer=1, n_embd=64, vocab_size=10, v5_variant="5.3")
    with pytest.raises(ValueError, match="v5_variant"):
        rj.RWKVConfig(version=6, n_layer=1, n_embd=64, vocab_size=10, v5_variant="5.2")
    with pytest.raises(ValueError, match="v5_log_bonus"):
        rj.RWKVConfig(version=5, n_layer=1, n_embd=64, vocab_size=10, v5_log_bonus=True)
    assert rj.RWKVConfig(version=5, n_layer=1, n_embd=64, vocab_size=10).v5_variant == "5.2"
