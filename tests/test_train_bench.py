"""`experiments/bench_train.py --smoke` runs end to end and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_train_smoke_prints_a_row_per_version():
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_train.py"), "--smoke",
                             "--versions", "2", "7"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "MFU vs" in lines[0] and "parallel tok/s" in lines[1]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"RWKV-2", "RWKV-7"}
    for row in rows.values():
        assert float(row[2]) > 0 and float(row[3]) > 0 and row[4].endswith("x") and row[5].endswith("%")
