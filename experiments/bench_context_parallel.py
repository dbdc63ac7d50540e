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

A second table measures what context parallelism adds to each device's work, on one device
without a mesh: the gradient of the WKV form alone on the T/D tokens of one shard (B=1, H = embd /
head size), against the shard's summary (`rwkv_jax.wkv.{vector,diag,dplr}.wkv*_transition`) plus
the form from the state it gives, which is what each device computes (less the all-gather and the
O(D) state compositions). The ratio is the overhead over a perfect 1/D split.
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
    print_shard_overhead(args)


def summary_then_form(form, transition, count: int):
    """What one device computes under context parallelism, as a WKV form: the shard's summary, the
    start state it leads to from the given state (in place of the gathered summaries), the form."""

    def run(*inputs):
        per_token, (*params, state) = inputs[:count], inputs[count:]
        start = transition.apply(*transition.summarize(per_token, params, None), state)
        return form(*per_token, *params, start)

    return run


def print_shard_overhead(args: argparse.Namespace) -> None:
    """The second table: per shard, fwd+bwd of the form alone vs the summary plus the form."""
    import jax
    from bench_wkv import FORMS, make_inputs, time_form

    from rwkv_jax.versions.v4 import WKV4
    from rwkv_jax.versions.v5 import WKV_DIAG
    from rwkv_jax.versions.v7 import WKV7

    transitions = {4: WKV4.shard_transition, 5: WKV_DIAG.shard_transition, 6: WKV_DIAG.shard_transition,
                   7: WKV7.shard_transition}
    heads = args.embd // args.head_size
    print(f"\nper-device WKV work of one shard, fwd+bwd, B=1 H={heads} N={args.head_size} fp32, median of "
          f"{args.steps} (ms)")
    print("| ver | tokens/device | form alone | summary + form | overhead |")
    print("|---|---|---|---|---|")
    for version in args.versions:
        form, transition = FORMS[version][1], transitions[version]
        for shards in args.seq[1:]:
            tokens = args.ctx // shards
            per_token, rest = make_inputs(version, 1, tokens, heads, args.head_size, "float32", jax.random.PRNGKey(0))

            alone = time_form(form, per_token, rest, args.steps)[1]
            with_summary = time_form(summary_then_form(form, transition, len(per_token)), per_token, rest,
                                     args.steps)[1]
            print(f"| v{version} | {tokens} | {alone:.1f} | {with_summary:.1f} | {with_summary / alone:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
