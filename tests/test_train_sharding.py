"""Sharding: the rules table by parameter name, and one training step on a (data=2, fsdp=4) mesh
of 8 forced host devices equal to the single-device step, with the parameters really split."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from rwkv_jax.train import TrainConfig
from rwkv_jax.train.config import ConfigError
from rwkv_jax.train.sharding import make_mesh, maybe_initialize_distributed, param_spec


@pytest.mark.parametrize("path,shape,spec", [
    ("blocks/att/key/kernel", (2, 64, 64), P(None, None, "fsdp")),   # layer axis never split; tie -> last
    ("blocks/ffn/key/kernel", (2, 64, 256), P(None, None, "fsdp")),  # the largest dimension
    ("blocks/ffn/value/kernel", (2, 256, 64), P(None, "fsdp", None)),
    ("emb/embedding", (256, 64), P("fsdp", None)),
    ("head/kernel", (64, 256), P(None, "fsdp")),
    ("blocks/att/w1", (2, 64, 32), P(None, "fsdp", None)),           # v7 LoRA
    ("blocks/att/time_maa_w2", (2, 5, 32, 64), P(None, None, None, "fsdp")),
    ("blocks/att/time_decay", (2, 1, 1, 64), P()),                   # vectors stay replicated
    ("blocks/att/r_k", (2, 2, 32), P()),
    ("blocks/ln1/scale", (2, 64), P()),
    ("head/kernel", (64, 250), P("fsdp", None)),                     # 250 % 4 != 0: next best dim
    ("blocks/att/key/kernel", (2, 6, 6), P()),                       # nothing divides: replicated
])
def test_sharding_rules_by_parameter_name(path, shape, spec):
    assert param_spec(path, shape, fsdp_size=4, min_size=0) == spec


def test_single_process_runs_do_not_initialize_jax_distributed(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                 "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert maybe_initialize_distributed() is False


def test_mesh_shape_must_cover_the_devices():
    mesh = make_mesh(data=-1, fsdp=1)
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "seq": 1}
    with pytest.raises(ConfigError, match="does not cover"):
        make_mesh(data=jax.device_count() + 1, fsdp=1)


def test_small_arrays_and_a_single_fsdp_device_stay_replicated():
    assert param_spec("head/kernel", (64, 256), fsdp_size=4, min_size=64 * 256 + 1) == P()
    assert param_spec("head/kernel", (64, 256), fsdp_size=1, min_size=0) == P()


EIGHT_DEVICES = r"""
import json, sys
import jax, numpy as np
from rwkv_jax.train import TrainConfig
from rwkv_jax.train import loop

assert jax.device_count() == 8
out = sys.argv[1]
cfg = TrainConfig.from_args(["preset=tiny", "version=5", "batch_size=8", "mesh_data=2", "mesh_fsdp=4",
                             f"out={out}", "steps=1"])
# Reference: the same step on one device.
single = loop.build_run(cfg.replace(mesh_data=1, mesh_fsdp=1), devices=jax.devices()[:1])
step = jax.jit(loop.make_train_step(single.model, single.tx, cfg.l2wrap))
reference, metrics = step(loop.init_train_state(single), loop.train_batch(single, 0))
# The real loop on the 2 x 4 mesh: sharded init, one step, validation and a sharded save.
summary = loop.train(cfg, log=lambda line: None)
state = summary["state"]
diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(reference["params"]), jax.tree.leaves(state["params"])))
def describe(x):
    return {"spec": list(x.sharding.spec), "devices": len(x.sharding.device_set),
            "shard": list(x.sharding.shard_shape(x.shape)), "shape": list(x.shape)}
params = state["params"]
restored, _ = loop.load_checkpoint(out)          # the sharded checkpoint, back onto a replicated layout
report = {"loss_single": float(metrics["loss"]), "loss_sharded": summary["losses"][0], "max_param_diff": diff,
          "key": describe(params["blocks"]["att"]["key"]["kernel"]), "emb": describe(params["emb"]["embedding"]),
          "mu": describe(state["opt_state"][1].mu["head"]["kernel"]),
          "decay": describe(params["blocks"]["att"]["time_decay"]),
          "batch": describe(loop.train_batch(loop.build_run(cfg), 0)),
          "restored_equal": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                                zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(params)))}
print("REPORT " + json.dumps(report))
"""


def test_a_step_on_a_data2_fsdp4_mesh_equals_the_single_device_step(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, str(tmp_path / "run")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))[7:])
    print(report)
    assert abs(report["loss_single"] - report["loss_sharded"]) <= 1e-5
    assert report["max_param_diff"] <= 1e-5
    assert report["key"] == {"spec": [None, None, "fsdp"], "devices": 8, "shard": [2, 64, 16], "shape": [2, 64, 64]}
    assert report["emb"]["shard"] == [64, 64] and report["emb"]["devices"] == 8
    assert report["mu"] == {"spec": [None, "fsdp"], "devices": 8, "shard": [64, 64],
                            "shape": [64, 256]}                          # optimiser state follows its param
    assert report["decay"]["spec"] == [] and report["decay"]["devices"] == 8   # replicated
    assert report["batch"]["shard"] == [1, 65]                           # rows over all 8 devices
    assert report["restored_equal"]


def test_mesh_seq_must_divide_ctx_len_and_needs_rwkv_4_or_later():
    with pytest.raises(ConfigError, match="divisor of ctx_len=64"):
        TrainConfig.from_args(["preset=tiny", "mesh_seq=3"])
    with pytest.raises(ConfigError, match="RWKV-4 to 7"):
        TrainConfig.from_args(["preset=tiny", "version=3", "mesh_seq=2"])
