"""Context parallelism: per-device memory (and time) of a training gradient as the sequence is split.

    python experiments/bench_context_parallel.py                 # v7 L2-D256, one sequence of 8192 tokens
    python experiments/bench_context_parallel.py --smoke         # seconds
    python experiments/bench_context_parallel.py --versions 4 6 7 --ctx 16384 --seq 1 2 4 8

For each version and each size D of the mesh axis "seq" (D devices; D = 1 is the baseline, the
unsplit model on one device), the gradient of the mean next-token loss is compiled under
`jax.set_mesh` with wkv="parallel", and the table gives XLA's per-device memory for it (temporaries
plus arguments and outputs, from `compiled.memory_analysis()`), its ratio to D = 1, and the median
step time. On a CPU the devices are virtual (`--xla_force_host_platform_device_count`) and share
the machine's cores, so the times only say what the split costs in extra work; the memory is
per device and is what context parallelism is for.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", type=int, nargs="+", default=[7])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--embd", type=int, default=256)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one timed step")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.embd, args.head_size, args.ctx, args.seq, args.steps = 1, 64, 32, 64, [1, 2, 4], 1
    return args


def main() -> None:
    args = parse_args()
    if "jax" not in sys.modules and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        # Virtual CPU devices for the mesh; must be set before JAX starts.
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(args.seq)}".strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    import rwkv_jax as rj
    from rwkv_jax.train.loop import loss_fn

    print(f"backend {jax.default_backend()}, {jax.device_count()} devices; B={args.batch} T={args.ctx} "
          f"L{args.layers}-D{args.embd} N={args.head_size}; load average {os.getloadavg()[0]:.1f}")
    print("| ver | seq devices | tokens/device | MB/device | vs 1 device | step s | vs 1 device |")
    print("|---|---|---|---|---|---|---|")
    for version in args.versions:
        cfg = rj.RWKVConfig(version=version, n_layer=args.layers, n_embd=args.embd, head_size=args.head_size,
                            vocab_size=256, wkv="parallel")
        model = rj.RWKV(cfg)
        params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
        batch = jnp.asarray(np.random.default_rng(0).integers(0, 256, (args.batch, args.ctx + 1)), jnp.int32)
        grad_fn = jax.jit(jax.grad(lambda p, b: loss_fn(model, p, b, 0.0)))
        baseline = None
        for shards in args.seq:
            mesh = Mesh(np.array(jax.devices()[:shards]).reshape(1, shards), ("data", "seq"))
            with jax.set_mesh(mesh):
                compiled = grad_fn.lower(params, batch).compile()
                memory = compiled.memory_analysis()
                megabytes = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                             + memory.output_size_in_bytes) / 2**20
                jax.block_until_ready(compiled(params, batch))
                times = []
                for _ in range(args.steps):
                    tick = time.perf_counter()
                    jax.block_until_ready(compiled(params, batch))
                    times.append(time.perf_counter() - tick)
            seconds = statistics.median(times)
            baseline = baseline or (megabytes, seconds)
            print(f"| v{version} | {shards} | {args.ctx // shards} | {megabytes:.1f} | {megabytes / baseline[0]:.2f}x "
                  f"| {seconds:.3f} | {seconds / baseline[1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
