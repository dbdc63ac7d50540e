"""RWKV-1's time-mix weighting (spec §3.3, §3.8): a learned Toeplitz kernel over distance, times
factors of the absolute positions, over a plain cumulative-sum normaliser.

Per head h (channels h·N ... h·N+N-1), for the token at absolute position t < TT:

    K_u = exp(clip(k_u, -60, 30)),   P_u = α_h(u) · K_u ⊙ v_u
    y_t = β_h(t) · Σ_{u≤t} f_h(t-u) P_u / Σ_{u≤t} K_u,   f_h(d) = time_w[h, TT-1-d]

which is the official `W[h,t,u] = f_h(t-u) α_h(u) β_h(t)` applied to `K ⊙ v` and divided by
`cumsum(K)`. f_h is an arbitrary learned curve, so the numerator has no finite recurrent form:
the state keeps every past term. The model is defined only for positions < TT (α, β and the
caller's γ are indexed by absolute position), so TT slots indexed by position suffice.

State `(buf [B, TT, A], den [B, A])`: P_u in slot u (zero where not written yet) and Σ_u K_u.
`pos [B]` int32 is the absolute position of the call's first token. A call whose tokens would
reach position TT returns NaN for that batch row: past TT - 1 the model is undefined, and under
`jit` there is no other way to say so (`RWKV` raises instead whenever positions are known).

Three forms: `toeplitz_step` (one token: write its term, dot the buffer with the distance
curve), `toeplitz_oracle` (`lax.scan` of the step, the reference) and `toeplitz_parallel` (one
masked Toeplitz product; from a fresh state with T = TT it is exactly the official T×T matrix).

Shapes: `k, v [B, T, A]`, `time_w`, `alpha` (official `time_alpha[:, 0, :]`), `beta` (official
`time_beta[:, :, 0]`) `[H, TT]`. Everything is computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
State = tuple[Array, Array]

# The official clamp of k before exp ("e^30 = 10^13"); it also keeps Σ e^k finite and nonzero.
K_MIN, K_MAX = -60.0, 30.0


def _at(table: Array, positions: Array) -> Array:
    """Per-head factors `table [H, TT]` at `positions [B, T]` -> `[B, T, H, 1]` (clipped to TT-1;
    rows past it are NaN-ed by the caller)."""
    return jnp.moveaxis(table[:, jnp.minimum(positions, table.shape[1] - 1)], 0, -1)[..., None]


def _terms(k: Array, v: Array, alpha: Array, positions: Array) -> tuple[Array, Array]:
    """`K = e^{clip(k)}` `[B, T, A]` and `P = α(position) K v` `[B, T, H, N]`."""
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    B, T, A = k.shape
    K = jnp.exp(jnp.clip(k, K_MIN, K_MAX))
    return K, (K * v).reshape(B, T, alpha.shape[0], -1) * _at(alpha, positions)


def _past_ctx_is_nan(y: Array, pos: Array, length: int, ctx_len: int) -> Array:
    return jnp.where((pos + length > ctx_len).reshape(-1, *[1] * (y.ndim - 1)), jnp.nan, y)


def toeplitz_step(k: Array, v: Array, time_w: Array, alpha: Array, beta: Array, pos: Array,
                  state: State) -> tuple[Array, State]:
    """One token. `k, v [B, A]`, `pos [B]` -> `y [B, A]` float32 and the new state."""
    buf, den = state
    B, A = k.shape
    H, TT = time_w.shape
    K, P = _terms(k[:, None], v[:, None], alpha, pos[:, None])
    buf = buf.at[jnp.arange(B), pos].set(P.reshape(B, A), mode="drop")
    den = den + K[:, 0]
    distance = pos[:, None] - jnp.arange(TT)  # [B, TT]: t - u for every slot u
    curve = jnp.where(distance >= 0, time_w[:, jnp.clip(TT - 1 - distance, 0, TT - 1)], 0)  # [H, B, TT]
    num = jnp.einsum("hbu,buhn->bhn", curve, buf.reshape(B, TT, H, -1))
    y = _at(beta, pos[:, None])[:, 0] * num / den.reshape(B, H, -1)
    return _past_ctx_is_nan(y.reshape(B, A), pos, 1, TT), (buf, den)


def toeplitz_oracle(k: Array, v: Array, time_w: Array, alpha: Array, beta: Array, pos: Array,
                    state: State) -> tuple[Array, State]:
    """Token-by-token reference. `k, v [B, T, A]` -> `y [B, T, A]` float32 and the final state."""
    def body(carry: tuple[State, Array], kv: tuple[Array, Array]) -> tuple[tuple[State, Array], Array]:
        state, p = carry
        y, state = toeplitz_step(kv[0], kv[1], time_w, alpha, beta, p, state)
        return (state, p + 1), y

    (state, _), y = jax.lax.scan(body, (state, pos), (jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)))
    return _past_ctx_is_nan(jnp.swapaxes(y, 0, 1), pos, k.shape[1], time_w.shape[1]), state


def toeplitz_parallel(k: Array, v: Array, time_w: Array, alpha: Array, beta: Array, pos: Array,
                      state: State) -> tuple[Array, State]:
    """All tokens at once; same contract as `toeplitz_oracle`. O(T·TT·A) time, O(H·T·TT) weights.

    The product runs over the window of the TT positions that ends at the call's last token:
    window slot i holds position pos + T - TT + i, so its first TT - T slots are earlier tokens
    read from the buffer (zero before position 0) and the last T are this call's. Query t is then
    at distance TT - T + t - i from slot i, the same for every batch row whatever its `pos`, so
    the weights are row TT - T + t of the official TT×TT Toeplitz matrix.
    """
    buf, den = state
    B, T, A = k.shape
    H, TT = time_w.shape
    if T > TT:
        raise ValueError(f"RWKV-1 is defined only for ctx_len={TT} positions; got {T} tokens in one call")
    positions = pos[:, None] + jnp.arange(T)  # [B, T]
    K, P = _terms(k, v, alpha, positions)
    earlier = pos[:, None] + (T - TT) + jnp.arange(TT - T)  # [B, TT-T] positions of the window's older slots
    old = jnp.take_along_axis(buf, jnp.clip(earlier, 0, TT - 1)[..., None], axis=1)
    old = jnp.where((earlier >= 0)[..., None], old, 0)
    window = jnp.concatenate([old.reshape(B, TT - T, H, A // H), P], axis=1)  # [B, TT, H, N]
    distance = (TT - T + np.arange(T))[:, None] - np.arange(TT)[None, :]  # static [T, TT]
    curve = jnp.where(distance >= 0, time_w[:, np.clip(TT - 1 - distance, 0, TT - 1)], 0)  # [H, T, TT]
    num = jnp.einsum("hti,bihn->bthn", curve, window)
    den_t = den[:, None] + jnp.cumsum(K, axis=1)
    y = _at(beta, positions) * num / den_t.reshape(B, T, H, -1)
    buf = buf.at[jnp.arange(B)[:, None], positions].set(P.reshape(B, T, A), mode="drop")
    return _past_ctx_is_nan(y.reshape(B, T, A), pos, T, TT), (buf, den_t[:, -1])
