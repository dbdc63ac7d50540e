"""WKV recurrence of RWKV-5 ("Eagle") and RWKV-6 ("Finch").

Per head, with an N×N matrix state S laid out [key i, value j]:

    y_t[j] = Σ_i r_t[i] · ( u[i] k_t[i] v_t[j] + S_{t−1}[i, j] )
    S_t    = diag(exp(logw_t)) S_{t−1} + k_t v_tᵀ

`logw_t ≤ 0` is the per-token, per-key-channel log-decay: RWKV-6 passes
`-exp(time_decay + lora(x))` (it can be −150 or less, i.e. decays that underflow to 0),
RWKV-5 passes `-exp(time_decay)` broadcast over time. `u` is the per-key-channel bonus
(`time_faaaa`).

Shapes: r, logw, k, v `[B, T, H, N]`; u `[H, N]`; state `[B, H, N, N]`; y `[B, T, H, N]`.
Inputs may be bf16 or fp32; everything is computed and returned in fp32 because decays close
to 1 need the precision (docs/rwkv_versions.md §14.2).

Three forms of the same recurrence:
* `wkv6_step`     — one token (inference).
* `wkv6_oracle`   — `wkv6_step` under `jax.lax.scan`; the reference the others are tested against.
* `wkv6_parallel` — chunked form for training (docs/rwkv_versions.md §8.3): matmuls inside
  chunks (built over a binary tree of blocks so that no decay factor exceeds 1), an associative
  scan over chunk states between them.

Matmuls use JAX's default precision, so `jax.default_matmul_precision` decides whether a GPU
may use TF32 for them; wrap calls in `jax.default_matmul_precision("highest")` for full fp32.
"""

import jax
import jax.numpy as jnp

from rwkv_jax.wkv.scan import associative_scan


def _as_fp32(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def wkv6_step(
    r: jax.Array,
    logw: jax.Array,
    k: jax.Array,
    v: jax.Array,
    u: jax.Array,
    state: jax.Array,
    reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Advance the WKV recurrence by one token.

    Args:
      r, logw, k, v: `[B, H, N]` receptance, log-decay (≤ 0), key, value of the token.
      u: `[H, N]` bonus applied to the current token's key.
      state: `[B, H, N, N]` state before the token, layout [key, value].
      reset: `[B]` bool or None; True zeroes that row's state first (a new document).

    Returns:
      y: `[B, H, N]` fp32 output of the token.
      new_state: `[B, H, N, N]` fp32 state after the token.
    """
    r, logw, k, v, u, state = _as_fp32(r, logw, k, v, u, state)
    if reset is not None:
        state = jnp.where(reset[:, None, None, None], 0.0, state)
    kv = k[..., :, None] * v[..., None, :]  # [B, H, N, N]
    y = jnp.einsum("bhi,bhij->bhj", r, u[None, :, :, None] * kv + state)
    new_state = jnp.exp(logw)[..., None] * state + kv
    return y, new_state


def wkv6_oracle(
    r: jax.Array,
    logw: jax.Array,
    k: jax.Array,
    v: jax.Array,
    u: jax.Array,
    state: jax.Array,
    reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Token-by-token WKV recurrence (`wkv6_step` under `jax.lax.scan`); the reference form.

    Args:
      r, logw, k, v: `[B, T, H, N]` receptance, log-decay (≤ 0), key, value.
      u: `[H, N]` bonus.
      state: `[B, H, N, N]` initial state, layout [key, value].
      reset: `[B, T]` bool document starts, or None.

    Returns:
      y: `[B, T, H, N]` fp32 outputs.
      final_state: `[B, H, N, N]` fp32 state after the last token.
    """

    def step(carried_state, token):
        y_t, next_state = wkv6_step(*token[:4], u, carried_state, *token[4:])
        return next_state, y_t

    per_token = _as_fp32(r, logw, k, v) + (() if reset is None else (reset,))
    time_major = tuple(jnp.moveaxis(a, 1, 0) for a in per_token)
    final_state, y = jax.lax.scan(step, jnp.asarray(state, jnp.float32), time_major)
    return jnp.moveaxis(y, 0, 1), final_state


# On CPU, XLA materialises every intermediate of the intra-chunk work for all chunks at once; once
# that outgrows the last-level cache the memory traffic costs more than the arithmetic (T = 4096,
# H = 4, N = 64: 2.5× slower). There `lax.map` runs the chunks in groups of about this many
# elements per [group, H, P, N] array (≈ 1 MiB); accelerators run all chunks at once.
_CPU_GROUP_ELEMENTS = 1 << 18


def _intra_chunk(r, logw, k, v, u, reset=None):
    """Everything one chunk needs that does not depend on the state it starts from.

    Args:
      r, logw, k, v: `[P, H, N]` one chunk, token-major; P is a power of two.
      u: `[H, N]` bonus.
      reset: `[P]` bool document starts, or None. With resets, A keeps only pairs of the same
        document, r_decayed only the tokens before the chunk's first reset (the others do not
        read the start state), update only the chunk's last document, and decay is 0 if the
        chunk holds a reset: multiplicative masks on finite values, no -inf log-decay.

    Returns, with λ_t = Σ_{j≤t} logw_j the cumulative log-decay from the chunk start:
      y_intra: `[H, P, N]` the chunk's own contribution to y, A V with
        A[t, i] = Σ_c r_t[c] k_i[c] exp(λ_{t−1}[c] − λ_i[c])  (i < t),
        A[t, t] = Σ_c r_t[c] u[c] k_t[c].
      r_decayed: `[H, P, N]` r_t ⊙ exp(λ_{t−1}), which reads the chunk's start state.
      update: `[H, N, N]` Σ_i (k_i ⊙ exp(λ_{P−1} − λ_i)) v_iᵀ, the state the chunk adds.
      decay: `[H, N]` exp(λ_{P−1}), the decay across the chunk.

    A is built over a binary tree of blocks. At the level with blocks of size h, each pair of
    sibling blocks (lower then upper) contributes the pairs t in the upper block, i in the lower one,
    whose decay factors through the boundary b between the blocks:

        exp(λ_{t−1} − λ_i) = exp(λ_{t−1} − λ_{b−1}) · exp(λ_{b−1} − λ_i)
                           = (decay from b to t−1)  · (decay from i+1 to b−1),

    so that block of A is one matmul of `rows` (r times its decay since the start of its block)
    and `cols` (k times its decay to the end of its block). Both factors are products of decays
    w = exp(logw) ∈ [0, 1] that lie inside the two blocks: no factor exceeds 1, so nothing
    overflows however strong the decay, and an underflow to 0 only drops a term that really is
    below fp32 range. (Writing the pair decay as a difference λ_{t−1} − λ_i of chunk-wide sums
    instead loses precision once a logw of −200 sits inside the chunk.) Merging the two blocks,
    the upper block's `rows` pick up the lower block's decay and the lower block's `cols` the
    upper block's, which gives the factors of the next level; at the top they are the
    chunk-level r_decayed and k ⊙ exp(λ_{P−1} − λ_i). log₂ P levels, each a batched matmul and a
    few elementwise passes; building A costs about as many multiply-adds as the matmul A V.
    """
    r, logw, k, v = (jnp.swapaxes(x, 0, 1) for x in (r, logw, k, v))  # [H, P, N]
    heads, size, head_size = r.shape
    scores = jnp.einsum("htn,htn->ht", r * u[:, None], k)[..., None, None]  # the diagonal: 1×1 blocks
    rows, cols, block_decay = r, k, jnp.exp(logw)  # block_decay: [H, P / h, N], one per block
    upper = (jnp.arange(2) == 1)[:, None, None]  # selects the upper block of a [2, h, N] pair
    h = 1
    while h < size:
        pairs = size // (2 * h)
        rows_b, cols_b = (x.reshape(heads, pairs, 2, h, head_size) for x in (rows, cols))
        decay_b = block_decay.reshape(heads, pairs, 2, 1, head_size)
        # Rows of each upper block against the columns of its lower sibling: [H, pairs, h, h].
        cross = jnp.einsum("hptn,hpin->hpti", rows_b[:, :, 1], cols_b[:, :, 0])
        diagonal = scores.reshape(heads, pairs, 2, h, h)
        scores = jnp.concatenate(
            [jnp.concatenate([diagonal[:, :, 0], jnp.zeros_like(cross)], axis=-1),
             jnp.concatenate([cross, diagonal[:, :, 1]], axis=-1)],
            axis=-2,
        )  # [H, pairs, 2h, 2h]
        rows = (rows_b * jnp.where(upper, decay_b[:, :, :1], 1.0)).reshape(heads, size, head_size)
        cols = (cols_b * jnp.where(upper, 1.0, decay_b[:, :, 1:])).reshape(heads, size, head_size)
        block_decay = decay_b[:, :, 0, 0] * decay_b[:, :, 1, 0]
        h *= 2
    scores = scores.reshape(heads, size, size)
    block_decay = block_decay.reshape(heads, head_size)
    if reset is not None:
        documents = jnp.cumsum(reset)  # documents started so far in the chunk, [P]
        scores = jnp.where(documents[:, None] == documents[None, :], scores, 0.0)
        rows = jnp.where((documents == 0)[:, None], rows, 0.0)
        cols = jnp.where((documents == documents[-1])[:, None], cols, 0.0)
        block_decay = jnp.where(documents[-1] == 0, block_decay, 0.0)
    y_intra = jnp.einsum("hti,hin->htn", scores, v)
    update = jnp.einsum("hin,him->hnm", cols, v)
    return y_intra, rows, update, block_decay


def _compose(earlier, later):
    """Two chunk transitions S ↦ diag(decay) S + update, applied in order."""
    decay_a, update_a = earlier
    decay_b, update_b = later
    return decay_a * decay_b, decay_b[..., None] * update_a + update_b


def wkv6_parallel(
    r: jax.Array,
    logw: jax.Array,
    k: jax.Array,
    v: jax.Array,
    u: jax.Array,
    state: jax.Array,
    chunk_size: int = 64,
    reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Chunked parallel WKV recurrence (training form); same results as `wkv6_oracle`.

    T is padded to a multiple of `chunk_size` with identity tokens (r = k = v = 0, logw = 0)
    and split into chunks of length L = `chunk_size`. Within a chunk, with λ_t the cumulative
    log-decay from the chunk start (λ_{−1} = 0):

        Y   = A V + (R ⊙ exp(λ_{t−1})) S_start
        A[t, i] = Σ_c r_t[c] k_i[c] exp(λ_{t−1}[c] − λ_i[c])  (i < t),
        A[t, t] = Σ_c r_t[c] u[c] k_t[c],  A[t, i] = 0  (i > t)
        S_end = diag(exp(λ_{L−1})) S_start + Σ_i (k_i ⊙ exp(λ_{L−1} − λ_i)) v_iᵀ

    `_intra_chunk` computes A and the decayed r and k exactly (all decay factors ≤ 1), and the
    chunk start states come from an associative scan (`rwkv_jax.wkv.scan`) over the chunks'
    (decay, additive) transitions. Memory is O(T·(H·N + H·L)) for the per-token arrays and the
    L×L blocks of A, plus O((T/L)·H·N²) for the chunk states; the per-token state is never
    materialised. L ≈ N is the fastest choice: the chunk states and A then weigh about as much as
    one input each, while L < N multiplies the chunk states' memory by N/L (N = 64 on CPU at
    T = 4096: L = 64 runs ~2.5× faster than L = 16). A chunk length that is not a power of two is
    padded inside each chunk with identity tokens.

    Args:
      r, logw, k, v: `[B, T, H, N]` receptance, log-decay (≤ 0), key, value.
      u: `[H, N]` bonus.
      state: `[B, H, N, N]` initial state, layout [key, value].
      chunk_size: tokens per chunk (static).
      reset: `[B, T]` bool document starts, or None: the state is zeroed before a True token
        (see `_intra_chunk`; a chunk with a reset has decay 0, so the scan drops what came before).

    Returns:
      y: `[B, T, H, N]` fp32 outputs.
      final_state: `[B, H, N, N]` fp32 state after the last real token.
    """
    r, logw, k, v, u, state = _as_fp32(r, logw, k, v, u, state)
    batch, seq_len, heads, head_size = r.shape
    num_chunks = -(-seq_len // chunk_size)
    size = 1 << (chunk_size - 1).bit_length()  # chunk length for the tree: the next power of two

    def to_chunks(x):
        # Zero padding is an identity token: k = v = 0 adds nothing, logw = 0 decays nothing (and
        # starts no document).
        trailing = ((0, 0),) * (x.ndim - 2)
        x = jnp.pad(x, ((0, 0), (0, num_chunks * chunk_size - seq_len), *trailing))
        x = x.reshape(batch * num_chunks, chunk_size, *x.shape[2:])
        return jnp.pad(x, ((0, 0), (0, size - chunk_size), *trailing))  # [B·C, P, H, N]

    chunks = tuple(to_chunks(x) for x in (r, logw, k, v) + (() if reset is None else (reset,)))
    # The backward pass recomputes the intra-chunk work rather than storing its log₂ P levels.
    intra = jax.checkpoint(lambda c: _intra_chunk(*c[:4], u, *c[4:]))
    if jax.default_backend() == "cpu":
        group = max(1, _CPU_GROUP_ELEMENTS // (heads * size * head_size))
        outputs = jax.lax.map(intra, chunks, batch_size=group)
    else:
        outputs = jax.vmap(intra)(chunks)
    y_intra, r_decayed, update, decay = (
        x.reshape(batch, num_chunks, *x.shape[1:]) for x in outputs
    )  # [B, C, H, P, N], [B, C, H, P, N], [B, C, H, N, N], [B, C, H, N]

    # State after each chunk: the initial state enters through chunk 0's update, then an
    # inclusive associative scan composes the chunks' transitions.
    update = update.at[:, 0].add(decay[:, 0, ..., None] * state)
    _, chunk_ends = associative_scan(_compose, (decay, update), axis=1)
    final_state = chunk_ends[:, -1]  # padding tokens are identities
    chunk_starts = jnp.concatenate([state[:, None], chunk_ends[:, :-1]], axis=1)

    y = y_intra + jnp.einsum("bchtn,bchnm->bchtm", r_decayed, chunk_starts)
    y = jnp.swapaxes(y[:, :, :, :chunk_size], 2, 3)  # [B, C, L, H, N]
    y = y.reshape(batch, num_chunks * chunk_size, heads, head_size)
    return y[:, :seq_len], final_state


def wkv6_transition(
    logw: jax.Array,
    k: jax.Array,
    v: jax.Array,
    reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The affine map a stretch of tokens applies to the state it starts from:
    S_end = diag(decay) S0 + update.

    decay = exp(Σ_t logw_t) (0 if the stretch holds a document start: S0 is then forgotten) and
    update = Σ_i (k_i ⊙ exp(Σ_{j>i} logw_j)) v_iᵀ over the stretch's last document, the end state
    from S0 = 0: one matmul, no outputs. The decay after each token is summed from the end rather
    than as a difference of prefix sums, which would cancel next to a very strong decay (logw of
    −200). Context parallelism summarises each device's sequence shard with it
    (`rwkv_jax.wkv.mesh`).

    Args:
      logw, k, v: `[B, T, H, N]` log-decay (≤ 0), key, value.
      reset: `[B, T]` bool document starts, or None.

    Returns:
      decay `[B, H, N]` (acting on the key channels) and update `[B, H, N, N]` ([key, value]), fp32.
    """
    logw, k, v = _as_fp32(logw, k, v)
    from_token = jnp.flip(jnp.cumsum(jnp.flip(logw, 1), axis=1), 1)  # Σ_{j≥i} logw_j
    after_token = jnp.pad(from_token[:, 1:], ((0, 0), (0, 1), (0, 0), (0, 0)))  # Σ_{j>i}
    decay = jnp.exp(from_token[:, 0])
    k_to_end = k * jnp.exp(after_token)
    if reset is not None:
        documents = jnp.cumsum(reset, axis=1)  # documents started so far, [B, T]
        k_to_end = jnp.where((documents == documents[:, -1:])[:, :, None, None], k_to_end, 0.0)
        decay = jnp.where((documents[:, -1] == 0)[:, None, None], decay, 0.0)
    return decay, jnp.einsum("bthi,bthj->bhij", k_to_end, v)
