"""Benchmark the WKV recurrences: parallel form vs the token-by-token oracle, fwd and fwd+bwd.

    python experiments/bench_wkv.py                       # CPU-sized defaults
    python experiments/bench_wkv.py --batch 8 --heads 12 --lengths 4096 --dtype bfloat16   # GPU
    python experiments/bench_wkv.py --versions 7 --chunk-sizes 32 64   # one row per chunk size

Prints one table per run, measured in one process on one device: median wall time of jitted
calls (after a compile call), and the oracle/parallel ratio. fwd+bwd is the gradient of
sum(y * g) with respect to every input, including the initial state.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp

from rwkv_jax.wkv.diag import wkv6_oracle, wkv6_parallel
from rwkv_jax.wkv.dplr import wkv7_oracle, wkv7_parallel
from rwkv_jax.wkv.vector import wkv4_oracle, wkv4_parallel, zero_state


def make_inputs(version: int, B: int, T: int, H: int, N: int, dtype, key) -> tuple[tuple, tuple]:
    """Realistic random inputs: (per-token arrays, the rest), in each family's argument order."""
    ks = jax.random.split(key, 8)
    shape = (B, T, H, N)
    normal = lambda k, s=shape: jax.random.normal(k, s, jnp.float32)
    if version == 4:
        C = H * N
        k, v = normal(ks[0], (B, T, C)), normal(ks[1], (B, T, C))
        log_decay = -jnp.exp(normal(ks[2], (C,)))
        return (k.astype(dtype), v.astype(dtype)), (log_decay, normal(ks[3], (C,)), zero_state(B, C))
    state = 0.1 * jax.random.normal(ks[7], (B, H, N, N), jnp.float32)
    r, k, v = (normal(kk).astype(dtype) for kk in ks[:3])
    if version in (5, 6):
        if version == 5:
            logw = jnp.broadcast_to(-jnp.exp(-6 + 5 * jax.random.uniform(ks[3], (H, N))), shape)
        else:
            logw = -jnp.exp(-6 + 5 * jax.random.uniform(ks[3], shape) + 0.5 * normal(ks[4]))
        return (r, logw, k, v), (0.5 * normal(ks[5], (H, N)), state)
    kappa = normal(ks[3])
    kappa = kappa / jnp.linalg.norm(kappa, axis=-1, keepdims=True)
    alpha = jax.nn.sigmoid(normal(ks[4]))
    logw = -math.exp(-0.5) * jax.nn.sigmoid(normal(ks[5]) * 3)
    return (r, logw, k, v, (-kappa).astype(dtype), (kappa * alpha).astype(dtype)), (state,)


FORMS: dict[int, tuple[Callable, Callable]] = {
    4: (wkv4_oracle, wkv4_parallel), 5: (wkv6_oracle, wkv6_parallel),
    6: (wkv6_oracle, wkv6_parallel), 7: (wkv7_oracle, wkv7_parallel),
}


def median_ms(fn: Callable, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_form(form: Callable, per_token, rest, repeats: int) -> tuple[float, float]:
    """(fwd ms, fwd+bwd ms) of ``form(*per_token, *rest) -> (y, state)``, jitted."""
    forward = jax.jit(lambda pt, rs: form(*pt, *rs)[0])

    def loss(pt, rs):
        y, _ = form(*pt, *rs)
        return jnp.sum(y * jnp.cos(jnp.arange(y.shape[-1], dtype=y.dtype)))

    backward = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return (median_ms(forward, per_token, rest, repeats=repeats),
            median_ms(backward, per_token, rest, repeats=repeats))


def bench_one(version: int, T: int, args: argparse.Namespace) -> list[dict]:
    """One row per parallel chunk size (v5-v7; v4 has none), each against the same oracle run."""
    dtype = jnp.dtype(args.dtype)
    per_token, rest = make_inputs(version, args.batch, T, args.heads, args.head_size, dtype, jax.random.PRNGKey(T))
    oracle, parallel = FORMS[version]
    oracle_fwd, oracle_fwdbwd = time_form(oracle, per_token, rest, args.repeats)
    rows = []
    for chunk_size in (args.chunk_sizes if version != 4 and args.chunk_sizes else [None]):
        form = parallel if chunk_size is None else functools.partial(parallel, chunk_size=chunk_size)
        parallel_fwd, parallel_fwdbwd = time_form(form, per_token, rest, args.repeats)
        rows.append({
            "version": version, "B": args.batch, "T": T, "H": args.heads, "N": args.head_size,
            "dtype": args.dtype, "chunk_size": chunk_size,
            "oracle_fwd_ms": oracle_fwd, "oracle_fwdbwd_ms": oracle_fwdbwd,
            "parallel_fwd_ms": parallel_fwd, "parallel_fwdbwd_ms": parallel_fwdbwd,
            "fwd_speedup": oracle_fwd / parallel_fwd, "fwdbwd_speedup": oracle_fwdbwd / parallel_fwdbwd,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, nargs="+", default=[4, 5, 6, 7])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-sizes", type=int, nargs="+",
                        help="v5-v7 parallel-form chunk sizes, one row each (default: each form's own)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    device = jax.devices()[0]
    print(f"jax {jax.__version__}, device: {device.platform} ({device.device_kind}); "
          f"B={args.batch} H={args.heads} N={args.head_size} {args.dtype}")
    header = (f"{'ver':>3} {'T':>6} {'L':>4} | {'oracle fwd':>10} {'par fwd':>9} {'ratio':>6} | "
              f"{'oracle f+b':>10} {'par f+b':>9} {'ratio':>6}   (ms, median of {args.repeats})")
    print(header)
    print("-" * len(header))
    rows = []
    for version in args.versions:
        for T in args.lengths:
            for row in bench_one(version, T, args):
                rows.append(row)
                chunk = "-" if row["chunk_size"] is None else row["chunk_size"]
                print(f"{'v' + str(version):>3} {T:>6} {chunk:>4} | {row['oracle_fwd_ms']:>10.2f} "
                      f"{row['parallel_fwd_ms']:>9.2f} {row['fwd_speedup']:>5.1f}x | "
                      f"{row['oracle_fwdbwd_ms']:>10.2f} {row['parallel_fwdbwd_ms']:>9.2f} "
                      f"{row['fwdbwd_speedup']:>5.1f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "device": device.device_kind, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
