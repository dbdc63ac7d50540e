"""Context parallelism (rwkv_jax/wkv/mesh.py): under a mesh with a "seq" axis, each device runs
the recurrence on its own stretch of tokens, with the same values and gradients as one device.

The checks run in a subprocess with 8 virtual CPU devices (the device count is fixed when JAX
starts) on a (data=2, seq=4) mesh:
- the WKV forms of v4, v5/v6 and v7 (oracle, parallel, Pallas kernel in interpret mode; with and
  without document resets, one of them on a shard boundary): y, final state and the gradients
  into every input, including the initial state and the per-channel parameters; and what each
  device's form really sees (a quarter of the tokens, half the rows);
- whole models (v4, v6, v7, random weights): logits, state and parameter gradients, and the logits
  come back split over "seq";
- clear errors for a length the axis does not divide and for a version without a shard transition.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
# About 80 s on two cores (interpret-mode kernels and model gradients on 8 virtual devices).
pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import dataclasses, json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    import rwkv_jax as rj
    from rwkv_jax.wkv import run_wkv
    from rwkv_jax.versions.v4 import WKV4
    from rwkv_jax.versions.v5 import WKV_DIAG
    from rwkv_jax.versions.v7 import WKV7
    from tests.helpers import random_params, random_tokens

    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "seq"))
    B, T, H, N = 2, 24, 2, 16
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kappa = normal(B, T, H, N)
    kappa = kappa / jnp.linalg.norm(kappa, axis=-1, keepdims=True)
    # Row 0 starts a document mid-shard, row 1 on a shard boundary (token 12 of 24 on 4 shards).
    reset = jnp.zeros((B, T), bool).at[0, 9].set(True).at[1, 3].set(True).at[1, 12].set(True)
    cases = {
        "v7": (WKV7, (normal(B, T, H, N), -0.6 * jax.nn.sigmoid(normal(B, T, H, N)), normal(B, T, H, N),
                      normal(B, T, H, N), -kappa, 0.5 * kappa), (normal(B, H, N, N),)),
        "v6": (WKV_DIAG, (normal(B, T, H, N), -jnp.exp(normal(B, T, H, N)), normal(B, T, H, N),
                          normal(B, T, H, N)), (normal(H, N), normal(B, H, N, N))),
        "v4": (WKV4, (3 * normal(B, T, H * N), normal(B, T, H * N)),
               (-jnp.exp(normal(H * N)), normal(H * N),
                (normal(B, H * N), jnp.abs(normal(B, H * N)) + 1, 3 * normal(B, H * N)))),
    }

    def rel(actual, expected):
        a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
        return float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-30))

    def max_rel(actual, expected):
        return max(rel(a, e) for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)))

    report = {"wkv": {}, "seen": {}, "model": {}, "errors": {}}
    for name, (forms, per_token, rest) in cases.items():
        for impl in ("oracle", "parallel", "pallas"):
            for reset_case in (None, reset):
                if impl == "pallas" and reset_case is not None:
                    continue
                key = f"{name}/{impl}/{'plain' if reset_case is None else 'reset'}"
                seen = report["seen"].setdefault(key, [])

                def recording(*args, form=getattr(forms, impl), seen=seen, **options):
                    seen.append(list(args[0].shape[:2]))  # rows and tokens one call sees
                    return form(*args, **options)

                recorded = dataclasses.replace(forms, **{impl: recording})
                options = {"chunk_size": 4} if impl == "parallel" and name != "v4" else {}

                def loss(per_token, rest, reset_case):
                    y, state = run_wkv(recorded, impl, per_token, rest, reset_case, **options)
                    weights = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
                    return jnp.sum(y * weights) + sum(jnp.sum(jnp.sin(s)) for s in jax.tree.leaves(state)), (y, state)

                grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
                expected = grad_fn(per_token, rest, reset_case)
                seen.clear()
                with jax.set_mesh(mesh):
                    actual = grad_fn(per_token, rest, reset_case)
                report["wkv"][key] = max_rel(actual, expected)

    sizes = {4: dict(n_embd=32), 6: dict(n_embd=64, head_size=32), 7: dict(n_embd=64, head_size=32)}
    for version, size in sizes.items():
        cfg = rj.RWKVConfig(version=version, n_layer=2, vocab_size=50, chunk_size=4, **size)
        params, tokens = random_params(cfg), random_tokens(cfg, 2, 16)

        def model_loss(params):
            logits, state = rj.RWKV(cfg).apply({"params": params}, tokens)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), (logits, state)

        grad_fn = jax.jit(jax.value_and_grad(model_loss, has_aux=True))
        expected = grad_fn(params)
        with jax.set_mesh(mesh):
            actual = grad_fn(params)
        logits = actual[0][1][0]
        report["model"][f"v{version}"] = {"error": max_rel(actual, expected),
                                          "logits_spec": [str(axis) for axis in logits.sharding.spec]}

    with jax.set_mesh(mesh):
        refused = {"length": (7, 10), "version": (3, 8)}  # version, tokens
        for name, (version, length) in refused.items():
            cfg = rj.RWKVConfig(version=version, n_layer=1, n_embd=64, vocab_size=50)
            try:
                rj.RWKV(cfg).init(jax.random.PRNGKey(0), jnp.zeros((2, length), jnp.int32))
                report["errors"][name] = None
            except ValueError as error:
                report["errors"][name] = str(error)
    print("REPORT " + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def report() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))[7:])


def test_every_form_split_over_seq_equals_the_unsplit_form_in_values_and_gradients(report):
    assert len(report["wkv"]) == 15
    for case, error in report["wkv"].items():
        assert error <= 1e-5, (case, error)


def test_each_device_runs_its_form_once_on_a_quarter_of_the_tokens_of_its_rows(report):
    for case, shapes in report["seen"].items():
        # The shard summaries come from the tokens without the form: one call, for the outputs.
        assert shapes == [[1, 6]], (case, shapes)


def test_models_split_over_seq_equal_one_device_and_keep_their_activations_split(report):
    for version, numbers in report["model"].items():
        assert numbers["error"] <= 1e-5, (version, numbers)
        assert numbers["logits_spec"][:2] == ["data", "seq"], (version, numbers)


def test_lengths_the_axis_does_not_divide_and_versions_without_a_transition_are_refused(report):
    assert "must be a multiple of 4" in report["errors"]["length"]
    assert "supports RWKV-4 to 7 only" in report["errors"]["version"]


TRAIN = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from rwkv_jax.train import TrainConfig
    from rwkv_jax.train import loop, sharding
    from tests.helpers import random_params, record_wkv_calls

    assert jax.device_count() == 8
    report = {}
    for version in (4, 6, 7):
        seen = record_wkv_calls(version, "parallel")
        cfg = TrainConfig.from_args(["preset=tiny", f"version={version}", "wkv=parallel", "n_layer=1",
                                     "ctx_len=24", "batch_size=4", "mesh_data=2", "mesh_seq=4",
                                     f"out={sys.argv[1]}/v{version}", "steps=1", "eval_batches=1"])
        summary = loop.train(cfg, log=lambda line: None)  # the 2 x 1 x 4 mesh: a step and validation
        in_loop = sorted(set(map(tuple, seen)))

        run = loop.build_run(cfg)
        params = random_params(run.model_cfg)
        batch = loop.train_batch(run, 0)
        grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loop.loss_fn(run.model, p, b, cfg.l2wrap)))
        loss, grads = grad_fn(params, np.asarray(batch))
        with jax.set_mesh(run.mesh):
            placed = jax.device_put(params, sharding.tree_shardings(params, run.mesh, cfg.fsdp_min_size))
            loss_mesh, grads_mesh = grad_fn(placed, batch)
        error = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
                    for a, b in zip(jax.tree.leaves(grads_mesh), jax.tree.leaves(grads)))
        report[version] = {"in_loop": in_loop, "loop_loss": summary["losses"][0], "loss": float(loss),
                           "loss_mesh": float(loss_mesh), "grad_error": error}
    print("REPORT " + json.dumps(report))
    """
)


def test_the_training_loop_splits_each_sequence_over_the_seq_axis(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", TRAIN, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))[7:])
    print(report)
    for version, numbers in report.items():
        # 4 rows over data=2, 24 tokens over seq=4: every call on 2 rows x 6 tokens.
        assert numbers["in_loop"] == [[2, 6]], (version, numbers)
        assert np.isfinite(numbers["loop_loss"]), (version, numbers)
        assert abs(numbers["loss_mesh"] - numbers["loss"]) <= 1e-5 * abs(numbers["loss"]), (version, numbers)
        assert numbers["grad_error"] <= 1e-5, (version, numbers)

