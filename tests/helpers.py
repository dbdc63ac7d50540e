"""Shared test utilities: random (non-degenerate) parameters, error metrics, recording WKV calls."""

from __future__ import annotations

import dataclasses
import functools
import importlib

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

import rwkv_jax as rj


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| (the metric every tolerance below uses)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def tree_rel_err(actual, expected) -> dict[str, float]:
    flat_a = traverse_util.flatten_dict(actual, sep="/")
    flat_e = traverse_util.flatten_dict(expected, sep="/")
    return {k: rel_err(flat_a[k], flat_e[k]) for k in flat_e}


def random_params(cfg: rj.RWKVConfig, seed: int = 0):
    """Official init plus noise, so no path is switched off by a zero-initialised matrix."""
    model = rj.RWKV(cfg)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))["params"]
    flat = traverse_util.flatten_dict(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(flat))
    noisy = {}
    for key, (path, value) in zip(keys, sorted(flat.items())):
        noise = jax.random.normal(key, value.shape, jnp.float32)
        scale = 1.0 / np.sqrt(value.shape[-2]) if path[-1] in ("kernel", "embedding") else 0.1
        noisy[path] = (value.astype(jnp.float32) + scale * noise).astype(value.dtype)
    return traverse_util.unflatten_dict(noisy)


def random_tokens(cfg: rj.RWKVConfig, batch: int, length: int, seed: int = 0) -> jnp.ndarray:
    return jnp.asarray(np.random.RandomState(seed).randint(0, cfg.vocab_size, (batch, length)), jnp.int32)


@functools.lru_cache(maxsize=None)
def forward_fn(cfg: rj.RWKVConfig):
    """`(params, tokens [B, T], state) -> (logits, state)`, jitted once per config."""
    return jax.jit(lambda params, tokens, state: rj.RWKV(cfg).apply({"params": params}, tokens, state))


@functools.lru_cache(maxsize=None)
def step_fn(cfg: rj.RWKVConfig):
    """`(params, token [B], state) -> (logits [B, V], state)` through `RWKV.step`, jitted once per config."""
    return jax.jit(lambda params, token, state: rj.RWKV(cfg).apply({"params": params}, token, state,
                                                                 method=rj.RWKV.step))


# Where each version's time mixing finds its WKV forms (v6's are v5's).
_WKV_FORMS = {4: ("v4", "WKV4"), 5: ("v5", "WKV_DIAG"), 6: ("v5", "WKV_DIAG"), 7: ("v7", "WKV7")}


def record_wkv_calls(version: int, impl: str) -> list[list[int]]:
    """From now on, every call of `version`'s `impl` WKV form ("oracle", "parallel", "pallas")
    appends the [rows, tokens] it sees to the returned list (the form itself still runs)."""
    module_name, name = _WKV_FORMS[version]
    module = importlib.import_module(f"rwkv_jax.versions.{module_name}")
    forms = getattr(module, name)
    seen: list[list[int]] = []

    def recording(*args, form=getattr(forms, impl), **options):
        seen.append(list(args[0].shape[:2]))
        return form(*args, **options)

    setattr(module, name, dataclasses.replace(forms, **{impl: recording}))
    return seen
