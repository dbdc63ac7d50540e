"""Parity with the official `rwkv` package (0.8.32, CPU, fp32) on random official-format checkpoints.

Every position's logits and the final per-layer state must agree to 1e-4 relative
(max |Δ| / max |reference|), for v4-v7, fp32 and bf16 files, several shapes.

bf16 files and the package's ln0 quirk: for v4-v6 the package's legacy class applies `ln0` to the
bf16 embedding table in bf16 (`bf16_round(LayerNorm(emb))`) and only then up-casts, while every
other weight is up-cast exactly. We compute in fp32 from the exact bf16 values, so we compare
against the package run on the exact fp32 up-cast of the same file (same weights, all-fp32
computation). A second check runs the package on the bf16 file itself and bounds the quirk's
effect (it moves logits by up to ~1e-2 relative). The v7 class up-casts everything before ln0,
so bf16 v7 files are compared directly.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkv_jax as rj
from helpers import forward_fn, rel_err
from official_reference import make_official_checkpoint, official_available, run_official_many

pytestmark = pytest.mark.skipif(not official_available(), reason="torch and the rwkv package are not installed")
TOL = 1e-4
# (version, dtype, n_layer, n_embd, head_size, vocab)
CASES = [
    (4, "fp32", 2, 64, 64, 97), (4, "bf16", 3, 96, 64, 300),
    (5, "fp32", 2, 64, 16, 97), (5, "bf16", 3, 128, 64, 300),
    (6, "fp32", 2, 64, 16, 97), (6, "bf16", 3, 128, 64, 300),
    (7, "fp32", 2, 64, 16, 97), (7, "bf16", 3, 128, 64, 300),
]


def run_ours(cfg, params, tokens, official_state=None):
    state = rj.init_state(cfg, 1) if official_state is None else rj.state_from_official(cfg, official_state)
    logits, state = forward_fn(cfg)(params, jnp.asarray([tokens], jnp.int32), state)
    return np.asarray(logits[0]), rj.state_to_official(cfg, state)


def assert_state_close(ours, official, tol=TOL):
    assert len(ours) == len(official)
    errors = [rel_err(a, b) for a, b in zip(ours, official)]
    assert max(errors) <= tol, errors


def fp32_copy(path, out_path):
    """The exact fp32 up-cast of a checkpoint (what an all-fp32 computation of it sees)."""
    import torch

    tensors = torch.load(path, map_location="cpu", weights_only=True)
    torch.save({k: v.float() for k, v in tensors.items()}, out_path)
    return out_path


@pytest.mark.parametrize("version,dtype,n_layer,n_embd,head_size,vocab", CASES)
def test_logits_and_states_match_official_package(tmp_path, version, dtype, n_layer, n_embd, head_size, vocab):
    path = str(tmp_path / "model.pth")
    make_official_checkpoint(path, version, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab,
                             head_size=head_size, dtype=dtype, seed=version)
    cfg, params = rj.load_pth(path)
    assert (cfg.version, cfg.n_layer, cfg.n_embd, cfg.vocab_size) == (version, n_layer, n_embd, vocab)

    rng = np.random.RandomState(version)
    prompt, more = rng.randint(0, vocab, 23).tolist(), rng.randint(0, vocab, 9).tolist()
    single = [int(rng.randint(0, vocab))]
    logits, state = run_ours(cfg, params, prompt)
    logits_more, state_more = run_ours(cfg, params, more, state)
    logits_single, state_single = run_ours(cfg, params, single, state)

    reference_file = path if (dtype == "fp32" or version == 7) else fp32_copy(path, str(tmp_path / "fp32.pth"))
    (ref_logits, ref_state), = run_official_many(reference_file, version, [(prompt, None)])
    # Continue the package from *our* state: checks state_to_official's layout as well.
    (ref_more, ref_state_more), (ref_single, ref_state_single) = run_official_many(
        reference_file, version, [(more, state), (single, state)])

    assert rel_err(logits, ref_logits) <= TOL
    assert_state_close(state, ref_state)
    assert rel_err(logits_more, ref_more) <= TOL
    assert_state_close(state_more, ref_state_more)
    assert rel_err(logits_single, ref_single) <= TOL  # the package's one-token path vs our step
    assert_state_close(state_single, ref_state_single)

    if reference_file != path:
        (quirk_logits, _), = run_official_many(path, version, [(prompt, None)])
        assert rel_err(logits, quirk_logits) <= 3e-2


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_save_pth_round_trip_is_bit_exact_and_loads_in_official_package(tmp_path, version):
    original = str(tmp_path / "original.pth")
    make_official_checkpoint(original, version, n_layer=2, n_embd=64, vocab_size=80, head_size=16,
                             dtype="bf16", seed=11)
    cfg, params = rj.load_pth(original)
    saved = str(tmp_path / "saved.pth")
    rj.save_pth(saved, cfg, params)
    cfg2, params2 = rj.load_pth(saved)
    assert cfg2 == cfg
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))

    import torch

    original_tensors = torch.load(original, weights_only=True)
    saved_tensors = torch.load(saved, weights_only=True)
    assert set(saved_tensors) == set(original_tensors)
    for key, value in original_tensors.items():
        assert torch.equal(saved_tensors[key], value), key

    tokens = np.random.RandomState(0).randint(0, 80, 12).tolist()
    (ref_original, _), = run_official_many(original, version, [(tokens, None)])
    (ref_saved, _), = run_official_many(saved, version, [(tokens, None)])
    np.testing.assert_array_equal(ref_saved, ref_original)


def test_v7_file_without_layer0_value_lora_loads_and_matches(tmp_path):
    path = str(tmp_path / "v7.pth")
    make_official_checkpoint(path, 7, n_layer=2, n_embd=64, vocab_size=90, head_size=32, dtype="fp32",
                             seed=5, with_layer0_v=False)
    cfg, params = rj.load_pth(path)
    assert not np.any(np.asarray(params["blocks"]["att"]["v1"][0]))
    tokens = np.random.RandomState(1).randint(0, 90, 15).tolist()
    logits, state = run_ours(cfg, params, tokens)
    (ref_logits, ref_state), = run_official_many(path, 7, [(tokens, None)])
    assert rel_err(logits, ref_logits) <= TOL
    assert_state_close(state, ref_state)


def test_forward_module_prefix_is_stripped(tmp_path):
    import torch

    path = str(tmp_path / "plain.pth")
    make_official_checkpoint(path, 5, n_layer=1, n_embd=64, vocab_size=50, head_size=16, seed=2)
    tensors = torch.load(path, weights_only=True)
    prefixed = str(tmp_path / "prefixed.pth")
    torch.save({f"_forward_module.{k}": v for k, v in tensors.items()}, prefixed)
    cfg_a, params_a = rj.load_pth(path)
    cfg_b, params_b = rj.load_pth(prefixed)
    assert cfg_a == cfg_b
    for a, b in zip(jax.tree_util.tree_leaves(params_a), jax.tree_util.tree_leaves(params_b)):
        np.testing.assert_array_equal(a, b)


def test_inconsistent_checkpoints_name_the_offending_keys(tmp_path):
    import torch

    path = str(tmp_path / "good.pth")
    make_official_checkpoint(path, 6, n_layer=2, n_embd=64, vocab_size=50, head_size=16, seed=3)
    tensors = torch.load(path, weights_only=True)

    missing = dict(tensors)
    del missing["blocks.1.att.gate.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(rj.io.official.CheckpointError, match=r"missing keys \['blocks.1.att.gate.weight'\]"):
        rj.load_pth(tmp_path / "missing.pth")

    wrong = dict(tensors)
    wrong["blocks.1.ffn.value.weight"] = torch.zeros(64, 7)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(rj.io.official.CheckpointError, match=r"blocks.1.ffn.value.weight: \(64, 7\)"):
        rj.load_pth(tmp_path / "wrong.pth")

    extra = dict(tensors)
    extra["head_q.weight"] = torch.zeros(256, 64)
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(rj.io.official.CheckpointError, match=r"unexpected keys \['head_q.weight'\]"):
        rj.load_pth(tmp_path / "extra.pth")

    with pytest.raises(rj.io.official.CheckpointError, match="emb.weight"):
        torch.save({"foo": torch.zeros(3)}, tmp_path / "foreign.pth")
        rj.load_pth(tmp_path / "foreign.pth")


def test_malicious_checkpoint_is_refused_before_running(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import torch

    path = tmp_path / "evil.pth"
    torch.save({"emb.weight": Payload()}, path)
    with pytest.raises(rj.io.official.PthError, match="forbidden global"):
        rj.load_pth(path)
    assert not marker.exists()
