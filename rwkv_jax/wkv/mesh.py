"""The WKV forms under a mesh set with `jax.set_mesh`: batch shards and sequence shards.

Batch: a Pallas kernel runs per batch shard (`shard_over_context_mesh`), its rows split over the
mesh axes that divide them (`context_batch_axes`); XLA cannot partition a `pallas_call` itself and
would run the whole batch on every device. The XLA forms need nothing: the partitioner splits them.

Context (sequence) parallelism: when the mesh has an axis named `SEQ_AXIS` ("seq") of size D > 1,
`run_wkv` runs the recurrence with each device holding T/D consecutive tokens of its rows
(`context_parallel_wkv`, any form: oracle, parallel or kernel). It works because every
recurrence of RWKV-4..7 maps the state a stretch of tokens starts from to the state it ends in by
an affine map,

    S_end = M(S_start) + U,

where U is the end state reached from the zero state and M, the product of the stretch's
transitions, does not depend on v (RWKV-4: a per-channel decay; RWKV-5/6: a per-key-channel
decay; RWKV-7: an N×N matrix). Each device

1. summarises its shard as (M, U) straight from its tokens, without running the WKV form
   (`wkv4_transition`, `wkv6_transition`: one pass of sums / one matmul; RWKV-7's
   `wkv7_transition`: the chunked form's chunk maps, composed);
2. all-gathers the D summaries (D·B·H·N² values, not the tokens) and composes those before it
   with the initial state into its own start state; every device composes all D into the final
   state, so the final state is the same on every device;
3. runs the WKV form from its start state for its outputs y.

The WKV form is whichever one the model chose (oracle, parallel or a Pallas kernel), unchanged,
and runs once per device over T/D tokens; with the parallel form, the summary made each device's
fwd+bwd 1.3-1.4x the form's alone for v7 and 0.9-1.7x for v4-v6 on a CPU (noisy;
`experiments/bench_context_parallel.py`), plus O(D) state compositions. Gradients flow through
`jax.shard_map` and the all-gather (whose transpose is a reduce-scatter) into every input,
including the initial state. RWKV-7's summary assumes the model's decay bound (see
`wkv7_parallel`), whichever form runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

from rwkv_jax.wkv.diag import wkv6_transition
from rwkv_jax.wkv.dplr import wkv7_transition
from rwkv_jax.wkv.vector import wkv4_transition

Array = jax.Array

# The mesh axis that splits the sequence dimension.
SEQ_AXIS = "seq"


def context_batch_axes(batch_size: int) -> tuple[str, ...]:
    """The axes of the mesh set with `jax.set_mesh` that split a batch of `batch_size` rows.

    Every axis but `SEQ_AXIS`, in the mesh's order, whose size divides the rows left to it (the
    training loop splits its batch over all of them); axes that are already manual (inside the
    caller's own `shard_map`) are not split again. Empty without a context mesh.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes, rows = [], batch_size
    for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types):
        if name != SEQ_AXIS and kind != AxisType.Manual and size > 1 and rows % size == 0:
            axes.append(name)
            rows //= size
    return tuple(axes)


def shard_over_context_mesh(fn: Callable, batch_size: int) -> Callable:
    """`fn` per batch shard over the context mesh (`context_batch_axes`); `fn` unchanged where no
    mesh axis splits the batch (no mesh, one device, a batch the axes do not divide)."""
    from pallas_kernels.sharding import shard_wkv

    axes = context_batch_axes(batch_size)
    if not axes:
        return fn
    return shard_wkv(fn, jax.sharding.get_abstract_mesh(), batch_axis=axes)


def context_seq_shards() -> int:
    """How many devices the context mesh's `SEQ_AXIS` splits a sequence over (1: none)."""
    mesh = jax.sharding.get_abstract_mesh()
    if SEQ_AXIS not in mesh.axis_names:
        return 1
    index = mesh.axis_names.index(SEQ_AXIS)
    return 1 if mesh.axis_types[index] == AxisType.Manual else mesh.axis_sizes[index]


def _check_seq_len(seq_len: int, shards: int) -> None:
    if seq_len % shards:
        raise ValueError(f"context parallelism splits the sequence over the {shards} devices of mesh axis "
                         f"{SEQ_AXIS!r}: the length ({seq_len}) must be a multiple of {shards}")


def token_spec(batch_size: int, seq_len: int) -> PartitionSpec:
    """Where `[B, T, ...]` activations live under the context mesh: rows over the batch axes,
    tokens over `SEQ_AXIS` (when it splits them; T must then be a multiple of its size)."""
    shards = context_seq_shards()
    _check_seq_len(seq_len, shards)
    return PartitionSpec(context_batch_axes(batch_size) or None, SEQ_AXIS if shards > 1 else None)


@dataclasses.dataclass(frozen=True)
class ShardTransition:
    """How a family's recurrence maps a shard's start state to its end state.

    summarize(per_token, params, reset) -> (M, U): the shard's transition and its end state from
      the zero state, computed from the shard's tokens without running a WKV form.
    apply(M, U, state) -> M(state) + U.
    """

    summarize: Callable[..., tuple[Any, Any]]
    apply: Callable[[Any, Any, Any], Any]


def _diag_summarize(per_token, params, reset):
    _, logw, k, v = per_token
    return wkv6_transition(logw, k, v, reset)


def _diag_apply(decay, end_from_zero, state):
    return decay[..., None] * state + end_from_zero  # state [key, value]: decays act on keys


def _dplr_summarize(per_token, params, reset):
    return wkv7_transition(*per_token[1:], reset=reset)  # (r, logw, k, v, a, b): r is not needed


def _dplr_apply(transition, end_from_zero, state):
    # state [value, key]; each token multiplies it on the right (S ↦ S (diag(w) + a bᵀ) + v kᵀ).
    return jnp.einsum("bhvk,bhkj->bhvj", state, transition,
                      precision=jax.lax.Precision.HIGHEST) + end_from_zero


def _vector_summarize(per_token, params, reset):
    return wkv4_transition(*per_token, params[0], reset)


def _vector_apply(log_transition, end_from_zero, state):
    # (aa, bb, pp) stands for the sums (aa·e^pp, bb·e^pp); add the decayed state to the shard's
    # own sums in the same max-trick form.
    aa, bb, pp = state
    end_aa, end_bb, end_pp = end_from_zero
    kept = pp + log_transition  # -inf after a reset; end_pp is always finite
    p = jnp.maximum(kept, end_pp)
    e_kept, e_end = jnp.exp(kept - p), jnp.exp(end_pp - p)
    return aa * e_kept + end_aa * e_end, bb * e_kept + end_bb * e_end, p


DIAG_TRANSITION = ShardTransition(_diag_summarize, _diag_apply)        # RWKV-5/6
DPLR_TRANSITION = ShardTransition(_dplr_summarize, _dplr_apply)        # RWKV-7
VECTOR_TRANSITION = ShardTransition(_vector_summarize, _vector_apply)  # RWKV-4


def context_parallel_wkv(form: Callable, transition: ShardTransition, per_token: tuple[Array, ...],
                         rest: tuple[Any, ...], reset: Array | None = None) -> tuple[Array, Any]:
    """Run `form(*per_token, *rest, reset=...)` with the tokens split over the context mesh's
    `SEQ_AXIS` (and the batch over its other axes); same results as the unsplit call.

    Args:
      form: the WKV form, `(*per_token, *params, state, **reset) -> (y, final_state)`.
      transition: the family's `ShardTransition`.
      per_token: `[B, T, ...]` arrays; T must be divisible by the `SEQ_AXIS` size.
      rest: the per-channel parameters, then the state (an array or a tuple of `[B, ...]` arrays).
      reset: `[B, T]` bool document starts, or None.

    Returns:
      y `[B, T, ...]` and the state after the last token.
    """
    shards = context_seq_shards()
    *params, state = rest
    tokens = token_spec(*per_token[0].shape[:2])
    state_spec = jax.tree.map(lambda _: PartitionSpec(tokens[0]), state)

    def per_shard(per_token, params, state, reset):
        summary = transition.summarize(per_token, params, reset)
        gathered = jax.lax.all_gather(summary, SEQ_AXIS)  # leading axis: the D shards
        starts, current = [], state
        for shard in range(shards):
            starts.append(current)
            current = transition.apply(*jax.tree.map(lambda x, shard=shard: x[shard], gathered), current)
        position = jax.lax.axis_index(SEQ_AXIS)
        start = jax.tree.map(lambda *xs: jnp.stack(xs)[position], *starts)
        y, _ = form(*per_token, *params, start, **({} if reset is None else {"reset": reset}))
        return y, current

    run = jax.shard_map(
        per_shard, mesh=jax.sharding.get_abstract_mesh(),
        in_specs=((tokens,) * len(per_token), (PartitionSpec(),) * len(params), state_spec,
                  None if reset is None else tokens),
        out_specs=(tokens, state_spec),
        # A Pallas kernel does not track which mesh axes its outputs vary over.
        check_vma=False,
    )
    return run(tuple(per_token), tuple(params), state, reset)
