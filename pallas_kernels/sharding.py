"""Run a WKV kernel per shard with ``jax.shard_map``: batch over mesh axes, optionally heads.

The recurrences are independent per batch element and per head (per channel for v4), so each
device can run the kernel on its own slice with no communication; gradients flow through
``shard_map`` unchanged. Pallas kernels need this wrapper because a ``pallas_call`` is not
partitioned by the SPMD partitioner on its own.

Argument layouts are recognised by rank, with the state always the last argument:

* per-token inputs ``[B, T, H, N]`` (v5-v7) or ``[B, T, C]`` (v4, C = H·N channels);
* per-head parameters ``[H, N]`` (v5/v6 bonus ``u``) or per-channel ``[C]`` (v4 decay, bonus);
* state ``[B, H, N, N]`` (v5-v7) or a tuple of ``[B, C]`` arrays (v4's ``(aa, bb, pp)``).

Outputs ``(y, final_state)`` take the layout of the first argument and of the state.

The model wraps its kernel calls with it under a mesh set with ``jax.set_mesh`` (see
``rwkv_jax.wkv.mesh``), so each device computes only its own rows' recurrence.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

# Which dimensions are batch (B) and head/channel (H) for each rank, inputs vs state.
_INPUT_LAYOUTS = {4: "BTHN", 3: "BTH", 2: "HN", 1: "H"}
_STATE_LAYOUTS = {4: "BHNN", 2: "BH"}


MeshAxes = str | tuple[str, ...] | None


def _spec(layout: str, batch_axis: MeshAxes, head_axis: MeshAxes) -> PartitionSpec:
    axis_for = {"B": batch_axis, "H": head_axis}
    return PartitionSpec(*(axis_for.get(dim) for dim in layout))


def _layout(x: jax.Array, layouts: dict[int, str], role: str) -> str:
    if x.ndim not in layouts:
        raise ValueError(f"shard_wkv: cannot place a rank-{x.ndim} {role} (shape {x.shape})")
    return layouts[x.ndim]


def shard_wkv(
    fn: Callable,
    mesh: Mesh | AbstractMesh,
    batch_axis: MeshAxes = "data",
    head_axis: MeshAxes = None,
) -> Callable:
    """Wrap a WKV function so it runs per shard of the batch (and heads when head_axis is given).

    Args:
      fn: ``(*inputs, state, **options) -> (y, final_state)``, e.g. ``wkv7_pallas``.
      mesh: the device mesh (or the abstract mesh of the context).
      batch_axis: mesh axis, or tuple of axes, that splits the batch dimension (None: batch
        replicated).
      head_axis: mesh axis (or axes) that splits heads (channels for v4); None keeps heads whole.

    Returns:
      A function with fn's signature; keyword options are forwarded to fn on every shard. The
      batch (and head) sizes must be divisible by the mesh axis sizes.
    """

    @functools.wraps(fn)
    def sharded(*args, **options):
        *inputs, state = args
        input_specs = tuple(
            _spec(_layout(x, _INPUT_LAYOUTS, "input"), batch_axis, head_axis) for x in inputs
        )
        state_specs = jax.tree.map(
            lambda x: _spec(_layout(x, _STATE_LAYOUTS, "state"), batch_axis, head_axis), state
        )
        y_spec = input_specs[0]
        per_shard = jax.shard_map(
            functools.partial(fn, **options),
            mesh=mesh,
            in_specs=(*input_specs, state_specs),
            out_specs=(y_spec, state_specs),
            # pallas_call does not track which mesh axes its outputs vary over.
            check_vma=False,
        )
        return per_shard(*inputs, state)

    return sharded

