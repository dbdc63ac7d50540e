"""`python -m rwkv_jax`: build every version, run the three WKV tiers, check they agree, time them.

A self-contained tour (no downloads): for RWKV-4..7 it initialises a small model with the
official init plus noise (so no path is switched off by a zero-initialised matrix), runs a
sequence through the oracle and the parallel form and token by token through `RWKV.step`,
round-trips the weights through an official-format `.pth`, and prints one table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rwkv_jax as rj


def noisy_init(cfg: rj.RWKVConfig, seed: int) -> dict:
    params = rj.RWKV(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))["params"]
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])


def timed(fn, *args) -> tuple[float, object]:
    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; L{args.n_layer}-D{args.n_embd}, "
          f"batch {args.batch}, {args.length} tokens\n")
    header = (f"{'version':>7} {'params':>9} {'oracle ms':>10} {'parallel ms':>12} {'speed-up':>9} "
              f"{'step tok/s':>11} {'max rel err (par, step)':>24} {'.pth round trip':>16}")
    print(header)
    print("-" * len(header))
    for version in (4, 5, 6, 7):
        cfg = rj.RWKVConfig(version=version, n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=256)
        params = noisy_init(cfg, seed=version)
        tokens = jnp.asarray(np.random.RandomState(version).randint(0, 256, (args.batch, args.length)), jnp.int32)
        state0 = rj.init_state(cfg, args.batch)
        forward = {wkv: jax.jit(lambda p, t, s, c=cfg.replace(wkv=wkv): rj.RWKV(c).apply({"params": p}, t, s))
                   for wkv in ("oracle", "parallel")}
        t_oracle, (logits_o, _) = timed(forward["oracle"], params, tokens, state0)
        t_parallel, (logits_p, _) = timed(forward["parallel"], params, tokens, state0)

        step = jax.jit(lambda p, t, s: rj.RWKV(cfg).apply({"params": p}, t, s, method=rj.RWKV.step))
        steps = min(args.length, 64)
        state, outs = state0, []
        jax.block_until_ready(step(params, tokens[:, 0], state))
        start = time.perf_counter()
        for t in range(steps):
            logits_t, state = step(params, tokens[:, t], state)
            outs.append(logits_t)
        jax.block_until_ready(state)
        step_rate = steps * args.batch / (time.perf_counter() - start)

        scale = float(jnp.max(jnp.abs(logits_o)))
        err_parallel = float(jnp.max(jnp.abs(logits_p - logits_o))) / scale
        err_step = float(jnp.max(jnp.abs(jnp.stack(outs, 1) - logits_o[:, :steps]))) / scale
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"rwkv{version}.pth"
            rj.save_pth(path, cfg, params)
            cfg2, params2 = rj.load_pth(path)
            same = cfg2.version == version and all(
                bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                            jax.tree_util.tree_leaves(params2)))
        n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
        print(f"{'v' + str(version):>7} {n_params / 1e6:>8.2f}M {t_oracle * 1e3:>10.1f} {t_parallel * 1e3:>12.1f} "
              f"{t_oracle / t_parallel:>8.1f}x {step_rate:>11.0f} {err_parallel:>11.1e}, {err_step:.1e} "
              f"{'bit-exact' if same else 'MISMATCH':>16}")


if __name__ == "__main__":
    main()
