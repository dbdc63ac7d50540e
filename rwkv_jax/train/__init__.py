"""Training RWKV models: the official optimiser recipe, data, checkpoints, sharding and the loop.

    from rwkv_jax.train import TrainConfig, train, evaluate
    summary = train(TrainConfig.from_args(["preset=tiny", "version=7", "out=runs/x"]))
    print(evaluate("runs/x", "some.txt"))

The same run from the shell: `rwkv-jax train preset=tiny version=7 out=runs/x`.
"""

from rwkv_jax.train.config import PRESETS, TrainConfig
from rwkv_jax.train.loop import NonFiniteLossError, evaluate, train
from rwkv_jax.train.optim import decay_mask, l2wrap, lr_multipliers, lr_schedule, make_optimizer

__all__ = ["PRESETS", "TrainConfig", "NonFiniteLossError", "train", "evaluate", "make_optimizer", "lr_schedule",
           "decay_mask", "lr_multipliers", "l2wrap"]
