"""Resume is exact and crash-safe.

Three runs of the same 16-step schedule through the `rwkv-jax train` CLI, each in its own process
(CPU, a shared persistent compilation cache so the step compiles once):

- straight: 16 steps;
- stopped: `stop_after=8`, then `--resume` for the rest;
- killed: SIGKILLed right after the asynchronous save of step 8 was started (the write still
  in flight), with a half-written step-12 directory planted next to it, then `--resume`.

All three must end with bitwise-identical parameters and optimiser state, and their
metrics.jsonl must hold the same records as the straight run's (bitwise-identical losses over the
same windows), though the interrupted runs logged a partial window, or steps they never saved.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rwkv_jax.train.checkpoint import Checkpointer
from rwkv_jax.train.loop import load_checkpoint

STEPS, HALF = 16, 8
# log_every=3 divides neither the stop nor the saves: the windows span the interruptions.
ARGS = ["preset=tiny", "version=5", f"steps={STEPS}", "save_every=4", "log_every=3", "eval_every=100",
        "async_save=true"]
# Runs the CLI; with KILL_AT set, SIGKILLs itself as soon as the save of that step has been handed
# to orbax's background writer (save() returns once the arrays are copied to host memory).
KILLABLE_CLI = """
import os, signal, sys
from rwkv_jax.train import checkpoint
original = checkpoint.Checkpointer.save
def save(self, step, state, meta):
    original(self, step, state, meta)
    if step == int(os.environ.get("KILL_AT", -1)):
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpointer.save = save
from rwkv_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax-cache")

    def run(*args: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        if kill_at is not None:
            env["KILL_AT"] = str(kill_at)
        return subprocess.run([sys.executable, "-c", KILLABLE_CLI, "train", *ARGS, *args], env=env,
                              capture_output=True, text=True, timeout=300)

    return run


@pytest.fixture(scope="module")
def straight(cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = cli(f"out={out}")
    assert result.returncode == 0, result.stderr
    return out


def logged_records(out: Path) -> list[dict]:
    """metrics.jsonl's loss and validation records, in order, without the timings (and events)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in records if "event" not in r]


def assert_same_final_state(a: Path, b: Path) -> None:
    (state_a, meta_a), (state_b, meta_b) = load_checkpoint(a), load_checkpoint(b)
    assert meta_a["step"] == meta_b["step"] == STEPS
    leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))      # bitwise


def test_stop_and_resume_is_bitwise_identical_to_a_straight_run(cli, straight, tmp_path):
    first = cli(f"out={tmp_path}", f"stop_after={HALF}")
    assert first.returncode == 0, first.stderr
    assert Checkpointer(tmp_path, read_only=True).latest_step() == HALF
    assert logged_records(tmp_path)[-1]["step"] == HALF and logged_records(tmp_path)[-1]["partial"]  # steps 7-8
    second = cli("--resume", f"out={tmp_path}")
    assert second.returncode == 0, second.stderr
    assert f"resumed from step {HALF}" in second.stdout

    assert logged_records(tmp_path) == logged_records(straight)        # every window's loss, bitwise
    assert_same_final_state(straight, tmp_path)
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir()) == [8, 12, 16]   # keep=3
    assert [p.name for p in (tmp_path / "best").iterdir()] == [str(STEPS)]            # validated at the end


def test_sigkill_during_a_save_then_resume_ends_where_a_straight_run_does(cli, straight, tmp_path):
    killed = cli(f"out={tmp_path}", kill_at=HALF)
    assert killed.returncode == -signal.SIGKILL
    ckpt = tmp_path / "ckpt"
    print("after the kill:", sorted(p.name for p in ckpt.iterdir()))
    # A crash mid-write leaves (at most) a temporary directory; plant a bigger half-written step too.
    shutil.copytree(ckpt / "4" / "state", ckpt / "12.orbax-checkpoint-tmp" / "state")
    assert {p.name for p in ckpt.iterdir()} >= {"4", "12.orbax-checkpoint-tmp"}
    reader = ocp.CheckpointManager(ckpt, options=ocp.CheckpointManagerOptions(read_only=True))
    latest = reader.latest_step()
    reader.close()
    assert latest in (4, HALF)                                          # finalized steps only

    resumed = cli("--resume", f"out={tmp_path}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {latest}" in resumed.stdout
    assert logged_records(tmp_path) == logged_records(straight)        # each step logged once, bitwise
    assert_same_final_state(straight, tmp_path)
    assert not list(ckpt.glob("*tmp*"))                                 # cleaned up on reopen
