"""The official optimiser recipe: weight-decay mask and lr multipliers by parameter name, the
schedule, the AdamW update rule, and L2Wrap's gradient (spec §2.4, §6.9, §9.9, §10)."""

from __future__ import annotations

import math

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rwkv_jax as rj
from rwkv_jax.train.config import TrainConfig
from rwkv_jax.train.optim import cross_entropy, decay_mask, l2wrap, lr_multipliers, lr_schedule, make_optimizer

# The official `.weight` tensors with >= 2 dims (spec §9.9, RWKV-v5 `configure_optimizers`).
DECAYED = {
    4: {"emb/embedding", "head/kernel", "blocks/att/key/kernel", "blocks/att/value/kernel",
        "blocks/att/receptance/kernel", "blocks/att/output/kernel", "blocks/ffn/key/kernel",
        "blocks/ffn/value/kernel", "blocks/ffn/receptance/kernel"},
}
DECAYED[5] = DECAYED[4] | {"blocks/att/gate/kernel"}
DECAYED[6] = DECAYED[5]
DECAYED[7] = DECAYED[4] - {"blocks/ffn/receptance/kernel"}
# Every multiplier that is not 1 (spec §10: v4neo decay x2, first x3; v5/v6 decay x2 with
# faaaa and the LoRAs x1; v7 w0 x2).
NOT_ONE = {4: {"blocks/att/time_decay": 2.0, "blocks/att/time_first": 3.0},
           5: {"blocks/att/time_decay": 2.0},
           6: {"blocks/att/time_decay": 2.0},
           7: {"blocks/att/w0": 2.0}}


def param_shapes(version: int) -> dict:
    cfg = rj.RWKVConfig(version=version, n_layer=2, n_embd=64, vocab_size=256, head_size=32)
    return jax.eval_shape(lambda: rj.RWKV(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_weight_decay_only_on_the_official_large_matrices(version):
    mask = traverse_util.flatten_dict(decay_mask(param_shapes(version)), sep="/")
    assert {name for name, decayed in mask.items() if decayed} == DECAYED[version]
    # Named exclusions that are 2-D (or more) and must still not decay.
    never = {"blocks/att/w1", "blocks/att/a2", "blocks/att/g1", "blocks/att/r_k", "blocks/att/time_decay_w1",
             "blocks/att/time_maa_w2", "blocks/att/time_decay", "blocks/att/time_faaaa", "blocks/att/ln_x/scale",
             "blocks/ln1/scale", "ln0/bias"}
    assert not any(mask.get(name, False) for name in never)


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_lr_multipliers_follow_the_official_layerwise_lr(version):
    mults = traverse_util.flatten_dict(lr_multipliers(version, param_shapes(version)), sep="/")
    assert {name: m for name, m in mults.items() if m != 1.0} == NOT_ONE[version]
    for one in ("blocks/att/time_faaaa", "blocks/att/time_decay_w1", "blocks/att/w1", "blocks/att/time_mix_k"):
        assert mults.get(one, 1.0) == 1.0


def test_adam_eps_and_schedule_defaults_per_version():
    assert TrainConfig(version=4).resolved().eps == 1e-8
    assert all(TrainConfig(version=v).resolved().eps == 1e-18 for v in (5, 6, 7))
    assert TrainConfig(version=4).resolved().schedule == "exp"
    assert TrainConfig(version=7).resolved().schedule == "cosine"


def official_lr(step: int, lr_init: float, lr_final: float, warmup: int, total: int, floor: float,
                schedule: str) -> float:
    """The official trainers' lr at 0-based `step` (`global_step` at `on_train_batch_start`), with
    `total` = epoch_count·epoch_steps: RWKV-v4neo/v5 `trainer.py` for "exp" (linear when
    lr_final is 0), the `my_exit_tokens` branch of v5/v7 for "cosine"."""
    if schedule == "exp":
        progress = min(1.0, max(0.0, (step - warmup + 1) / (total - warmup)))
        if lr_final == 0:
            lr = lr_init + (lr_final - lr_init) * progress
        else:
            lr = lr_init * math.exp(math.log(lr_final / lr_init) * progress)
    else:
        progress = min(1.0, max(0.0, (step - warmup) / (total - warmup)))
        factor = lr_final / lr_init
        lr = lr_init * ((0.5 + factor / 2) + (0.5 - factor / 2) * math.cos(math.pi * progress))
    if step < warmup:
        lr = lr * (floor + (1 - floor) * step / warmup)
    return lr


@pytest.mark.parametrize("schedule", ["cosine", "exp"])
@pytest.mark.parametrize("lr_final", [1e-5, 0.0])
def test_schedule_is_the_official_one_at_every_step(schedule, lr_final):
    cfg = TrainConfig(version=7, lr=1e-3, lr_final=lr_final, warmup_steps=10, steps=110, schedule=schedule)
    lr = lr_schedule(cfg)
    ours = [float(lr(step)) for step in range(cfg.steps)]
    official = [official_lr(step, 1e-3, lr_final, 10, 110, 0.01, schedule) for step in range(cfg.steps)]
    np.testing.assert_allclose(ours, official, rtol=2e-5, atol=1e-9)     # fp32 near 0
    np.testing.assert_allclose(ours[0], 1e-3 * 0.01, rtol=1e-6)                # official x(0.01 + 0.99 s/W)
    np.testing.assert_allclose(ours[5], 1e-3 * (0.01 + 0.99 * 0.5), rtol=1e-6)
    if schedule == "exp":      # the official +1: lr_final on the last step, halfway 50 steps after warm-up
        np.testing.assert_allclose(ours[109], lr_final, rtol=1e-5)
        halfway = 0.5e-3 if lr_final == 0 else (1e-3 * lr_final) ** 0.5      # linear decay to 0
        np.testing.assert_allclose(ours[59], halfway, rtol=1e-5)
    else:
        np.testing.assert_allclose(ours[10], 1e-3, rtol=1e-6)
        np.testing.assert_allclose(ours[60], 0.5 * (1e-3 + lr_final), rtol=1e-5)
    np.testing.assert_allclose(float(lr(110)), lr_final, rtol=1e-5)


def test_one_update_is_torch_adamw_with_multipliers_and_masked_decay():
    """First Adam step: m̂ = g, v̂ = g², so p' = p - lr·m·(g/(|g|+eps) + d·wd·p)."""
    params = {"blocks": {"att": {"time_decay": jnp.full((2, 3), 0.5), "time_first": jnp.full((2, 3), -0.5),
                                 "key": {"kernel": jnp.full((2, 3, 3), 0.25)}}},
              "ln0": {"scale": jnp.ones(3)}}
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.01), params)     # global norm < 1: no clipping
    cfg = TrainConfig(version=4, lr=1e-2, lr_final=1e-2, warmup_steps=0, weight_decay=0.1, steps=10)
    tx = make_optimizer(cfg, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    adam = 0.01 / (0.01 + 1e-8)
    expect = {"blocks": {"att": {"time_decay": 0.5 - 1e-2 * 2 * adam, "time_first": -0.5 - 1e-2 * 3 * adam,
                                 "key": {"kernel": 0.25 - 1e-2 * (adam + 0.1 * 0.25)}}},
              "ln0": {"scale": 1.0 - 1e-2 * adam}}
    for path, value in traverse_util.flatten_dict(new, sep="/").items():
        np.testing.assert_allclose(np.asarray(value), traverse_util.flatten_dict(expect, sep="/")[path], rtol=1e-6,
                                   err_msg=path)


def test_l2wrap_keeps_the_loss_and_adds_exactly_the_documented_gradient():
    B, T, V, factor = 2, 3, 5, 1e-4
    logits = jax.random.normal(jax.random.PRNGKey(0), (B, T, V)) * 3
    targets = jnp.array([[0, 1, 2], [3, 4, 0]])
    plain = lambda y: cross_entropy(y, targets)                         # noqa: E731
    wrapped = lambda y: l2wrap(cross_entropy(y, targets), y, factor)    # noqa: E731
    assert float(wrapped(logits)) == float(plain(logits))

    # Spec §2.4: + max_logit·1e-4/(B·T) at each position's arg-max, zero elsewhere ...
    expected = jax.nn.one_hot(jnp.argmax(logits, -1), V) * (jnp.max(logits, -1) * factor / (B * T))[..., None]
    extra = jax.grad(lambda y: l2wrap(jnp.float32(1.7), y, factor))(logits)   # the loss input held constant
    np.testing.assert_allclose(np.asarray(extra), np.asarray(expected), rtol=1e-6)
    # ... which is the gradient of factor·mean(max_v y²)/2,
    penalty = jax.grad(lambda y: factor * jnp.mean(jnp.max(y, -1) ** 2) / 2)(logits)
    np.testing.assert_allclose(np.asarray(extra), np.asarray(penalty), rtol=1e-6)
    # ... added to the cross-entropy gradient, which passes through unchanged,
    assert float(jax.grad(lambda loss: l2wrap(loss, logits, factor))(1.0)) == 1.0
    np.testing.assert_allclose(np.asarray(jax.grad(wrapped)(logits)),
                               np.asarray(jax.grad(plain)(logits) + expected), rtol=1e-6, atol=1e-9)
    # ... and scaled by the incoming gradient, so a scaled loss stays consistent.
    scaled = jax.grad(lambda y: 3.0 * l2wrap(jnp.float32(1.7), y, factor))(logits)
    np.testing.assert_allclose(np.asarray(scaled), 3.0 * np.asarray(expected), rtol=1e-6)
