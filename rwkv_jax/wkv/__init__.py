"""The WKV recurrences as pure functions of arrays, one module per state family.

- `toeplitz`: RWKV-1 (learned distance curve and position factors; a buffer of past terms).
- `vector_eps`: RWKV-2/3 (vector state, log space, with the official ε in the denominator).
- `vector`: RWKV-4 (vector state, log space).
- `diag`: RWKV-5/6 (matrix state, diagonal decay, bonus u).
- `dplr`: RWKV-7 (matrix state, diagonal plus rank-1 transition).

Each family has the same three forms: `*_oracle` (token-by-token `lax.scan`, the reference),
`*_parallel` (associative scan, training) and `*_step` (one token, decoding). `run_wkv` picks
the form for a call; every form takes its per-token arrays first and the rest after.

Packed documents: every form also takes `reset` (`[B, T]` bool, `[B]` for the step; None = no
resets, the unchanged code path). A True entry starts a new document at that token: the state is
set to the family's zero state before the token, so each document is computed exactly as if it
had been run on its own from `init_state`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax

from rwkv_jax.wkv import mesh

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class WKVForms:
    """The three forms of one recurrence family, its Pallas kernel where one exists (v4-v7; same
    arguments as `parallel`, see `pallas_kernels/`) and how a sequence shard's start state maps
    to its end state, for context parallelism (v4-v7; `rwkv_jax.wkv.mesh`)."""

    oracle: Callable[..., tuple[Array, Any]]
    parallel: Callable[..., tuple[Array, Any]]
    step: Callable[..., tuple[Array, Any]]
    pallas: Callable[..., tuple[Array, Any]] | None = None
    shard_transition: mesh.ShardTransition | None = None


def run_wkv(forms: WKVForms, impl: str, per_token: tuple[Array, ...], rest: tuple[Any, ...],
            reset: Array | None = None, **parallel_options: Any) -> tuple[Array, Any]:
    """Run a recurrence over `per_token` arrays `[B, T, ...]`, with document starts `reset [B, T]`
    (bool) or None.

    A single token always takes the decoding `step` (that is what `RWKV.step` exercises); longer
    inputs take `impl` ("oracle", "parallel" or "pallas"). `parallel_options` (the chunk size)
    only reach the parallel form: each kernel picks its own chunk per platform, and runs in
    Pallas interpret mode where the backend has no Pallas variant (CPU). Under a mesh set with
    `jax.set_mesh` a kernel runs per batch shard, and a mesh axis "seq" splits the tokens over
    its devices (context parallelism, any form): see `rwkv_jax.wkv.mesh`.
    """
    if per_token[0].shape[1] == 1:  # every implementation decodes with the step, which takes resets
        step_reset = {} if reset is None else {"reset": reset[:, 0]}
        y, state = forms.step(*(x[:, 0] for x in per_token), *rest, **step_reset)
        return y[:, None], state
    if reset is not None and impl not in ("oracle", "parallel"):
        raise ValueError(f"the {impl!r} WKV implementation does not support document resets; "
                         "use wkv='parallel' or 'oracle'")
    with_reset = {} if reset is None else {"reset": reset}
    if impl == "oracle":
        form = forms.oracle
    elif impl == "parallel":
        form = functools.partial(forms.parallel, **parallel_options)
    elif impl == "pallas" and forms.pallas is not None:
        from rwkv_jax.config import pallas_platform

        form = functools.partial(forms.pallas, interpret=pallas_platform() is None)
    else:
        raise ValueError(f"unknown WKV implementation {impl!r}")

    if mesh.context_seq_shards() > 1:
        if forms.shard_transition is None:
            raise ValueError(f"context parallelism (mesh axis {mesh.SEQ_AXIS!r}) supports RWKV-4 to 7 only")
        return mesh.context_parallel_wkv(form, forms.shard_transition, per_token, rest, reset)
    if impl == "pallas":
        form = mesh.shard_over_context_mesh(form, per_token[0].shape[0])
    return form(*per_token, *rest, **with_reset)
