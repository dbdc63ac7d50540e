"""The official RWKV optimiser recipe in optax, and the L2Wrap loss term (spec §2.4, §6.9, §9.9, §10).

AdamW, β = (0.9, 0.99), decoupled weight decay only on the large matrices, per-parameter
learning-rate multipliers, a warm-up then cosine or exponential decay, global-norm clipping.
The update of a parameter p with multiplier m and decay mask d is, as in the official trainers
(torch AdamW: every parameter group's lr is `m·lr`, its weight decay `d·wd`):

    p <- p - lr(t)·m·(adam(g) + d·wd·p)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import optax

from rwkv_jax.train.config import TrainConfig

Array = jax.Array
Params = dict[str, Any]

# Leaves that are official `.weight` tensors with >= 2 dims: the embedding, the head and every
# projection (att r/k/v/o/gate, ffn k/v/r). Only these are weight-decayed; decays, bonuses, mixes,
# norms and the LoRA factors (v6 `time_*_w1/w2`, v7 `w1..g2`, 2-D but not `.weight`) are not.
DECAYED_LEAVES = ("kernel", "embedding")
# The official layer-wise lr multipliers (v4neo / RWKV-v5 `configure_optimizers`, v7 train_temp),
# by exact leaf name; everything else is x1. v5/v6 `time_faaaa` and the v6 LoRAs
# (`time_decay_w1/w2`) are x1 there too.
LR_MULTIPLIERS = {
    1: {}, 2: {}, 3: {},  # plain Adam(W) in the v1-v3 trainers
    4: {"time_decay": 2.0, "time_first": 3.0},
    5: {"time_decay": 2.0},
    6: {"time_decay": 2.0},
    7: {"w0": 2.0},
}


def _path_map(fn, params: Params) -> Params:
    """Apply `fn(path "a/b/c", leaf)` to every leaf of a nested-dict parameter tree."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict({path: fn(path, leaf) for path, leaf in flat.items()}, sep="/")


def is_decayed(path: str) -> bool:
    """Whether the parameter at `path` (e.g. "blocks/att/key/kernel") gets weight decay."""
    return path.rsplit("/", 1)[-1] in DECAYED_LEAVES


def lr_multiplier(version: int, path: str) -> float:
    """The official learning-rate multiplier of the parameter at `path` for RWKV-`version`."""
    return LR_MULTIPLIERS[version].get(path.rsplit("/", 1)[-1], 1.0)


def decay_mask(params: Params) -> Params:
    """A tree of bools, True where weight decay applies (see `DECAYED_LEAVES`)."""
    return _path_map(lambda path, _: is_decayed(path), params)


def lr_multipliers(version: int, params: Params) -> Params:
    """A tree of floats: each parameter's learning-rate multiplier."""
    return _path_map(lambda path, _: lr_multiplier(version, path), params)


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Warm-up `lr·(floor + (1-floor)·s/W)` for s < W, then cosine or exponential decay to `lr_final`.

    `s` is the 0-based index of the step being taken (optax passes the number of updates done so
    far), which is the official trainers' `global_step` at the start of a batch; `cfg.steps` is
    their `epoch_count·epoch_steps`. The two decays follow their trainers exactly:

    - "exp" (RWKV-v4neo `trainer.py`): `lr·(lr_final/lr)^progress`, or the linear
      `lr + (lr_final - lr)·progress` when lr_final is 0 (which no exponential reaches), with
      progress = (s - W + 1)/(steps - W). The official `+1` is kept: it is relative to the same
      step index as ours, so lr_final is reached on the last step, s = steps - 1.
    - "cosine" (RWKV-v5/v7 `my_exit_tokens`): `lr_final + (lr-lr_final)·(1+cos(π·progress))/2`
      with progress = (s - W)/(steps - W): there the formula has no `+1`.
    """
    cfg = cfg.resolved()
    lr, lr_final, warmup, floor = cfg.lr, cfg.lr_final, cfg.warmup_steps, cfg.warmup_floor
    decay_steps = max(cfg.steps - warmup, 1)

    def schedule(step: Array) -> Array:
        step = jnp.asarray(step, jnp.float32)
        warm = lr * (floor + (1.0 - floor) * step / max(warmup, 1))
        if cfg.schedule == "exp":
            progress = jnp.clip((step - warmup + 1) / decay_steps, 0.0, 1.0)
            if lr_final == 0:
                decayed = lr + (lr_final - lr) * progress
            else:
                decayed = lr * (lr_final / lr) ** progress
        else:
            progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
            decayed = lr_final + (lr - lr_final) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup, warm, decayed)

    return schedule


def _scale_by_tree(multipliers: Params) -> optax.GradientTransformation:
    return optax.stateless(lambda updates, params=None: jax.tree.map(lambda u, m: u * m, updates, multipliers))


def make_optimizer(cfg: TrainConfig, params: Params) -> optax.GradientTransformation:
    """The official AdamW recipe for `cfg.version` (see the module docstring)."""
    cfg = cfg.resolved()
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps))
    if cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(params)))
    if cfg.layerwise_lr:
        parts.append(_scale_by_tree(lr_multipliers(cfg.version, params)))
    parts.append(optax.scale_by_learning_rate(lr_schedule(cfg)))
    return optax.chain(*parts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def l2wrap(loss: Array, logits: Array, factor: float = 1e-4) -> Array:
    """L2Wrap (spec §2.4): returns `loss` unchanged; in the backward pass adds to `logits [B, T, V]`
    the gradient `g·factor/(B·T)·max_v y` at each position's arg-max logit (zero elsewhere).

    That is the gradient of `factor·mean_{b,t}(max_v y²)/2`: it keeps the logits from drifting
    large. Unlike the original autograd function the extra term is scaled by the incoming
    gradient `g`, so it stays right when the loss is scaled (the v7 trainer's note).
    """
    del logits, factor
    return loss


def _l2wrap_fwd(loss: Array, logits: Array, factor: float) -> tuple[Array, Array]:
    return loss, logits


def _l2wrap_bwd(factor: float, logits: Array, g: Array) -> tuple[Array, Array]:
    B, T = logits.shape[0], logits.shape[1]
    ids = jnp.argmax(logits, axis=-1)
    peak = jnp.max(logits, axis=-1)
    dlogits = jax.nn.one_hot(ids, logits.shape[-1], dtype=logits.dtype) * (peak * (factor / (B * T)))[..., None]
    return g, (g * dlogits).astype(logits.dtype)


l2wrap.defvjp(_l2wrap_fwd, _l2wrap_bwd)


def cross_entropy(logits: Array, targets: Array) -> Array:
    """Mean next-token cross-entropy (nats): `logits [B, T, V]`, `targets [B, T]` -> scalar (fp32)."""
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
