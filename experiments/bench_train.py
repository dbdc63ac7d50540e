"""Benchmark one full training step (forward, backward, AdamW update) of every RWKV version.

    python experiments/bench_train.py                      # CPU-sized defaults (L2-D128, ctx 256, B 4)
    python experiments/bench_train.py --smoke              # seconds: tiny sizes, 2 timed steps
    python experiments/bench_train.py --layers 12 --embd 768 --ctx 4096 --batch 8 --dtype bfloat16 \
        --versions 4 5 6 7                                  # the issue's GPU size

For each version the step of `rwkv_jax.train.loop.make_train_step` (the trainer's own step, with
the official optimiser and L2Wrap) is jitted with wkv="parallel" and with the baseline
wkv="oracle" (the token-by-token scan), both measured in this process on the same device; the
table gives tokens/s (median step time over `--steps` steps after a compile step), the
parallel/oracle ratio, and an MFU estimate: 6·N FLOPs per token (N = matmul parameters, as the
trainer counts) times tokens/s over the device's peak. On a known accelerator the peak is its dense
bf16 peak; on CPU there is none to quote, so the peak is the fp32 matmul rate measured here on a
1024×1024 product (the MFU is then "of what XLA's own matmul reaches"). Note the machine load
(printed) next to any number.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import rwkv_jax as rj
from rwkv_jax.train.config import TrainConfig
from rwkv_jax.train.loop import count_params, flops_per_token, make_train_step, peak_flops
from rwkv_jax.train.optim import make_optimizer

VOCAB = 256


def model_config(version: int, args: argparse.Namespace, wkv: str) -> rj.RWKVConfig:
    """A byte-level model of the requested size (v1-v3 with their copy head and ctx_len = T)."""
    return rj.RWKVConfig(version=version, n_layer=args.layers, n_embd=args.embd, vocab_size=VOCAB,
                         head_size=args.head_size, wkv=wkv, dtype=args.dtype,
                         **({"ctx_len": args.ctx} if version <= 3 else {}))


def step_seconds(version: int, args: argparse.Namespace, wkv: str) -> tuple[float, int, float]:
    """Median seconds per training step, the parameter count and the 6·N FLOPs per token."""
    cfg = model_config(version, args, wkv)
    model = rj.RWKV(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    train_cfg = TrainConfig(version=version, n_layer=args.layers, n_embd=args.embd, head_size=args.head_size).resolved()
    tx = make_optimizer(train_cfg, params)
    step = jax.jit(make_train_step(model, tx, train_cfg.l2wrap), donate_argnums=0)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    rng = np.random.default_rng(0)
    batch = jnp.asarray(rng.integers(0, VOCAB, (args.batch, args.ctx + 1)), jnp.int32)
    state, metrics = step(state, batch)  # compile
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        tick = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - tick)
    if not np.isfinite(float(metrics["loss"])):
        raise RuntimeError(f"RWKV-{version} wkv={wkv}: non-finite loss")
    return statistics.median(times), count_params(params), flops_per_token(params)


def measured_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
    """fp32 FLOP/s of a jitted size×size matmul on the default device (the CPU "peak")."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        jax.block_until_ready(matmul(a))
        times.append(time.perf_counter() - tick)
    return 2 * size**3 / min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--embd", type=int, default=128)
    parser.add_argument("--head-size", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after one compile step)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 2 timed steps: checks that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.embd, args.head_size, args.ctx, args.batch, args.steps = 1, 32, 16, 16, 2, 2

    devices = jax.devices()
    peak = peak_flops(devices[:1])
    peak_label = "bf16 peak" if peak else "measured fp32 matmul"
    peak = peak or measured_matmul_flops(256 if args.smoke else 1024)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {devices[0].device_kind} | L{args.layers}-D{args.embd} head {args.head_size} ctx {args.ctx} "
          f"batch {args.batch} {args.dtype} | {args.steps} timed steps | MFU vs {peak_label} "
          f"{peak / 1e9:.1f} GFLOP/s | load {load:.2f}")
    print(f"{'version':>7} {'params':>9} {'parallel tok/s':>15} {'oracle tok/s':>13} {'ratio':>6} {'MFU':>7}")
    tokens = args.batch * args.ctx
    for version in args.versions:
        seconds, n_params, flops = step_seconds(version, args, "parallel")
        baseline, _, _ = step_seconds(version, args, "oracle")
        tok_s, base_tok_s = tokens / seconds, tokens / baseline
        print(f"{'RWKV-' + str(version):>7} {n_params / 1e6:8.2f}M {tok_s:15.0f} {base_tok_s:13.0f} "
              f"{tok_s / base_tok_s:5.2f}x {100 * flops * tok_s / peak:6.2f}%", flush=True)


if __name__ == "__main__":
    main()
