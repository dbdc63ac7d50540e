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
                                    "decode_b2_ours")]
    assert row["version"] == 7 and all(rate > 0 for rate in rates)
