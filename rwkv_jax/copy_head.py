"""The head-QK "copy" head of RWKV-1..3 (spec §2.3) as pure functions of arrays.

From the final hidden states, `q_t = head_q(h_t)` and `k_u = head_k(h_u)` (width D); position t
adds `q_t·k_u / D` to the logit of the token seen at position u, for every u in the window of the
last TT positions up to and including t:

    logits[t, token_u] += q_t·k_u / D     for t - TT < u ≤ t

While t < TT that is every u ≤ t, exactly the official GPT form (`copy_mask`, which requires
T ≤ TT). Past TT it is the sliding window the official v2/v3 RNN keeps (its `hk` holds the last
`ctx_len` keys), so the copy head, like the v2/v3 recurrence, runs on indefinitely. (The
official RNN then pairs those keys with the *first* ctx_len token ids, `x[ctx[i]] += c[i]`; we
pair every key with its own token.)

Cache `(keys [B, TT, D], tokens [B, TT] int32)`: position p lives in slot p mod TT. `pos [B]`
int32 counts the tokens seen before the call. The forms add into `logits [B, T, V]` float32
(the plain head's output), so the vocabulary size never has to be passed around:
`copy_step` (one token), `copy_oracle` (`lax.scan` of the step) and `copy_parallel` (all
scores of the call at once).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
Cache = tuple[Array, Array]


def _cleared(pos: Array, cache: Cache, reset: Array) -> tuple[Array, Cache]:
    """Position 0 and an empty cache for the rows where `reset [B]` is True (a new document)."""
    keys, tokens = cache
    return (jnp.where(reset, 0, pos), (jnp.where(reset[:, None, None], 0.0, keys).astype(keys.dtype),
                                       jnp.where(reset[:, None], 0, tokens)))


def copy_step(logits: Array, q: Array, k: Array, token: Array, pos: Array, cache: Cache,
              reset: Array | None = None) -> tuple[Array, Cache]:
    """One token. `logits [B, V]`, `q, k [B, D]`, `token, pos [B]` -> `(logits [B, V], cache)`;
    `reset [B]` bool starts a new document (position 0, empty cache) at this token."""
    if reset is not None:
        pos, cache = _cleared(pos, cache, reset)
    keys, tokens = cache
    B, TT, D = keys.shape
    batch = jnp.arange(B)
    keys = keys.at[batch, pos % TT].set(k.astype(keys.dtype))
    tokens = tokens.at[batch, pos % TT].set(token)
    scores = jnp.einsum("bd,bjd->bj", q.astype(jnp.float32), keys) / D
    # Until the cache has filled up, slots past the current position hold nothing yet.
    scores = jnp.where(jnp.arange(TT) <= pos[:, None], scores, 0)
    return logits.at[batch[:, None], tokens].add(scores), (keys, tokens)


def copy_oracle(logits: Array, q: Array, k: Array, tokens: Array, pos: Array, cache: Cache,
                reset: Array | None = None) -> tuple[Array, Cache]:
    """Token-by-token reference: `logits [B, T, V]`, `q, k [B, T, D]`, `tokens [B, T]`, document
    starts `reset [B, T]` bool or None."""
    def body(carry: tuple[Cache, Array], xs: tuple[Array, ...]) -> tuple[tuple[Cache, Array], Array]:
        cache, p = carry
        if reset is not None:
            p, cache = _cleared(p, cache, xs[4])
        out, cache = copy_step(*xs[:4], p, cache)
        return (cache, p + 1), out

    per_token = tuple(jnp.swapaxes(x, 0, 1) for x in (logits, q, k, tokens) + (() if reset is None else (reset,)))
    (cache, _), out = jax.lax.scan(body, (cache, pos), per_token)
    return jnp.swapaxes(out, 0, 1), cache


def copy_parallel(logits: Array, q: Array, k: Array, tokens: Array, pos: Array, cache: Cache,
                  reset: Array | None = None) -> tuple[Array, Cache]:
    """All tokens at once, against the cache and each other; same contract as `copy_oracle`.

    With `reset [B, T]`, positions count from each document's start, a token sees the cache only
    if no document started before it in the call, and other tokens only within its document; the
    cache is emptied and then holds the last document's tokens.
    """
    keys, cached_tokens = cache
    B, TT, D = keys.shape
    T = q.shape[1]
    if reset is not None:
        return _copy_parallel_with_resets(logits, q, k, tokens, pos, cache, reset)
    positions = pos[:, None] + jnp.arange(T)  # [B, T]
    # Slot j holds the latest position before the call that is ≡ j (mod TT); negative = empty.
    cached_positions = pos[:, None] - 1 - (pos[:, None] - 1 - jnp.arange(TT)) % TT  # [B, TT]
    all_positions = jnp.concatenate([cached_positions, positions], axis=1)  # [B, TT + T]
    all_keys = jnp.concatenate([keys, k.astype(keys.dtype)], axis=1)
    all_tokens = jnp.concatenate([cached_tokens, tokens], axis=1)
    distance = positions[:, :, None] - all_positions[:, None, :]  # [B, T, TT + T]
    in_window = (all_positions[:, None, :] >= 0) & (distance >= 0) & (distance < TT)
    scores = jnp.einsum("btd,bsd->bts", q.astype(jnp.float32), all_keys) / D
    scores = jnp.where(in_window, scores, 0)
    logits = logits.at[jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None], all_tokens[:, None, :]].add(scores)
    # Only the last TT tokens of the call survive in the cache (earlier ones would share slots).
    kept = slice(max(T - TT, 0), T)
    slots = positions[:, kept] % TT
    batch = jnp.arange(B)[:, None]
    return logits, (keys.at[batch, slots].set(k[:, kept].astype(keys.dtype)),
                    cached_tokens.at[batch, slots].set(tokens[:, kept]))


def document_positions(pos: Array, reset: Array) -> tuple[Array, Array]:
    """Each token's position in its document `[B, T]` (continuing from `pos [B]` until the first
    reset) and its document index in the call `[B, T]` (0 = the one the state came from)."""
    T = reset.shape[1]
    index = jnp.arange(T)
    documents = jnp.cumsum(reset, axis=1)
    last_start = jax.lax.cummax(jnp.where(reset, index, -1), axis=1)  # [B, T], -1 before any reset
    positions = jnp.where(documents > 0, index - last_start, pos[:, None] + index)
    return positions, documents


def _copy_parallel_with_resets(logits: Array, q: Array, k: Array, tokens: Array, pos: Array, cache: Cache,
                               reset: Array) -> tuple[Array, Cache]:
    keys, cached_tokens = cache
    B, TT, D = keys.shape
    T = q.shape[1]
    positions, documents = document_positions(pos, reset)
    cached_positions = pos[:, None] - 1 - (pos[:, None] - 1 - jnp.arange(TT)) % TT  # [B, TT]
    all_positions = jnp.concatenate([cached_positions, positions], axis=1)  # [B, TT + T]
    all_documents = jnp.concatenate([jnp.zeros((B, TT), documents.dtype), documents], axis=1)
    all_keys = jnp.concatenate([keys, k.astype(keys.dtype)], axis=1)
    all_tokens = jnp.concatenate([cached_tokens, tokens], axis=1)
    distance = positions[:, :, None] - all_positions[:, None, :]  # [B, T, TT + T]
    in_window = ((all_positions[:, None, :] >= 0) & (distance >= 0) & (distance < TT)
                 & (documents[:, :, None] == all_documents[:, None, :]))
    scores = jnp.einsum("btd,bsd->bts", q.astype(jnp.float32), all_keys) / D
    scores = jnp.where(in_window, scores, 0)
    logits = logits.at[jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None], all_tokens[:, None, :]].add(scores)
    # The cache after the call: emptied if a document started, then the last document's last TT
    # tokens in their slots (position mod TT); other tokens are dropped (slot TT is out of range).
    restarted = documents[:, -1] > 0
    _, (keys, cached_tokens) = _cleared(pos, cache, restarted)
    kept = slice(max(T - TT, 0), T)
    in_last = documents[:, kept] == documents[:, -1:]
    slots = jnp.where(in_last, positions[:, kept] % TT, TT)
    batch = jnp.arange(B)[:, None]
    return logits, (keys.at[batch, slots].set(k[:, kept].astype(keys.dtype), mode="drop"),
                    cached_tokens.at[batch, slots].set(tokens[:, kept], mode="drop"))
