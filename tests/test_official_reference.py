"""Small tests of ``tests/official_reference.py`` (the official-package ground-truth helper).

Every ``run_official*`` call starts a subprocess (~2-3 s: torch import, TorchScript, load), so
the runs are batched with ``run_official_many``: 2 subprocesses per fp32 case, 1 per bf16 case.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import official_reference as ref  # noqa: E402

try:
    import torch  # noqa: F401

    _HAVE_TORCH = True
except ImportError:  # pragma: no cover
    _HAVE_TORCH = False

needs_torch = pytest.mark.skipif(not _HAVE_TORCH, reason="torch not importable")
needs_official = pytest.mark.skipif(not ref.official_available(), reason="torch or rwkv (official package) not importable")

VERSIONS = (4, 5, 6, 7)
V = 97
TOKENS = [3, 17, 0, 96, 42, 42, 5, 88, 13, 61, 7, 29]  # T = 12
SPLIT = 5


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (b is the reference)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _assert_state_close(got, want, tol, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        r = _rel(g, w)
        assert r <= tol, f"{what}: state[{i}] rel err {r:.3g}"


# Spec tables 6.6, 7.5, 8.4, 9.4 restated independently of the helper, in module registration order.
def _expected_shapes(version, *, L, C, V, F, H=0, N=0, dims=None, with_layer0_v=True):
    A = C
    one = (1, 1, C)
    out = {"emb.weight": (V, C)}
    for l in range(L):
        p = f"blocks.{l}."
        blk = {"ln1.weight": (C,), "ln1.bias": (C,), "ln2.weight": (C,), "ln2.bias": (C,)}
        if l == 0:
            blk.update({"ln0.weight": (C,), "ln0.bias": (C,)})
        if version == 4:
            att = {"time_decay": (A,), "time_first": (A,), "time_mix_k": one, "time_mix_v": one, "time_mix_r": one,
                   "key.weight": (A, C), "value.weight": (A, C), "receptance.weight": (A, C), "output.weight": (C, A)}
            ffn = {"time_mix_k": one, "time_mix_r": one, "key.weight": (F, C), "receptance.weight": (C, C), "value.weight": (C, F)}
        elif version == 5:
            att = {"time_mix_k": one, "time_mix_v": one, "time_mix_r": one, "time_mix_g": one,
                   "time_decay": (H, N), "time_faaaa": (H, N),
                   "receptance.weight": (A, C), "key.weight": (A, C), "value.weight": (A, C), "output.weight": (C, A),
                   "gate.weight": (A, C), "ln_x.weight": (A,), "ln_x.bias": (A,)}
            ffn = {"time_mix_k": one, "time_mix_r": one, "key.weight": (F, C), "receptance.weight": (C, C), "value.weight": (C, F)}
        elif version == 6:
            Dm, Dd = dims["mix"], dims["decay"]
            att = {"time_maa_x": one, "time_maa_w": one, "time_maa_k": one, "time_maa_v": one, "time_maa_r": one,
                   "time_maa_g": one, "time_maa_w1": (C, 5 * Dm), "time_maa_w2": (5, Dm, C),
                   "time_decay": (1, 1, A), "time_decay_w1": (C, Dd), "time_decay_w2": (Dd, A), "time_faaaa": (H, N),
                   "receptance.weight": (A, C), "key.weight": (A, C), "value.weight": (A, C), "output.weight": (C, A),
                   "gate.weight": (A, C), "ln_x.weight": (A,), "ln_x.bias": (A,)}
            ffn = {"time_maa_k": one, "time_maa_r": one, "key.weight": (F, C), "receptance.weight": (C, C), "value.weight": (C, F)}
        else:
            Dw, Da, Dv, Dg = dims["w"], dims["a"], dims["v"], dims["g"]
            att = {"x_r": one, "x_w": one, "x_k": one, "x_v": one, "x_a": one, "x_g": one,
                   "w0": one, "w1": (C, Dw), "w2": (Dw, C), "a0": one, "a1": (C, Da), "a2": (Da, C),
                   "v0": one, "v1": (C, Dv), "v2": (Dv, C), "g1": (C, Dg), "g2": (Dg, C),
                   "k_k": one, "k_a": one, "r_k": (H, N),
                   "receptance.weight": (C, C), "key.weight": (C, C), "value.weight": (C, C), "output.weight": (C, C),
                   "ln_x.weight": (C,), "ln_x.bias": (C,)}
            if l == 0 and not with_layer0_v:
                for k in ("v0", "v1", "v2"):
                    del att[k]
            ffn = {"x_k": one, "key.weight": (F, C), "value.weight": (C, F)}
        for k, s in blk.items():
            out[p + k] = s
        for k, s in att.items():
            out[p + "att." + k] = s
        for k, s in ffn.items():
            out[p + "ffn." + k] = s
    out.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return out


# Two configurations per version: fp32 with defaults, bf16 with non-default sizes/options.
CASES = {
    (v, "fp32"): dict(n_layer=2, n_embd=128, head_size=64) for v in VERSIONS
}
CASES.update({
    (4, "bf16"): dict(n_layer=2, n_embd=64, dim_ffn=96),
    (5, "bf16"): dict(n_layer=2, n_embd=64, head_size=32),
    (6, "bf16"): dict(n_layer=2, n_embd=64, head_size=32, lora_dims={"mix": 16, "decay": 24}),
    (7, "bf16"): dict(n_layer=2, n_embd=64, head_size=32, with_layer0_v=False, lora_dims={"w": 16, "a": 24, "v": 8, "g": 40}),
})
CASE_IDS = [f"v{v}-{dt}" for (v, dt) in CASES]


def _make(tmp_path, version, dtype, seed=0):
    cfg = CASES[(version, dtype)]
    path = tmp_path / f"v{version}_{dtype}.pth"
    w = ref.make_official_checkpoint(path, version, vocab_size=V, dtype=dtype, seed=seed, **cfg)
    return path, w, cfg


def _expected_for(version, cfg):
    C = cfg["n_embd"]
    hs = cfg.get("head_size", 64)
    dims = ref.default_lora_dims(version, C)
    dims.update(cfg.get("lora_dims") or {})
    F = cfg.get("dim_ffn") or ref.default_dim_ffn(version, C)
    return _expected_shapes(version, L=cfg["n_layer"], C=C, V=V, F=F, H=C // hs, N=hs, dims=dims,
                            with_layer0_v=cfg.get("with_layer0_v", True))


# --------------------------------------------------------------------------------------------
# Checkpoint writing (no subprocess)
# --------------------------------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("version,dtype", list(CASES), ids=CASE_IDS)
def test_checkpoint_matches_torch_load_and_spec(tmp_path, version, dtype):
    import torch

    path, w, cfg = _make(tmp_path, version, dtype)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert type(sd) is dict
    expected = _expected_for(version, cfg)
    assert list(sd) == list(expected), "keys / key order differ from released checkpoints"
    assert list(w) == list(sd)
    want_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    for k, t in sd.items():
        assert tuple(t.shape) == expected[k], k
        assert t.dtype == want_dtype, k
        assert w[k].dtype == np.float32 and w[k].shape == expected[k], k
        # bf16 -> fp32 upcast is exact, so equality is exact.
        np.testing.assert_array_equal(w[k], t.float().numpy(), err_msg=k)
    # Nothing vacuous: every matrix is random, nothing all-zero.
    for k, a in w.items():
        assert np.any(a != 0), k
        if a.ndim == 2 and "r_k" not in k and "time_" not in k:
            assert a.std() > 1e-3, k


@needs_torch
def test_checkpoint_seeded_and_defaults(tmp_path):
    a = ref.make_official_checkpoint(tmp_path / "a.pth", 7, n_layer=2, n_embd=64, vocab_size=50, seed=3)
    b = ref.make_official_checkpoint(tmp_path / "b.pth", 7, n_layer=2, n_embd=64, vocab_size=50, seed=3)
    c = ref.make_official_checkpoint(tmp_path / "c.pth", 7, n_layer=2, n_embd=64, vocab_size=50, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["head.weight"], c["head.weight"])
    # Spec 9.4 formula: C=768 -> 64/64/32/128, C=2048 -> 96/96/64/256; tiny C -> 32.
    assert ref.default_lora_dims(7, 768) == {"w": 64, "a": 64, "v": 32, "g": 128}
    assert ref.default_lora_dims(7, 2048) == {"w": 96, "a": 96, "v": 64, "g": 256}
    assert ref.default_lora_dims(7, 64) == {"w": 32, "a": 32, "v": 32, "g": 32}
    assert ref.default_dim_ffn(6, 2048) == 7168 and ref.default_dim_ffn(4, 64) == 256
    with pytest.raises(ValueError):
        ref.make_official_checkpoint(tmp_path / "d.pth", 5, n_layer=2, n_embd=96, vocab_size=50)  # 96 % 64
    with pytest.raises(ValueError):
        ref.make_official_checkpoint(tmp_path / "e.pth", 6, n_layer=2, n_embd=64, vocab_size=50, lora_dims={"w": 8})


# --------------------------------------------------------------------------------------------
# Running the package
# --------------------------------------------------------------------------------------------


def _check_run(version, cfg, logits, state, T):
    assert logits.shape == (T, V) and logits.dtype == np.float32
    assert np.all(np.isfinite(logits))
    per_layer = 5 if version == 4 else 3
    assert len(state) == per_layer * cfg["n_layer"]
    want = ref.state_shapes(version, n_layer=cfg["n_layer"], n_embd=cfg["n_embd"], head_size=cfg.get("head_size", 64))
    assert [s.shape for s in state] == want
    for s in state:
        assert s.dtype == np.float32 and np.all(np.isfinite(s))
    # Nontrivial numerics: logits vary over tokens and positions; every state entry moved.
    assert logits.std() > 0.1
    assert np.max(np.abs(np.diff(logits, axis=0))) > 0.1
    for i, s in enumerate(state):
        if version == 4 and i % 5 == 3:
            assert np.all(s > -1e29), "pp still at its -1e30 init"
        assert np.max(np.abs(s)) > 1e-3, f"state[{i}] ~ 0"


@needs_official
@pytest.mark.parametrize("version", VERSIONS, ids=[f"v{v}" for v in VERSIONS])
def test_fp32_run_and_state_passing(tmp_path, version):
    path, _, cfg = _make(tmp_path, version, "fp32")
    T = len(TOKENS)
    full, prefix, first, cold_suffix, all_but_last = ref.run_official_many(
        path, version,
        [(TOKENS, None), (TOKENS[:SPLIT], None), (TOKENS[:1], None), (TOKENS[SPLIT:], None), (TOKENS[:-1], None)],
    )
    _check_run(version, cfg, *full, T)
    _check_run(version, cfg, *prefix, SPLIT)
    assert first[0].shape == (1, V)

    # Passing a state must not mutate the caller's arrays.
    prefix_state_copy = [s.copy() for s in prefix[1]]
    split, after_first, last_one = ref.run_official_many(
        path, version,
        [(TOKENS[SPLIT:], prefix[1]), (TOKENS[1:], first[1]), (TOKENS[-1:], all_but_last[1])],
    )
    assert all(np.array_equal(a, b) for a, b in zip(prefix[1], prefix_state_copy))

    # Documented property: all at once == prefix, then the rest from the returned state.
    assert _rel(prefix[0], full[0][:SPLIT]) <= 1e-5
    assert _rel(split[0], full[0][SPLIT:]) <= 1e-5
    _assert_state_close(split[1], full[1], 1e-5, "seq+seq")
    # One-token path (T == 1) from the zero state, then sequence mode from its state.
    assert _rel(first[0], full[0][:1]) <= 1e-5
    assert _rel(after_first[0], full[0][1:]) <= 1e-5
    _assert_state_close(after_first[1], full[1], 1e-5, "one+seq")
    # One-token path from a given state.
    assert last_one[0].shape == (1, V)
    assert _rel(last_one[0], full[0][-1:]) <= 1e-5
    _assert_state_close(last_one[1], full[1], 1e-5, "seq+one")
    # The check has teeth: without the state the suffix logits are clearly different.
    assert _rel(cold_suffix[0], full[0][SPLIT:]) > 1e-2


@needs_official
@pytest.mark.parametrize("version", VERSIONS, ids=[f"v{v}" for v in VERSIONS])
def test_bf16_run(tmp_path, version):
    path, _, cfg = _make(tmp_path, version, "bf16")
    T = 9
    logits, state = ref.run_official(path, version, TOKENS[:T])
    _check_run(version, cfg, logits, state, T)
    assert ref.LAST_RUN_SECONDS is not None and ref.LAST_RUN_SECONDS > 0


@needs_official
def test_one_layer_v52_is_misdetected_by_package(tmp_path):
    """Package quirk (spec 13.3): with released key order, 5.2 is only recognised from layer 1 on."""
    path = tmp_path / "v5_1layer.pth"
    ref.make_official_checkpoint(path, 5, n_layer=1, n_embd=64, vocab_size=V)
    with pytest.raises(RuntimeError, match=r"detected v5\.1"):
        ref.run_official(path, 5, [1, 2])
