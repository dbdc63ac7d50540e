"""shard_wkv (pallas_kernels/sharding.py): per-shard kernels equal the unsharded call.

Runs in a subprocess with 8 virtual CPU devices (the device count is fixed when JAX starts, so it
cannot be changed inside this pytest process). The subprocess compares values and gradients
(with respect to every input, including the initial state) of the sharded and unsharded calls on
a (data=4, heads=2) mesh and on a data-only mesh, for the Pallas v7 kernel in interpret mode and,
to check the v4-v6 argument layouts, for the XLA parallel forms of v6 and v4.
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
