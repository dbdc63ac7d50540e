"""`RWKVConfig(wkv="pallas")` runs the kernels inside the model (interpret mode on CPU) with the
parallel form's results, and `wkv="auto"` only picks a kernel where it is verified."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import rwkv_jax as rj
import rwkv_jax.config as config_lib
from tests.helpers import random_params, random_tokens, rel_err

# head_size 32 keeps interpret mode cheap; T=40 is not a multiple of any kernel chunk.
CONFIGS = {4: dict(n_embd=32), 5: dict(n_embd=64, head_size=32), 6: dict(n_embd=64, head_size=32),
           7: dict(n_embd=64, head_size=32)}


def small_config(version: int, wkv: str) -> rj.RWKVConfig:
    return rj.RWKVConfig(version=version, n_layer=2, vocab_size=50, wkv=wkv, **CONFIGS[version])


# v7 in the default tier; the other kernels' wiring in the slow tier (interpret mode is slow).
@pytest.mark.parametrize("version", [pytest.param(4, marks=pytest.mark.slow), pytest.param(5, marks=pytest.mark.slow),
                                     pytest.param(6, marks=pytest.mark.slow), 7])
def test_pallas_model_matches_parallel_form_in_logits_state_and_gradients(version):
    parallel, pallas = small_config(version, "parallel"), small_config(version, "pallas")
    params = random_params(parallel)
    tokens = random_tokens(parallel, 2, 40)

    def loss_and_outputs(cfg, params):
        logits, state = rj.RWKV(cfg).apply({"params": params}, tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), (logits, state)

    grad_fn = jax.value_and_grad(loss_and_outputs, argnums=1, has_aux=True)
    (_, (logits, state)), grads = jax.jit(grad_fn, static_argnums=0)(parallel, params)
    (_, (logits_k, state_k)), grads_k = jax.jit(grad_fn, static_argnums=0)(pallas, params)
    assert rel_err(logits_k, logits) < 1e-4
    for name in state:
        assert rel_err(state_k[name], state[name]) < 1e-4, name
    errors = jax.tree_util.tree_map(rel_err, grads_k, grads)
    assert max(jax.tree_util.tree_leaves(errors)) < 1e-3, errors


def test_pallas_refuses_document_resets():
    cfg = small_config(7, "pallas")
    tokens = random_tokens(cfg, 1, 8)
    reset = jnp.zeros(tokens.shape, bool).at[0, 4].set(True)
    with pytest.raises(ValueError, match="does not support document resets"):
        rj.RWKV(cfg).apply({"params": {}}, tokens, None, reset)


def test_auto_keeps_the_parallel_form_where_kernels_are_not_verified():
    assert config_lib.pallas_platform() is None  # the CPU CI machine
    for version in (1, 4, 5, 6, 7):
        assert rj.RWKVConfig(version=version, n_layer=1, n_embd=64, vocab_size=10).wkv_impl == "parallel"


def test_auto_picks_the_kernel_only_for_verified_platforms_and_covered_shapes(monkeypatch):
    monkeypatch.setattr(config_lib, "pallas_platform", lambda: "gpu")
    cfg = dict(version=7, n_layer=1, n_embd=128, vocab_size=10)
    assert rj.RWKVConfig(**cfg).wkv_impl == "parallel"  # gpu not verified
    monkeypatch.setattr(config_lib, "PALLAS_VERIFIED_PLATFORMS", ("gpu",))
    assert rj.RWKVConfig(**cfg).wkv_impl == "pallas"
    assert rj.RWKVConfig(**cfg, head_size=16).wkv_impl == "parallel"  # head size no kernel test covers
    assert rj.RWKVConfig(**cfg, dtype="float16").wkv_impl == "parallel"
    assert rj.RWKVConfig(version=3, n_layer=1, n_embd=64, vocab_size=10).wkv_impl == "parallel"  # no v3 kernel


def test_pallas_is_refused_for_versions_without_a_kernel():
    with pytest.raises(ValueError, match="not available for RWKV-2"):
        rj.RWKVConfig(version=2, n_layer=1, n_embd=64, vocab_size=10, wkv="pallas")
