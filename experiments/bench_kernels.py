"""Benchmark the Pallas WKV kernels (v7, v6) against the oracle, the XLA parallel form and FLA.

    python experiments/bench_kernels.py            # on one GPU: the issue's shapes, bf16, N = 64
    python experiments/bench_kernels.py --smoke    # tiny shape on CPU, Pallas in interpret mode

Prints ONE table measured in ONE process on one device: forward (y only) and forward+backward
(gradient of sum(y * g) with respect to every input including the initial state) wall times,
median of --repeats calls after a compile/warm-up call (jax.block_until_ready /
torch.cuda.synchronize), the speed-up over the oracle of the same family and shape measured in
this run, and err = max|y - y_oracle| / max|y_oracle| on the same inputs.

Rows: oracle (lax.scan), parallel (rwkv_jax.wkv chunked XLA form), pallas (one row per chunk size
for v7; wkv6_pallas at its default chunk), fla (flash-linear-attention's chunk_rwkv7 /
chunk_rwkv6 through torch, if installed; the options passed are printed). Rows whose module is
missing are skipped with a printed note.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels.dplr import wkv7_pallas  # noqa: E402
from rwkv_jax.wkv.diag import wkv6_oracle, wkv6_parallel  # noqa: E402
from rwkv_jax.wkv.dplr import RWKV7_MIN_LOG_DECAY, wkv7_oracle, wkv7_parallel  # noqa: E402

SHAPES = ((8, 4096, 12), (4, 4096, 32), (1, 16384, 12))  # (B, T, H)
SMOKE_SHAPE = (1, 40, 2)


def make_inputs(version: int, batch: int, seq_len: int, heads: int, dim: int, dtype, seed: int):
    """RWKV-shaped per-token inputs (all in ``dtype``) and the fp32 rest, in argument order.

    v7: a = -κ̂, b = κ̂α, logw = -e^{-1/2} σ(·) ∈ (-0.6066, 0); v6: logw = -exp(·) with a spread of
    decay speeds, bonus u [H, N].
    """
    keys = jax.random.split(jax.random.PRNGKey(seed), 8)
    shape = (batch, seq_len, heads, dim)
    normal = lambda key, s=shape: jax.random.normal(key, s, jnp.float32)
    r, k, v = normal(keys[0]), normal(keys[1]), normal(keys[2])
    state = 0.1 * normal(keys[3], (batch, heads, dim, dim))
    if version == 7:
        kappa = normal(keys[4])
        kappa = kappa / jnp.linalg.norm(kappa, axis=-1, keepdims=True)
        alpha = jax.nn.sigmoid(normal(keys[5]))
        logw = -math.exp(-0.5) * jax.nn.sigmoid(3.0 * normal(keys[6]))
        per_token = (r, logw, k, v, -kappa, kappa * alpha)
        rest = (state,)
    else:
        logw = -jnp.exp(-6.0 + 5.0 * jax.random.uniform(keys[4], shape) + 0.5 * normal(keys[5]))
        per_token = (r, logw, k, v)
        rest = (0.5 * normal(keys[6], (heads, dim)), state)
    return tuple(x.astype(dtype) for x in per_token), rest


def median_ms(run: Callable[[], object], sync: Callable[[object], object], repeats: int) -> float:
    sync(run())  # compile / autotune / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(run())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def output_weights(y_shape) -> jax.Array:
    return jnp.cos(jnp.arange(y_shape[-1], dtype=jnp.float32))


def time_jax(form: Callable, per_token, rest, repeats: int) -> tuple[float, float, np.ndarray]:
    """(fwd ms, fwd+bwd ms, y) of a JAX form ``(*per_token, *rest) -> (y, state)``."""
    forward = jax.jit(lambda pt, rs: form(*pt, *rs)[0])

    def loss(pt, rs):
        y, _ = form(*pt, *rs)
        return jnp.sum(y * output_weights(y.shape))

    backward = jax.jit(jax.grad(loss, argnums=(0, 1)))
    fwd = median_ms(lambda: forward(per_token, rest), jax.block_until_ready, repeats)
    fwdbwd = median_ms(lambda: backward(per_token, rest), jax.block_until_ready, repeats)
    return fwd, fwdbwd, np.asarray(forward(per_token, rest), np.float32)


def fla_call(version: int):
    """(fla function, keyword builder, note) or (None, None, reason)."""
    try:
        import torch  # noqa: F401

        if not torch.cuda.is_available():
            return None, None, "torch sees no CUDA device"
        module = importlib.import_module(f"fla.ops.rwkv{version}")
    except Exception as error:  # ImportError, or triton/CUDA set-up errors inside fla
        return None, None, f"flash-linear-attention unavailable ({type(error).__name__}: {error})"
    fn = getattr(module, f"chunk_rwkv{version}")
    params = inspect.signature(fn).parameters
    # Pass only what this fla version accepts; the log-decay argument changed name across versions.
    decay_name = next(n for n in ("log_w", "w", "g") if n in params)
    options = {"scale": 1.0, "output_final_state": True}
    if "head_first" in params:
        options["head_first"] = False
    if version == 7:
        for name, value in (("chunk_size", 64), ("safe_gate", True),
                            ("lower_bound", RWKV7_MIN_LOG_DECAY)):
            if name in params:
                options[name] = value
    note = f"fla chunk_rwkv{version}({decay_name}=logw, {', '.join(f'{k}={v}' for k, v in options.items())})"
    return fn, (decay_name, options), note


def time_fla(version: int, per_token, rest, repeats: int):
    """(fwd ms, fwd+bwd ms, y, note) through torch, or (None, None, None, reason)."""
    fn, spec, note = fla_call(version)
    if fn is None:
        return None, None, None, note
    import torch

    decay_name, options = spec

    def to_torch(x):
        return torch.from_numpy(np.asarray(x, np.float32)).cuda()

    dtype = torch.bfloat16 if per_token[0].dtype == jnp.bfloat16 else torch.float32
    tensors = [to_torch(x).to(dtype).requires_grad_() for x in per_token]
    if version == 7:
        r, logw, k, v, a, b = tensors
        # fla keeps the state as [key, value]; ours is [value, key].
        initial = to_torch(jnp.swapaxes(rest[0], -1, -2)).requires_grad_()
        kwargs = {"r": r, decay_name: logw, "k": k, "v": v, "a": a, "b": b}
        leaves = tensors + [initial]
    else:
        r, logw, k, v = tensors
        u = to_torch(rest[0]).to(dtype).requires_grad_()
        initial = to_torch(rest[1]).requires_grad_()
        kwargs = {"r": r, "k": k, "v": v, decay_name: logw, "u": u}
        leaves = tensors + [u, initial]
    weights = torch.from_numpy(np.asarray(output_weights(per_token[0].shape))).cuda()

    def forward():
        with torch.no_grad():
            return fn(**kwargs, initial_state=initial, **options)[0]

    def forward_backward():
        y = fn(**kwargs, initial_state=initial, **options)[0]
        return torch.autograd.grad((y.float() * weights).sum(), leaves)

    sync = lambda _: torch.cuda.synchronize()
    fwd = median_ms(forward, sync, repeats)
    fwdbwd = median_ms(forward_backward, sync, repeats)
    return fwd, fwdbwd, forward().float().cpu().numpy(), note


def pallas_v6(interpret: bool):
    try:
        from pallas_kernels.diag import wkv6_pallas
    except ImportError as error:
        return None, f"pallas_kernels.diag.wkv6_pallas missing ({error})"
    platform = "gpu" if interpret else None
    return functools.partial(wkv6_pallas, platform=platform, interpret=interpret), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny shape {SMOKE_SHAPE} on CPU, Pallas in interpret mode, no fla")
    parser.add_argument("--versions", type=int, nargs="+", default=[7, 6], choices=[6, 7])
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[16, 32, 64],
                        help="v7 Pallas chunk sizes, one row each")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.smoke:
        shapes, interpret, repeats, chunk_sizes = [SMOKE_SHAPE], True, 1, [16]
        head_size = 32
    else:
        shapes, interpret, repeats, chunk_sizes = SHAPES, False, args.repeats, args.chunk_sizes
        head_size = args.head_size
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"jax {jax.__version__} on {device.platform} ({device.device_kind}); N={head_size} "
          f"{dtype.name}; median of {repeats}; load avg {load:.2f}"
          + ("; SMOKE: Pallas in interpret mode" if interpret else ""))
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    print(f"commit {git.stdout.strip() or '?'}")

    notes: list[str] = []
    header = (f"{'ver':>3} {'B':>2} {'T':>6} {'H':>3} {'impl':<14} | {'fwd ms':>9} {'x orcl':>7} | "
              f"{'f+b ms':>9} {'x orcl':>7} | {'err y':>8}")
    print(header)
    print("-" * len(header))
    v6_kernel, v6_missing = pallas_v6(interpret)
    if v6_missing:
        notes.append(v6_missing)
    # Shape-major, the goal shape (8, 4096, 12) first: a run cut short by a device time limit
    # still has both versions at that shape.
    for batch, seq_len, heads in shapes:
        for version in args.versions:
            oracle, parallel = (wkv7_oracle, wkv7_parallel) if version == 7 else (wkv6_oracle, wkv6_parallel)
            per_token, rest = make_inputs(version, batch, seq_len, heads, head_size, dtype, seed=seq_len)
            impls: list[tuple[str, Callable | None]] = [("oracle", oracle), ("parallel", parallel)]
            if version == 7:
                platform = "gpu" if interpret else None
                impls += [(f"pallas L={c}", functools.partial(
                    wkv7_pallas, chunk_size=c, platform=platform, interpret=interpret))
                    for c in chunk_sizes]
            elif v6_kernel is not None:
                impls.append(("pallas", v6_kernel))
            impls.append(("fla", None))
            oracle_fwd = oracle_fwdbwd = y_oracle = None
            for name, form in impls:
                prefix = f"{'v' + str(version):>3} {batch:>2} {seq_len:>6} {heads:>3} {name:<14} | "
                try:
                    if form is None:
                        if interpret:
                            continue
                        fwd, fwdbwd, y, note = time_fla(version, per_token, rest, repeats)
                        if fwd is None:
                            notes.append(f"v{version} fla skipped: {note}")
                            continue
                        if note not in notes:
                            notes.append(note)
                    else:
                        fwd, fwdbwd, y = time_jax(form, per_token, rest, repeats)
                except Exception as error:  # one failing row must not cost the rest of the table
                    print(prefix + f"FAILED {type(error).__name__}: {str(error)[:200]!r}", flush=True)
                    continue
                if name == "oracle":
                    oracle_fwd, oracle_fwdbwd, y_oracle = fwd, fwdbwd, y
                ratio = lambda base, t: f"{base / t:>6.1f}x" if base else f"{'-':>7}"
                error = relative_error(y, y_oracle) if y_oracle is not None else float("nan")
                print(prefix + f"{fwd:>9.3f} {ratio(oracle_fwd, fwd)} | {fwdbwd:>9.3f} "
                      f"{ratio(oracle_fwdbwd, fwdbwd)} | {error:>8.1e}", flush=True)
    for note in notes:
        print("note:", note)


if __name__ == "__main__":
    main()
