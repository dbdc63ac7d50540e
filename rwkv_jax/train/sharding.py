"""Device mesh and sharding: one code path for one device, many devices, or many hosts.

The mesh has three axes: `data` (pure data parallelism: parameters replicated), `fsdp`
(parameters, gradients and optimiser state sharded ZeRO-3 style; XLA gathers each layer's weights
where they are used) and `seq` (context parallelism: each sequence's tokens split over its
devices, see `rwkv_jax.wkv.mesh`; size 1 unless asked for). The batch's rows are split over
`data` and `fsdp`; under `seq` the model splits the tokens of its activations itself.
Parameters are placed by `SHARDING_RULES`: large matrices are split over `fsdp` on their largest
dimension that the axis size divides; small arrays (norms, mixes, decays) are replicated. The
leading layer axis of `blocks/...` parameters is never split, because `nn.scan` slices it.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rwkv_jax.train.config import ConfigError
from rwkv_jax.wkv.mesh import SEQ_AXIS

DATA_AXIS, FSDP_AXIS = "data", "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
AXES = (DATA_AXIS, FSDP_AXIS, SEQ_AXIS)
REPLICATE, SHARD = "replicate", "shard"
# First match wins; patterns are matched against the "/"-joined parameter path.
SHARDING_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|/)(scale|bias)$", REPLICATE),                       # LayerNorm / GroupNorm affine
    (r"(^|/)(kernel|embedding)$", SHARD),                     # emb, head, every projection
    (r"^blocks/att/(time_maa|time_decay)_w[12]$", SHARD),     # v6 LoRA factors
    (r"^blocks/att/[wavg][12]$", SHARD),                      # v7 LoRA factors
    (r".*", REPLICATE),                                       # mixes, decays, bonuses: vectors
)


def maybe_initialize_distributed() -> bool:
    """Call `jax.distributed.initialize()` when this process is one of several (env-detected).

    Recognised: an explicit `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID`,
    Slurm (`SLURM_NTASKS` > 1), Open MPI (`OMPI_COMM_WORLD_SIZE` > 1) and multi-host Cloud TPU
    (`TPU_WORKER_HOSTNAMES` with several hosts). Must run before anything touches a device.
    Returns whether it initialised.
    """
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env:
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env.get("JAX_PROCESS_ID", "0")))
        return True
    multi = (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
             or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
    if multi:
        jax.distributed.initialize()
    return multi


def make_mesh(data: int = -1, fsdp: int = 1, seq: int = 1, devices: list | None = None) -> Mesh:
    """A `(data, fsdp, seq)` mesh over `devices` (default: all); -1 for data or fsdp means "the rest"."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ConfigError("at most one of mesh_data / mesh_fsdp may be -1")
    if seq < 1:
        raise ConfigError(f"mesh_seq must be at least 1, got {seq}")
    for name, size in (("mesh_data", data), ("mesh_fsdp", fsdp)):
        if size != -1 and size < 1:
            raise ConfigError(f"{name} must be a positive device count or -1 (all remaining devices), got {size}")
    if data == -1:
        data = n // (fsdp * seq)
    if fsdp == -1:
        fsdp = n // (data * seq)
    if data * fsdp * seq != n:
        raise ConfigError(f"mesh data={data} x fsdp={fsdp} x seq={seq} does not cover the {n} devices")
    # Mesh(...) without axis types: "auto" axes (the compiler propagates shardings), unlike
    # jax.make_mesh, whose default axis types have changed between jax versions.
    return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp, seq), AXES)


def batch_rows(mesh: Mesh) -> int:
    """How many ways the batch's rows are split (the `data` x `fsdp` devices)."""
    return mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]


def rule_for(path: str) -> str:
    """REPLICATE or SHARD: the first rule of `SHARDING_RULES` matching `path`."""
    return next(rule for pattern, rule in SHARDING_RULES if re.search(pattern, path))


def param_spec(path: str, shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """The PartitionSpec of the parameter at `path` (see `SHARDING_RULES`).

    A SHARD array is split over the fsdp axis on its largest dimension divisible by `fsdp_size`
    (ties: the last), skipping the layer axis of `blocks/` arrays; it stays replicated when it has
    fewer than `min_size` elements or no dimension divides.
    """
    if fsdp_size == 1 or rule_for(path) == REPLICATE or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    first = 1 if path.startswith("blocks/") else 0
    candidates = [d for d in range(first, len(shape)) if shape[d] % fsdp_size == 0]
    if not candidates:
        return P()
    dim = max(candidates, key=lambda d: (shape[d], d))
    return P(*[FSDP_AXIS if d == dim else None for d in range(len(shape))])


def _dict_path(key_path: tuple) -> str:
    """"blocks/att/key/kernel" from a tree key path, keeping only dict keys, so an optimiser
    state's `mu`/`nu` leaves get the same name (and sharding) as the parameter they track."""
    return "/".join(str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey))


def tree_shardings(tree: Any, mesh: Mesh, min_size: int) -> Any:
    """A NamedSharding for every array leaf of `tree` (params, optimiser state, or both)."""
    fsdp_size = mesh.shape[FSDP_AXIS]

    def leaf_sharding(key_path: tuple, leaf: Any) -> NamedSharding:
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, param_spec(_dict_path(key_path), shape, fsdp_size, min_size))

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over the `data` and `fsdp` devices; the `[B, T + 1]` crops' token axis is whole
    (under `seq` the model splits its `[B, T]` activations)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def make_global_batch(shape: tuple[int, ...], sharding: NamedSharding,
                      rows: Callable[[slice], np.ndarray]) -> jax.Array:
    """A global `[B, ...]` array whose addressable shards are built from `rows(row_slice)`.

    Every process knows the whole batch's recipe (crops depend only on seed and step) but only
    materialises the rows its own devices hold, so the same code serves one host or many.
    """
    def callback(index: tuple) -> np.ndarray:
        return rows(index[0])[(slice(None),) + tuple(index[1:])]

    return jax.make_array_from_callback(shape, sharding, callback)
