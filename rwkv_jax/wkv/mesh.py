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

1. summarises its shard as (M, U): U by running the WKV form from the zero state, M in closed
   form for v4-v6 and, for v7, by the same run on v = 0 from the identity state (the two runs
   share one call on a doubled batch);
2. all-gathers the D summaries (D·B·H·N² values, not the tokens) and composes those before it
   with the initial state into its own start state; every device composes all D into the final
   state, so the final state is the same on every device;
3. runs the WKV form from its start state for its outputs y.

The WKV form is whichever one the model chose (oracle, parallel or a Pallas kernel), unchanged:
per device that is two passes over T/D tokens (v7: a doubled batch in the first) instead of one
over T, plus O(D) state compositions. Gradients flow through `jax.shard_map` and the all-gather
(whose transpose is a reduce-scatter) into every input, including the initial state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

from rwkv_jax.wkv.vector import EMPTY_LOG_SCALE

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

    summarize(form, per_token, params, state, reset) -> (M, U): the shard's transition and its
      end state from the zero state (`state` gives shapes and the batch); `form` is the WKV form.
    apply(M, U, state) -> M(state) + U.
    """

    summarize: Callable[..., tuple[Any, Any]]
    apply: Callable[[Any, Any, Any], Any]


def _reset_option(reset: Array | None) -> dict[str, Array]:
    return {} if reset is None else {"reset": reset}


def _any_reset(reset: Array | None, batch: int) -> Array:
    """`[B]` whether each row starts a document inside the shard (its start state is then lost)."""
    return jnp.zeros((batch,), bool) if reset is None else jnp.any(reset, axis=1)


def _diag_summarize(form, per_token, params, state, reset):
    logw = per_token[1]
    _, end_from_zero = form(*per_token, *params, jnp.zeros(state.shape, jnp.float32), **_reset_option(reset))
    decay = jnp.exp(jnp.sum(logw.astype(jnp.float32), axis=1))  # [B, H, N]
    decay = jnp.where(_any_reset(reset, logw.shape[0])[:, None, None], 0.0, decay)
    return decay, end_from_zero


def _diag_apply(decay, end_from_zero, state):
    return decay[..., None] * state + end_from_zero  # state [key, value]: decays act on keys


def _dplr_summarize(form, per_token, params, state, reset):
    batch, size = state.shape[0], state.shape[-1]
    # One call on [real v from the zero state; v = 0 from the identity]: the second row block
    # ends in the transition matrix itself.
    value_index = 3  # (r, logw, k, v, a, b)
    doubled = tuple(jnp.concatenate([x, jnp.zeros_like(x) if i == value_index else x])
                    for i, x in enumerate(per_token))
    identity = jnp.broadcast_to(jnp.eye(size, dtype=jnp.float32), state.shape)
    starts = jnp.concatenate([jnp.zeros(state.shape, jnp.float32), identity])
    doubled_reset = None if reset is None else jnp.concatenate([reset, reset])
    _, ends = form(*doubled, *params, starts, **_reset_option(doubled_reset))
    return ends[batch:], ends[:batch]


def _dplr_apply(transition, end_from_zero, state):
    # state [value, key]; each token multiplies it on the right (S ↦ S (diag(w) + a bᵀ) + v kᵀ).
    return jnp.einsum("bhvk,bhkj->bhvj", state, transition,
                      precision=jax.lax.Precision.HIGHEST) + end_from_zero


def _vector_summarize(form, per_token, params, state, reset):
    k = per_token[0]
    log_decay = params[0]
    aa = state[0]
    zero = (jnp.zeros(aa.shape, jnp.float32), jnp.zeros(aa.shape, jnp.float32),
            jnp.full(aa.shape, EMPTY_LOG_SCALE, jnp.float32))
    _, end_from_zero = form(*per_token, *params, zero, **_reset_option(reset))
    log_transition = jnp.broadcast_to(k.shape[1] * log_decay.astype(jnp.float32), aa.shape)  # [B, C]
    log_transition = jnp.where(_any_reset(reset, k.shape[0])[:, None], -jnp.inf, log_transition)
    return log_transition, end_from_zero


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
        summary = transition.summarize(form, per_token, params, state, reset)
        gathered = jax.lax.all_gather(summary, SEQ_AXIS)  # leading axis: the D shards
        starts, current = [], state
        for shard in range(shards):
            starts.append(current)
            current = transition.apply(*jax.tree.map(lambda x, shard=shard: x[shard], gathered), current)
        position = jax.lax.axis_index(SEQ_AXIS)
        start = jax.tree.map(lambda *xs: jnp.stack(xs)[position], *starts)
        y, _ = form(*per_token, *params, start, **_reset_option(reset))
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
