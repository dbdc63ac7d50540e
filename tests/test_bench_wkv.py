"""`experiments/bench_wkv.py`, `bench_kernels.py --smoke` (what a device session runs, through
experiments/device_check.sh) and `bench_context_parallel.py --smoke` run end to end and print
their tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_wkv_prints_one_row_per_chunk_size(tmp_path):
    out = tmp_path / "rows.json"
    stdout = _run("bench_wkv.py", "--versions", "4", "7", "--lengths", "40", "--heads", "2",
                  "--head-size", "16", "--repeats", "1", "--chunk-sizes", "16", "32", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(row["version"], row["chunk_size"]) for row in rows] == [(4, None), (7, 16), (7, 32)]
    for row in rows:
        assert row["oracle_fwdbwd_ms"] > 0 and row["parallel_fwdbwd_ms"] > 0
        assert row["fwdbwd_speedup"] == pytest.approx(row["oracle_fwdbwd_ms"] / row["parallel_fwdbwd_ms"])
    assert stdout.count("\n v7     40") == 2


def test_bench_kernels_smoke_prints_every_form_with_small_errors():
    stdout = _run("bench_kernels.py", "--smoke")
    rows = [line.split("|") for line in stdout.splitlines() if line.startswith((" v7", " v6"))]
    names = [(row[0].split()[0], " ".join(row[0].split()[4:])) for row in rows]
    assert names == [("v7", "oracle"), ("v7", "parallel"), ("v7", "pallas L=16"),
                     ("v6", "oracle"), ("v6", "parallel"), ("v6", "pallas")]
    for row in rows:
        assert float(row[-1]) <= 2e-2  # err y against the oracle, bf16 inputs


def test_bench_context_parallel_smoke_prints_a_row_per_split_with_less_memory_per_device():
    stdout = _run("bench_context_parallel.py", "--smoke")
    memory_table, work_table = stdout.split("per-device WKV work")
    rows = [line.split("|")[1:-1] for line in memory_table.splitlines() if line.startswith("| v7")]
    assert [int(row[1]) for row in rows] == [1, 2, 4]
    # The second table: one shard's form alone and with its summary, at 64/2 and 64/4 tokens.
    work = [line.split("|")[1:-1] for line in work_table.splitlines() if line.startswith("| v7")]
    assert [int(row[1]) for row in work] == [32, 16]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in work)
    megabytes = [float(row[3]) for row in rows]
    assert megabytes[0] > megabytes[1] > megabytes[2]
