"""`model.init` follows the official per-version initialisation (spec §6.8, §7.7, §8.6, §9.8).

Expected values are written here in NumPy straight from the formulas, per layer l of L.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkv_jax as rj

L, C, V, N = 3, 64, 300, 16


@functools.lru_cache(maxsize=None)
def init_params(version: int):
    cfg = rj.RWKVConfig(version=version, n_layer=L, n_embd=C, vocab_size=V, head_size=N)
    params = rj.RWKV(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return cfg, jax.tree_util.tree_map(np.asarray, params)


def ratios(layer: int) -> tuple[float, float]:
    return layer / (L - 1), 1 - layer / L


ddd = np.arange(C) / C
channel = np.arange(C)


def assert_orthogonal(kernel: np.ndarray, gain: float) -> None:
    """A flax kernel [in, out] whose official weight [out, in] was orthogonal_(gain)."""
    w = kernel.T
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    np.testing.assert_allclose(gram, gain**2 * np.eye(gram.shape[0]), atol=1e-5)


@pytest.mark.parametrize("layer", range(L))
def test_v4_time_mix_curves(layer):
    _, p = init_params(4)
    r0, r1 = ratios(layer)
    att = jax.tree_util.tree_map(lambda a: a[layer], p["blocks"]["att"])
    np.testing.assert_allclose(att["time_decay"], -5 + 8 * (channel / (C - 1)) ** (0.7 + 1.3 * r0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(att["time_first"], math.log(0.3) + ((channel + 1) % 3 - 1) * 0.5, rtol=1e-6)
    np.testing.assert_allclose(att["time_mix_v"].ravel(), ddd**r1 + 0.3 * r0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(att["time_mix_r"].ravel(), ddd ** (0.5 * r1), rtol=1e-5, atol=1e-7)
    assert not att["key"]["kernel"].any() and not att["output"]["kernel"].any()
    assert_orthogonal(p["blocks"]["ffn"]["key"]["kernel"][layer], math.sqrt(4))


@pytest.mark.parametrize("version", [5, 6])
@pytest.mark.parametrize("layer", range(L))
def test_v5_v6_decay_bonus_and_group_norm(version, layer):
    _, p = init_params(version)
    r0, r1 = ratios(layer)
    att = jax.tree_util.tree_map(lambda a: a[layer], p["blocks"]["att"])
    n = channel / (C - 1)
    np.testing.assert_allclose(att["time_decay"].ravel(), -6 + 5 * n ** (0.7 + 1.3 * r0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(att["time_faaaa"].ravel(), r0 * (1 - n) + ((channel + 1) % 3 - 1) * 0.1, atol=1e-6)
    np.testing.assert_allclose(att["ln_x"]["scale"], ((1 + layer) / L) ** 0.7, rtol=1e-6)
    assert_orthogonal(att["key"]["kernel"], 0.1)
    assert_orthogonal(att["gate"]["kernel"], 0.1)
    assert_orthogonal(att["receptance"]["kernel"], 1.0)
    assert not att["output"]["kernel"].any()
    assert not p["blocks"]["ffn"]["value"]["kernel"][layer].any()
    if version == 5:
        np.testing.assert_allclose(att["time_mix_g"].ravel(), ddd ** (0.5 * r1), rtol=1e-5, atol=1e-7)
    else:
        np.testing.assert_allclose(att["time_maa_v"].ravel(), 1 - (ddd**r1 + 0.3 * r0), rtol=1e-5, atol=1e-6)
        assert not att["time_maa_w1"].any() and not att["time_decay_w1"].any()
        assert 0 < np.abs(att["time_maa_w2"]).max() <= 0.01 and 0 < np.abs(att["time_decay_w2"]).max() <= 0.01


@pytest.mark.parametrize("layer", range(L))
def test_v7_time_mix_curves_and_loras(layer):
    cfg, p = init_params(7)
    r0, r1 = ratios(layer)
    att = jax.tree_util.tree_map(lambda a: a[layer], p["blocks"]["att"])
    lin = channel / (C - 1) - 0.5
    zig = ((channel % N) - (N - 1) / 2) / ((N - 1) / 2)
    zig = zig * np.abs(zig)
    np.testing.assert_allclose(att["w0"].ravel(), -6 + 6 * (channel / (C - 1)) ** (1 + r0**0.3) + 0.5 + 2.5 * zig,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(att["a0"].ravel(), -0.19 + 0.3 * zig + 0.4 * lin, atol=1e-6)
    np.testing.assert_allclose(att["v0"].ravel(), 0.73 - 0.4 * lin, atol=1e-6)
    np.testing.assert_allclose(att["k_k"].ravel(), 0.71 - 0.1 * lin, atol=1e-6)
    np.testing.assert_allclose(att["k_a"], 1.02, rtol=1e-6)
    np.testing.assert_allclose(att["r_k"], -0.04, rtol=1e-6)
    for name, power in {"x_r": 0.2, "x_w": 0.9, "x_k": 0.7, "x_v": 0.7, "x_a": 0.9, "x_g": 0.2}.items():
        np.testing.assert_allclose(att[name].ravel(), 1 - ddd ** (power * r1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p["blocks"]["ffn"]["x_k"][layer].ravel(), 1 - ddd ** (r1**4), rtol=1e-5, atol=1e-6)
    for name in ("w", "a", "v", "g"):
        assert not att[f"{name}1"].any()
        up = att[f"{name}2"]  # official shape (D, C), orthogonal rows with gain 0.1
        np.testing.assert_allclose(up @ up.T, 0.01 * np.eye(up.shape[0]), atol=1e-6)
    assert_orthogonal(att["key"]["kernel"], 0.1)
    assert_orthogonal(att["value"]["kernel"], 1.0)
    assert not att["output"]["kernel"].any()
    assert (cfg.d_w, cfg.d_a, cfg.d_v, cfg.d_g) == (32, 32, 32, 32)


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_embedding_and_head(version):
    _, p = init_params(version)
    emb = p["emb"]["embedding"]
    assert emb.shape == (V, C) and 0 < np.abs(emb).max() <= 1e-4
    assert_orthogonal(p["head"]["kernel"], 0.5 * math.sqrt(V / C))
    np.testing.assert_array_equal(p["ln0"]["scale"], 1.0)


def test_bf16_params_are_the_fp32_init_rounded():
    # The orthogonal matrices come from an fp32 QR in every parameter dtype (jax 0.11 has no
    # bf16 QR), so a bf16 model starts from exactly the rounded fp32 one.
    _, fp32 = init_params(7)
    bf16_cfg = rj.RWKVConfig(version=7, n_layer=L, n_embd=C, vocab_size=V, head_size=N,
                             param_dtype="bfloat16")
    bf16 = rj.RWKV(bf16_cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    for path, value in jax.tree_util.tree_leaves_with_path(bf16):
        assert value.dtype == jnp.bfloat16, path
    rounded = jax.tree_util.tree_map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)), fp32)
    np.testing.assert_array_equal(np.asarray(bf16["head"]["kernel"]), rounded["head"]["kernel"])
    att = bf16["blocks"]["att"]
    np.testing.assert_array_equal(np.asarray(att["key"]["kernel"]),
                                  rounded["blocks"]["att"]["key"]["kernel"])
