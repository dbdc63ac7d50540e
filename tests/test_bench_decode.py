"""experiments/bench_decode.py runs end to end (its --smoke configuration, one version)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from official_reference import official_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(not official_available(), reason="torch and the rwkv package are not installed")
def test_bench_decode_smoke_runs_ours_and_the_official_package(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bench_decode.py"), "--smoke",
                           "--versions", "7", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\nv7 " in proc.stdout and proc.stdout.count("uptime:") == 2
    (row,) = json.loads(out.read_text())["rows"]
    rates = [row[name] for name in ("prefill_ours", "prefill_official", "decode_ours", "decode_official",
                                    "decode_batch_ours")]
    assert row["version"] == 7 and all(rate > 0 for rate in rates) and row["ms_per_token_floor"] > 0
    # The floor reads every fp32 parameter except the embedding table (the smoke model: L2-D128, V=1024).
    import jax
    import jax.numpy as jnp

    import rwkv_jax as rj

    cfg = rj.RWKVConfig(version=7, n_layer=2, n_embd=128, vocab_size=1024)
    shapes = jax.eval_shape(rj.RWKV(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    read = sum(leaf.size * 4 for name, tree in shapes.items() if name != "emb" for leaf in jax.tree.leaves(tree))
    assert row["mb_per_token"] == pytest.approx(read / 1e6)
