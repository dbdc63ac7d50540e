"""Decode and prefill speed of rwkv-jax vs the official `rwkv` pip package, on the same checkpoint.

    python experiments/bench_decode.py                  # v4-v7 at L12-D768, V=65536 (CPU, fp32)
    python experiments/bench_decode.py --smoke          # a tiny config, to check that it runs

For each version, one random model (the official initialisation) is written with `rj.save_pth`;
rwkv-jax reads it back with `rj.load_pth` and the package loads the same file with
`strategy='cpu fp32'` in a subprocess (its import-time environment variables, e.g. RWKV_V7_ON,
must not leak between versions; see tests/official_reference.py).

Measured, as the median of `--repeats` runs after two warm-up runs (compilation), in `--rounds`
rounds per version that each measure ours and then the package; the table shows medians over
the rounds, ratios as the median of the per-round ratios:
- prefill: a `--prompt-tokens` prompt from the zero state. Ours: `rwkv_jax.generation.prefill`
  (the parallel form); the package: one `model.forward(tokens, None)` call (its sequence mode).
- decode: `--new-tokens` greedy tokens after the prompt. Ours: `rwkv_jax.generation.decode`, the
  jitted on-device loop (argmax included), on params laid out once by `prepare_decoding` (as the
  package lays its weights out once when it loads them); the package: `forward([token], state)`
  plus a torch argmax per token, as its `PIPELINE.generate` does.
- decode at batch `--batch`: ours decodes B prompts at once; the package has no batch, so its
  rate is taken as B times its batch-1 rate.
- the read floor: batch-1 decoding reads every weight once per token (all but the embedding
  table, of which it gathers one row); the floor is the time XLA takes to read those arrays once
  (a jitted sum of each, all independent), and `at floor` the ratio a decoder running at that
  speed would reach (the package's time per token / the floor). It is an estimate of the
  machine's streaming rate, not a hard limit (matrix-vector products can stream a little faster
  than these sums), measured in the same run because the memory bandwidth of a shared host
  moves by ~20% from run to run.
Both sides use every CPU core they see. Prints `uptime` before and after: the numbers are only
as steady as the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

WORKER_FLAG = "--official-worker"


def _median_seconds(run, repeats: int) -> float:
    for _ in range(2):  # warm-up: compiles (ours); TorchScript's profiling executor optimises on the 2nd run
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------- the official package


def official_worker(job_path: str) -> None:
    """Runs in the child: time the package on the job's checkpoint, print one JSON line."""
    import torch

    with open(job_path) as f:
        job = json.load(f)
    torch.set_grad_enabled(False)
    # XLA's CPU backend flushes subnormal floats to zero; torch does not by default, and the
    # matrix states of a random model decay into subnormals over a long prompt, which made the
    # package's v5-v7 10-25x slower. Flush them here too, so both sides do the same arithmetic.
    torch.set_flush_denormal(True)
    from rwkv.model import RWKV  # configured by the environment the parent set

    path = job["checkpoint"]
    if job["version"] == 7:
        model = RWKV(model=path[:-len(".pth")], strategy="cpu fp32")  # the v7 class appends .pth itself
    else:
        model = RWKV(model=path, strategy="cpu fp32", verbose=False)
    prompt = job["prompt"]

    def prefill():
        return model.forward(prompt, None)

    def decode():
        logits, state = model.forward(prompt[-1:], None)
        for _ in range(job["new_tokens"]):
            token = int(torch.argmax(logits))
            logits, state = model.forward([token], state)

    result = {"prefill_s": _median_seconds(prefill, job["repeats"]),
              "decode_s": _median_seconds(decode, job["repeats"]), "threads": torch.get_num_threads()}
    print("RESULT " + json.dumps(result), flush=True)


def run_official(checkpoint: str, version: int, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RWKV_V7_ON", "RWKV_DE_VERSION", "RWKV_RESCALE_LAYER", "RWKV_DML_ON")}
    env.update(RWKV_JIT_ON="1", RWKV_CUDA_ON="0", CUDA_VISIBLE_DEVICES="")
    if version == 7:
        env["RWKV_V7_ON"] = "1"
    with tempfile.TemporaryDirectory() as job_dir:
        job_path = os.path.join(job_dir, "job.json")
        with open(job_path, "w") as f:
            json.dump({"checkpoint": checkpoint, "version": version, "prompt": prompt, "new_tokens": new_tokens,
                       "repeats": repeats}, f)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), WORKER_FLAG, job_path], cwd=job_dir,
                              env=env, capture_output=True, text=True, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"official package failed on v{version}:\n{proc.stderr[-3000:]}\n{proc.stdout[-1000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------- ours


def run_ours(checkpoint: str, prompt: list[int], batch: int, new_tokens: int, repeats: int) -> dict:
    import jax

    import rwkv_jax as rj
    from rwkv_jax.generation import decode, prefill, prepare_decoding

    cfg, params = rj.load_pth(checkpoint)
    result = {}
    prompts = {1: [prompt], batch: [list(np.roll(prompt, row)) for row in range(batch)]}
    result["prefill_s"] = _median_seconds(lambda: jax.block_until_ready(prefill(cfg, params, prompts[1])), repeats)
    for rows in sorted(set(prompts)):
        logits, state = prefill(cfg, params, [p[-1:] for p in prompts[rows]])
        prepared = prepare_decoding(cfg, params, batch_size=rows)

        def run():
            out = decode(cfg, prepared, logits, state, max_new_tokens=new_tokens, temperature=0)
            jax.block_until_ready(out.logits)

        result[f"decode_b{rows}_s"] = _median_seconds(run, repeats)
    weights = [leaf for name, tree in params.items() if name != "emb" for leaf in jax.tree.leaves(tree)]
    read_once = jax.jit(lambda arrays: [array.sum() for array in arrays])
    result["floor_s"] = _median_seconds(lambda: jax.block_until_ready(read_once(weights)), 10 * repeats)
    result["bytes_per_token"] = sum(w.size * w.dtype.itemsize for w in weights)
    return result


# ----------------------------------------------------------------------------- main


def _rates(args: argparse.Namespace, ours: dict, official: dict) -> dict:
    """One round's rates (tokens/s) and ratios (ours / official)."""
    rates = {
        "prefill_ours": args.prompt_tokens / ours["prefill_s"],
        "prefill_official": args.prompt_tokens / official["prefill_s"],
        "decode_ours": args.new_tokens / ours["decode_b1_s"],
        "decode_official": args.new_tokens / official["decode_s"],
        "decode_batch_ours": args.batch * args.new_tokens / ours[f"decode_b{args.batch}_s"],
        "ms_per_token_ours": 1e3 * ours["decode_b1_s"] / args.new_tokens,
        "ms_per_token_floor": 1e3 * ours["floor_s"],
        "mb_per_token": ours["bytes_per_token"] / 1e6,
        "official_threads": official["threads"],
    }
    rates["prefill_ratio"] = rates["prefill_ours"] / rates["prefill_official"]
    rates["decode_ratio"] = rates["decode_ours"] / rates["decode_official"]
    rates["decode_ratio_at_floor"] = official["decode_s"] / args.new_tokens / ours["floor_s"]
    rates["decode_batch_ratio"] = rates["decode_batch_ours"] / (args.batch * rates["decode_official"])
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model and few tokens")
    parser.add_argument("--versions", type=int, nargs="+", default=[4, 5, 6, 7])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="ours-then-official rounds per version")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.embd, args.vocab, args.prompt_tokens, args.new_tokens = 2, 128, 1024, 16, 8
        args.batch, args.repeats, args.rounds = 2, 1, 1

    import jax
    import jax.numpy as jnp

    import rwkv_jax as rj

    print(f"uptime: {os.popen('uptime').read().strip()}")
    print(f"L{args.layers}-D{args.embd}, V={args.vocab}, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, fp32, jax {jax.__version__} on {jax.devices()[0].platform}")
    prompt = np.random.RandomState(0).randint(1, args.vocab, args.prompt_tokens).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for version in args.versions:
            cfg = rj.RWKVConfig(version=version, n_layer=args.layers, n_embd=args.embd, vocab_size=args.vocab)
            params = jax.jit(rj.RWKV(cfg).init)(jax.random.key(version), jnp.zeros((1, 1), jnp.int32))["params"]
            checkpoint = os.path.join(tmp, f"v{version}.pth")
            rj.save_pth(checkpoint, cfg, params)
            del params
            rounds = []
            for _ in range(args.rounds):  # alternate the two sides: the host's memory bandwidth drifts
                ours = run_ours(checkpoint, prompt, args.batch, args.new_tokens, args.repeats)
                official = run_official(checkpoint, version, prompt, args.new_tokens, args.repeats)
                rounds.append(_rates(args, ours, official))
            os.remove(checkpoint)
            row = {"version": version, "rounds": len(rounds),
                   **{name: statistics.median(r[name] for r in rounds) for name in rounds[0]}}
            rows.append(row)
            print(f"measured v{version}: {json.dumps(row)}", file=sys.stderr, flush=True)  # progress
    B = args.batch
    print(f"medians of {args.rounds} rounds (ratios: median of the per-round ratios)")
    print(f"{'':4} | {'prefill tok/s: ours':>19} {'official':>9} {'ratio':>6} | {'decode B=1: ours':>16} "
          f"{'official':>9} {'ratio':>6} {'at floor':>8} | {f'decode B={B}: ours':>16} {f'{B}x official':>11} {'ratio':>6}"
          f" | {'MB/token':>8} {'ms/token: ours':>14} {'floor':>6}")
    for r in rows:
        print(f"v{r['version']:<3} | {r['prefill_ours']:19.1f} {r['prefill_official']:9.1f} "
              f"{r['prefill_ratio']:6.2f} | {r['decode_ours']:16.1f} {r['decode_official']:9.1f} "
              f"{r['decode_ratio']:6.2f} {r['decode_ratio_at_floor']:8.2f} | "
              f"{r['decode_batch_ours']:16.1f} {B * r['decode_official']:11.1f} {r['decode_batch_ratio']:6.2f} | "
              f"{r['mb_per_token']:8.0f} {r['ms_per_token_ours']:14.2f} {r['ms_per_token_floor']:6.2f}")
    print(f"uptime: {os.popen('uptime').read().strip()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == WORKER_FLAG:
        official_worker(sys.argv[2])
    else:
        sys.exit(main())
