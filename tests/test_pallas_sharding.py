"""shard_wkv (pallas_kernels/sharding.py): per-shard kernels equal the unsharded call.

Runs in a subprocess with 8 virtual CPU devices (the device count is fixed when JAX starts, so it
cannot be changed inside this pytest process). The subprocess compares values and gradients
(with respect to every input, including the initial state) of the sharded and unsharded calls on
a (data=4, heads=2) mesh and on a data-only mesh, for the Pallas v7 kernel in interpret mode and,
to check the v4-v6 argument layouts, for the XLA parallel forms of v6 and v4; and that the
model, under the training loop's (data, fsdp) mesh, runs each kernel on its own batch rows.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from pallas_kernels.sharding import shard_wkv
from rwkv_jax.wkv.mesh import shard_over_context_mesh

REPO = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import functools, json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from pallas_kernels.dplr import wkv7_pallas
    from pallas_kernels.sharding import shard_wkv
    from rwkv_jax.wkv.diag import wkv6_parallel
    from rwkv_jax.wkv.vector import wkv4_parallel

    assert len(jax.devices()) == 8
    B, T, H, N = 4, 20, 2, 32
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kappa = normal(B, T, H, N)
    kappa = kappa / jnp.linalg.norm(kappa, axis=-1, keepdims=True)
    logw = -0.6 * jax.nn.sigmoid(normal(B, T, H, N))
    cases = {
        "v7_pallas": (functools.partial(wkv7_pallas, platform="gpu", chunk_size=16, interpret=True),
                      (normal(B, T, H, N), logw, normal(B, T, H, N), normal(B, T, H, N),
                       -kappa, 0.5 * kappa, normal(B, H, N, N))),
        "v6_parallel": (wkv6_parallel, (normal(B, T, H, N), logw, normal(B, T, H, N),
                                        normal(B, T, H, N), normal(H, N), normal(B, H, N, N))),
        "v4_parallel": (wkv4_parallel, (normal(B, T, H * N), normal(B, T, H * N),
                                        -jnp.exp(normal(H * N)), normal(H * N),
                                        (normal(B, H * N), jnp.abs(normal(B, H * N)) + 1,
                                         normal(B, H * N)))),
    }
    meshes = {
        "data_heads": (Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "heads")), "heads"),
        "data_only": (Mesh(np.array(jax.devices()[:4]), ("data",)), None),
    }

    def value_and_grads(fn, args):
        def loss(args):
            y, state = fn(*args)
            weights = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
            return jnp.sum(y * weights) + sum(jnp.sum(jnp.sin(s)) for s in jax.tree.leaves(state))
        outputs = jax.jit(fn)(*args)
        return outputs, jax.jit(jax.grad(loss))(args)

    def rel(actual, expected):
        a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
        return float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-30))

    errors, shard_shapes = {}, {}
    for case, (fn, args) in cases.items():
        expected = value_and_grads(fn, args)
        for mesh_name, (mesh, head_axis) in meshes.items():
            def recording(*args, fn=fn, key=f"{case}/{mesh_name}"):
                shard_shapes[key] = list(args[0].shape)  # what each shard's kernel sees
                return fn(*args)
            actual = value_and_grads(shard_wkv(recording, mesh, "data", head_axis), args)
            pairs = zip(jax.tree.leaves(actual), jax.tree.leaves(expected))
            errors[f"{case}/{mesh_name}"] = max(rel(a, e) for a, e in pairs)
    print("ERRORS", json.dumps(errors))
    print("SHAPES", json.dumps(shard_shapes))
    """
)


@pytest.mark.slow
def test_sharded_values_and_gradients_equal_unsharded():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reported = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    errors, shapes = json.loads(reported["ERRORS"]), json.loads(reported["SHAPES"])
    assert len(errors) == 6
    for name, error in errors.items():
        assert error <= 1e-5, (name, error)
    # Each shard really holds one batch element (and one head on the 4x2 mesh).
    assert shapes["v7_pallas/data_heads"] == [1, 20, 1, 32]
    assert shapes["v7_pallas/data_only"] == [1, 20, 2, 32]
    assert shapes["v6_parallel/data_heads"] == [1, 20, 1, 32]
    assert shapes["v4_parallel/data_heads"] == [1, 20, 32]


def test_rejects_arguments_of_unknown_rank():
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    sharded = shard_wkv(lambda x, state: (x, state), mesh)
    with pytest.raises(ValueError, match="rank-5"):
        sharded(jnp.zeros((1, 1, 1, 1, 1)), jnp.zeros((1, 1, 1, 1)))


TRAIN_STEP = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from rwkv_jax.train import TrainConfig
    from rwkv_jax.train import loop, sharding
    from tests.helpers import random_params, record_wkv_calls

    assert jax.device_count() == 8
    out = sys.argv[1]
    report = {}
    for version in (4, 6, 7):
        seen = record_wkv_calls(version, "pallas")
        cfg = TrainConfig.from_args(["preset=tiny", f"version={version}", "wkv=pallas", "n_layer=1",
                                     "ctx_len=24", "batch_size=8", "mesh_data=2", "mesh_fsdp=4",
                                     f"out={out}/v{version}", "steps=1", "eval_batches=1"])
        summary = loop.train(cfg, log=lambda line: None)  # the 2 x 4 mesh: train step and validation
        rows_in_loop = sorted({rows for rows, _ in seen})

        # Loss and gradients on the mesh vs one device. Random weights: from the official init
        # (zero output projections) no gradient would reach the kernel.
        run = loop.build_run(cfg)
        params = random_params(run.model_cfg)
        batch = loop.train_batch(run, 0)
        grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loop.loss_fn(run.model, p, b, cfg.l2wrap)))
        seen.clear()
        loss, grads = grad_fn(params, np.asarray(batch))
        rows_single = sorted({rows for rows, _ in seen})
        seen.clear()
        with jax.set_mesh(run.mesh):
            placed = jax.device_put(params, sharding.tree_shardings(params, run.mesh, cfg.fsdp_min_size))
            loss_mesh, grads_mesh = grad_fn(placed, batch)
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(grads_mesh), jax.tree.leaves(grads)))
        report[version] = {"loss_single": float(loss), "loss_sharded": float(loss_mesh),
                           "max_grad_rel_diff": diff, "rows_in_loop": rows_in_loop,
                           "rows_single": rows_single, "rows_sharded": sorted({rows for rows, _ in seen}),
                           "loop_loss_finite": bool(np.isfinite(summary["losses"][0]))}
    print("REPORT " + json.dumps(report))
    """
)


@pytest.mark.slow
def test_the_training_loop_runs_each_kernel_on_its_own_batch_shard(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", TRAIN_STEP, str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))[7:])
    print(report)
    for version, numbers in report.items():
        # One device runs the kernel on all 8 rows; on the 2 x 4 mesh (set by the training loop,
        # or by jax.set_mesh) each device on its own row: the partitioner alone would run a GPU
        # kernel on the whole batch on every device.
        assert numbers["rows_single"] == [8], (version, numbers)
        assert numbers["rows_sharded"] == [1] and numbers["rows_in_loop"] == [1], (version, numbers)
        assert numbers["loop_loss_finite"], (version, numbers)
        assert abs(numbers["loss_single"] - numbers["loss_sharded"]) <= 1e-5 * abs(numbers["loss_single"])
        assert numbers["max_grad_rel_diff"] <= 1e-5, (version, numbers)


def test_without_a_context_mesh_the_kernel_is_called_unchanged():
    kernel = lambda x, state: (x, state)  # noqa: E731
    assert shard_over_context_mesh(kernel, 8) is kernel
    with jax.set_mesh(Mesh(np.array(jax.devices()[:1]), ("data",))):  # one device: nothing to split
        assert shard_over_context_mesh(kernel, 8) is kernel
