"""Text generation: an exact batched prefill, then a jitted decoding loop with the official samplers.

    tok = rwkv_jax.tokenizers.WorldTokenizer()
    prompts = [[0] + tok.encode(text) for text in texts]   # World models: start with token 0
    out = generate(cfg, params, prompts, max_new_tokens=100, key=jax.random.key(0), top_p=0.85,
                   presence_penalty=0.2, frequency_penalty=0.2, stop_tokens=[0])
    print([tok.decode(ids) for ids in out.tokens])

Prompts are token ids; the official usage prepends token 0 (end of document) to World-model
prompts, which is the caller's job. Sampling follows the official `rwkv.utils.PIPELINE`:
penalties on the logits, then top-p and top-k on the probabilities, then temperature
(`temperature=0` is greedy). Samples are a function of the key, the step and the row's place in
the batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import RWKVConfig
from rwkv_jax.layers import layer_norm, linear, orthogonal
from rwkv_jax.model import RWKV, Block, embedding_rows
from rwkv_jax.state import State, init_state

Array = jax.Array
Params = Any
StepFn = Callable[[Array, State], tuple[Array, State]]
PAD = -1  # what a row emits after it stopped


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What `generate` returns.

    Attributes:
      tokens: per prompt, the generated ids (the stop token excluded).
      stopped: per prompt, whether it ended by sampling a stop token (else it hit max_new_tokens).
      state: the state after each prompt and its `tokens` (the stop token is not fed), batch in
        prompt order: exactly what running the model on `prompt + tokens` gives.
      logits: [B, V] float32, the next-token logits at `state` (before penalties).
    """

    tokens: list[list[int]]
    stopped: list[bool]
    state: State
    logits: Array


@dataclasses.dataclass(frozen=True)
class DecodingParams:
    """Parameters laid out once for decoding (`prepare_decoding`); `generate`, `decode` and
    `iter_generate` take them in place of the model's params.

    Attributes:
      params: the model's params as given (prefill runs on these).
      step: the same weights in the layout of the one-token step (`step_params`).
    """

    params: Params
    step: Any


def prepare_decoding(model_or_cfg: RWKV | RWKVConfig, params: Params, batch_size: int = 1) -> DecodingParams:
    """Lay out `params` for decoding `batch_size` rows, once for many calls (a chat, a benchmark).

    Every call of `generate`/`decode`/`iter_generate` with plain params re-lays them out, which
    is cheap for the layer split but not for the batch-1 `[out, in]` kernels of `step_params`
    (~0.25 s at L12-D768 on CPU, the time of ~17 tokens), so plain calls skip those and only
    prepared params get them. On CPU the result holds a second copy of the weights.
    """
    return DecodingParams(params, step_params(_config(model_or_cfg), params, batch_size))


def _for_step(cfg: RWKVConfig, params: Params | DecodingParams) -> Any:
    return params.step if isinstance(params, DecodingParams) else step_params(cfg, params)


def generate(model_or_cfg: RWKV | RWKVConfig, params: Params | DecodingParams, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, key: Array | None = None, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             penalty_decay: float = 0.996, penalty_exempt: Sequence[int] = (), stop_tokens: Sequence[int] = (),
             banned_tokens: Sequence[int] = (), prefill_chunk: int | None = None, state: State | None = None
             ) -> GenerationResult:
    """Continue every prompt by up to `max_new_tokens` tokens, in one batch.

    Args:
      model_or_cfg: the model or its config; params: its parameters (`init(...)["params"]`), or
        `prepare_decoding`'s layout of them.
      prompts: B non-empty lists of token ids, of any lengths.
      key: PRNG key, required unless `temperature == 0`; equal keys give equal samples.
      temperature: 0 is greedy (argmax), otherwise logits / temperature are sampled.
      top_k: keep the k most likely tokens (0: all). top_p: keep the smallest most-likely set
        reaching probability top_p, plus ties (1: all).
      presence_penalty, frequency_penalty, penalty_decay: the official repetition penalty,
        `logits[t] -= presence + occurrence[t] * frequency` for every token t generated so far;
        after each token every occurrence is multiplied by `penalty_decay`, then the token's
        grows by 1 (by 0 for ids in `penalty_exempt`, which still get the presence penalty;
        `official_penalty_exempt(tokenizer)` lists the ids the official pipeline exempts).
      stop_tokens: sampling one ends that row; the other rows go on.
      banned_tokens: never sampled (the official `token_ban`; chat demos ban 0, end of text).
      prefill_chunk: the longest piece a prompt is fed in (None: no limit; see `prefill`). The
        parallel call materialises [rows, tokens, V] logits, so this bounds prefill memory.
      state: [.., B, ..] initial state (None: zeros), e.g. a previous result's `state`.

    The loop runs on device (`lax.while_loop` over the one-token step), ends when every row
    stopped, and compiles once per config, batch size, `max_new_tokens` and set of enabled samplers.
    RWKV-1 is defined only for positions < ctx_len: every prompt and its `max_new_tokens` must
    fit (all of them are fed), else ValueError before anything runs.
    """
    cfg = _config(model_or_cfg)
    _check_ids(cfg.vocab_size, prompts)  # before the room check, which needs well-formed prompts
    _check_max_new_tokens(max_new_tokens)
    _check_v1_room(cfg, state, [len(prompt) + max_new_tokens for prompt in prompts],
                   f"the prompt and max_new_tokens={max_new_tokens}")
    logits, state = prefill(model_or_cfg, params, prompts, state=state, chunk=prefill_chunk)
    return decode(model_or_cfg, params, logits, state, max_new_tokens=max_new_tokens, key=key,
                  temperature=temperature, top_k=top_k, top_p=top_p, presence_penalty=presence_penalty,
                  frequency_penalty=frequency_penalty, penalty_decay=penalty_decay, penalty_exempt=penalty_exempt,
                  stop_tokens=stop_tokens, banned_tokens=banned_tokens)


def decode(model_or_cfg: RWKV | RWKVConfig, params: Params | DecodingParams, logits: Array, state: State, *,
           max_new_tokens: int, key: Array | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           presence_penalty: float = 0.0, frequency_penalty: float = 0.0, penalty_decay: float = 0.996,
           penalty_exempt: Sequence[int] = (), stop_tokens: Sequence[int] = (), banned_tokens: Sequence[int] = ()
           ) -> GenerationResult:
    """The decoding half of `generate`: sample from `logits [B, V]` (the next-token logits at
    `state`, as `prefill` returns them) and go on from `state`; sampler arguments as `generate`.
    RWKV-1: `state`'s positions plus `max_new_tokens` must fit in ctx_len, else ValueError."""
    cfg = _config(model_or_cfg)
    sampler = _Sampler.create(cfg.vocab_size, key, temperature, top_k, top_p, presence_penalty, frequency_penalty,
                              penalty_decay, penalty_exempt, stop_tokens, banned_tokens)
    carry = _start(logits, state, max_new_tokens)
    if max_new_tokens == 0:  # the loop body cannot even be traced on a zero-length token axis
        return _result(carry)
    _check_v1_room(cfg, state, [max_new_tokens] * logits.shape[0], f"max_new_tokens={max_new_tokens}")
    carry = _decode_jit(cfg, _for_step(cfg, params), carry, sampler.arrays, modes=sampler.modes, loop=True)
    return _result(carry)


def iter_generate(model_or_cfg: RWKV | RWKVConfig, params: Params | DecodingParams, prompt: Sequence[int], *,
                  max_new_tokens: int, key: Array | None = None, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                  penalty_decay: float = 0.996, penalty_exempt: Sequence[int] = (), stop_tokens: Sequence[int] = (),
                  banned_tokens: Sequence[int] = (), prefill_chunk: int | None = None, state: State | None = None
                  ) -> TokenStream:
    """Stream one prompt's continuation token by token (arguments as `generate`).

    Each token is one call of the jitted step `generate` loops over, so with the same arguments
    it yields the tokens `generate` returns for `[prompt]`. The returned `TokenStream` is an
    iterator of ids; its `result` is the GenerationResult so far, so a caller may stop early (on
    a text condition, say) and still continue from `stream.result.state`.
    """
    cfg = _config(model_or_cfg)
    sampler = _Sampler.create(cfg.vocab_size, key, temperature, top_k, top_p, presence_penalty, frequency_penalty,
                              penalty_decay, penalty_exempt, stop_tokens, banned_tokens)
    _check_ids(cfg.vocab_size, [prompt])  # before the room check, which needs a well-formed prompt
    _check_max_new_tokens(max_new_tokens)
    _check_v1_room(cfg, state, [len(prompt) + max_new_tokens], f"the prompt and max_new_tokens={max_new_tokens}")
    logits, state = prefill(cfg, params, [prompt], state=state, chunk=prefill_chunk)
    return TokenStream(cfg, _for_step(cfg, params), _start(logits, state, max_new_tokens), sampler)


class TokenStream:
    """The iterator `iter_generate` returns: yields one prompt's new token ids as they are sampled.

    `result` is the GenerationResult of the tokens yielded so far (its `state` has them all
    fed); when the stream ends its StopIteration carries the final result as `value` (so
    `result = yield from stream` works in a generator).
    """

    def __init__(self, cfg: RWKVConfig, params_for_step: Any, carry: _Carry, sampler: _Sampler) -> None:
        self._cfg, self._params, self._carry, self._sampler = cfg, params_for_step, carry, sampler
        self._finished = carry.tokens.shape[1] == 0

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> int:
        if not self._finished:
            t = int(self._carry.t)
            self._carry = _decode_jit(self._cfg, self._params, self._carry, self._sampler.arrays,
                                      modes=self._sampler.modes, loop=False)
            token = int(self._carry.tokens[0, t])
            self._finished = token == PAD or t + 1 == self._carry.tokens.shape[1]
            if token != PAD:
                return token
        raise StopIteration(self.result)

    @property
    def result(self) -> GenerationResult:
        return _result(self._carry)


def prefill(model_or_cfg: RWKV | RWKVConfig, params: Params | DecodingParams, prompts: Sequence[Sequence[int]], *,
            state: State | None = None, chunk: int | None = None) -> tuple[Array, State]:
    """Run each prompt through the model with the parallel form.

    Returns `(logits [B, V]` for the token after each prompt, `state)`. Left padding is not
    neutral for an RNN, so prompts are grouped by length and each group runs as one batch; the
    result equals running every prompt on its own. A group is fed in pieces: `chunk` tokens at a
    time (if given), then the rest in power-of-two lengths, largest first, so prompts of any
    length reuse a few compiled shapes.
    """
    cfg = _config(model_or_cfg)
    params = params.params if isinstance(params, DecodingParams) else params
    _check_ids(cfg.vocab_size, prompts)
    if chunk is not None and chunk <= 0:
        raise ValueError(f"prefill chunk must be positive, got {chunk}")
    B = len(prompts)
    axes = _batch_axes(cfg)
    state = init_state(cfg, B) if state is None else state
    _check_state_shapes(cfg, state, B)
    _check_v1_room(cfg, state, [len(prompt) for prompt in prompts], "the prompt")

    groups: dict[int, list[int]] = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(len(prompt), []).append(row)
    rows_in_order, logits_parts, state_parts = [], [], []
    for length, rows in groups.items():
        tokens = jnp.asarray([list(prompts[row]) for row in rows], jnp.int32)
        group_state = jax.tree.map(lambda x, axis: jnp.take(x, jnp.asarray(rows), axis=axis), state, axes)
        start = 0
        for piece in _pieces(length, chunk):
            group_logits, group_state = _forward_last(cfg, params, tokens[:, start:start + piece], group_state)
            start += piece
        rows_in_order += rows
        logits_parts.append(group_logits)
        state_parts.append(group_state)
    inverse = jnp.asarray(np.argsort(rows_in_order))
    logits = jnp.take(jnp.concatenate(logits_parts), inverse, axis=0)
    state = jax.tree.map(lambda axis, *parts: jnp.take(jnp.concatenate(parts, axis=axis), inverse, axis=axis),
                         axes, *state_parts)
    return logits, state


def official_penalty_exempt(tokenizer: Any) -> list[int]:
    """The ids the official `PIPELINE.generate` counts 0 times instead of once for the frequency
    penalty: those whose decoded text is a substring of " \\t0123456789" (a space, a tab, digits).
    `tokenizer` needs `decode(list[int]) -> str` and `vocab_size`."""
    return [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) in " \t0123456789"]


# ----------------------------------------------------------------------------- sampling pieces


def apply_penalty(logits: Array, seen: Array, occurrence: Array, presence: Array | float,
                  frequency: Array | float) -> Array:
    """The official repetition penalty: `logits [B, V] - (presence + occurrence * frequency)`
    where `seen [B, V]` (bool: generated at least once), unchanged elsewhere."""
    return logits - jnp.where(seen, presence + occurrence * frequency, 0.0)


def update_occurrence(seen: Array, occurrence: Array, token: Array, emitted: Array, decay: Array | float,
                      weights: Array) -> tuple[Array, Array]:
    """Count `token [B]` for the rows that `emitted [B]`: their occurrences `[B, V]` decay, then
    the token's grows by `weights[token]` (1, or 0 for exempt tokens, which still become seen)."""
    hit = jax.nn.one_hot(token, occurrence.shape[-1], dtype=jnp.bool_) & emitted[:, None]
    occurrence = jnp.where(emitted[:, None], occurrence * decay, occurrence) + jnp.where(hit, weights, 0.0)
    return seen | hit, occurrence


def filter_logits(logits: Array, top_k: Array | int, top_p: Array | float) -> Array:
    """The official top-p and top-k filters: logits [B, V] with -inf outside the kept set.

    As `PIPELINE.sample_logits`: top-p keeps every token whose probability is at least that of
    the first token (most likely first) at which the cumulative probability reaches `top_p`;
    top-k keeps the k most probable (0 or >= V: all). Ties at either threshold are kept. Unlike
    the official, `top_p >= 1` keeps everything (there a float32 cumulative sum that never
    reaches 1.0 reduces sampling to the single most likely token).
    """
    V = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    descending = jnp.flip(jnp.sort(probs, axis=-1), axis=-1)
    first = jnp.argmax(jnp.cumsum(descending, axis=-1) >= top_p, axis=-1)  # 0 if never reached, as the official
    cutoff = jnp.where(top_p >= 1.0, 0.0, jnp.take_along_axis(descending, first[:, None], axis=-1))
    k = jnp.where((top_k > 0) & (top_k < V), top_k, V)
    kth = jnp.take_along_axis(descending, jnp.broadcast_to(k - 1, first.shape)[:, None], axis=-1)
    return jnp.where((probs >= cutoff) & (probs >= kth), logits, -jnp.inf)


# ----------------------------------------------------------------------------- the decoding loop


class _Knobs(NamedTuple):
    """Sampler values, traced (changing them does not recompile)."""

    temperature: Array
    top_k: Array
    top_p: Array
    presence: Array
    frequency: Array
    decay: Array


class _SamplerArrays(NamedTuple):
    """Everything the sampler reads on device."""

    key: Array
    knobs: _Knobs
    stop_tokens: Array  # [S] int32, -1 where unused
    weights: Array  # [V] float32: occurrence increment per token
    bias: Array  # [V] float32: -inf for banned tokens, else 0


class _Modes(NamedTuple):
    """Which sampler stages run; static (each combination compiles once)."""

    greedy: bool
    filter: bool
    penalty: bool


class _Carry(NamedTuple):
    """The decoding loop's state."""

    t: Array  # scalar int32: steps taken
    tokens: Array  # [B, N] int32: sampled ids, PAD from the step a row stopped
    done: Array  # [B] bool: the row sampled a stop token
    state: State  # the model state after the prompt and the row's emitted tokens
    logits: Array  # [B, V] float32: next-token logits at `state`
    seen: Array  # [B, V] bool: generated at least once (penalties)
    occurrence: Array  # [B, V] float32: decayed counts (penalties)


@dataclasses.dataclass(frozen=True)
class _Sampler:
    arrays: _SamplerArrays
    modes: _Modes

    @classmethod
    def create(cls, V: int, key: Array | None, temperature: float, top_k: int, top_p: float,
               presence: float, frequency: float, decay: float, exempt: Sequence[int],
               stop_tokens: Sequence[int], banned: Sequence[int] = ()) -> _Sampler:
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if int(top_k) != top_k or top_k < 0:
            raise ValueError(f"top_k must be a non-negative int, got {top_k}")
        if not 0 <= top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        greedy = temperature == 0
        if key is None and not greedy:
            raise ValueError("sampling (temperature > 0) needs a PRNG key")
        _check_ids(V, [stop_tokens, exempt, banned], allow_empty=True)
        if len(set(banned)) >= V:
            raise ValueError("every token is banned: nothing could be sampled")
        weights = np.ones(V, np.float32)
        weights[list(exempt)] = 0.0
        bias = np.zeros(V, np.float32)
        bias[list(banned)] = -np.inf
        knobs = _Knobs(*(jnp.asarray(value, dtype) for value, dtype in (
            (temperature, jnp.float32), (top_k, jnp.int32), (top_p, jnp.float32), (presence, jnp.float32),
            (frequency, jnp.float32), (decay, jnp.float32))))
        modes = _Modes(greedy=greedy, filter=not greedy and (0 < top_k < V or top_p < 1),
                       penalty=presence != 0 or frequency != 0)
        # Padded with -1 (never sampled) to a multiple of 8, so changing them rarely recompiles.
        stop = np.full(max(8, -(-len(stop_tokens) // 8) * 8), -1, np.int32)
        stop[:len(stop_tokens)] = list(stop_tokens)
        arrays = _SamplerArrays(key=jax.random.key(0) if key is None else key, knobs=knobs,
                                stop_tokens=jnp.asarray(stop), weights=jnp.asarray(weights), bias=jnp.asarray(bias))
        return cls(arrays=arrays, modes=modes)


def _decode_step(step_fn: StepFn, batch_axes: dict[str, int], carry: _Carry, sampler: _SamplerArrays,
                 modes: _Modes) -> _Carry:
    """Sample one token per row, record it, and feed it to the rows that did not stop."""
    knobs = sampler.knobs
    logits = carry.logits + sampler.bias
    if modes.penalty:
        logits = apply_penalty(logits, carry.seen, carry.occurrence, knobs.presence, knobs.frequency)
    if modes.greedy:
        token = jnp.argmax(logits, axis=-1)
    else:
        if modes.filter:
            logits = filter_logits(logits, knobs.top_k, knobs.top_p)
        token = jax.random.categorical(jax.random.fold_in(sampler.key, carry.t), logits / knobs.temperature, axis=-1)
    token = token.astype(jnp.int32)
    emitted = ~carry.done & ~jnp.any(token[:, None] == sampler.stop_tokens[None, :], axis=-1)
    tokens = carry.tokens.at[:, carry.t].set(jnp.where(emitted, token, PAD))
    # Every row steps (one batched call); rows that did not emit keep their state and logits.
    new_logits, new_state = step_fn(token, carry.state)
    state = jax.tree.map(lambda new, old, axis: jnp.where(_along(emitted, new.ndim, axis), new, old),
                         new_state, carry.state, batch_axes)
    logits = jnp.where(emitted[:, None], new_logits, carry.logits)
    seen, occurrence = carry.seen, carry.occurrence
    if modes.penalty:
        seen, occurrence = update_occurrence(seen, occurrence, token, emitted, knobs.decay, sampler.weights)
    return _Carry(carry.t + 1, tokens, ~emitted, state, logits, seen, occurrence)


def _decode_loop(step_fn: StepFn, batch_axes: dict[str, int], carry: _Carry, sampler: _SamplerArrays,
                 modes: _Modes) -> _Carry:
    """`_decode_step` until `carry.tokens` is full or every row stopped."""
    max_new_tokens = carry.tokens.shape[1]
    return jax.lax.while_loop(
        lambda c: (c.t < max_new_tokens) & ~jnp.all(c.done),
        lambda c: _decode_step(step_fn, batch_axes, c, sampler, modes), carry)


@functools.partial(jax.jit, static_argnames=("cfg", "modes", "loop"))
def _decode_jit(cfg: RWKVConfig, params_for_step: Any, carry: _Carry, sampler: _SamplerArrays, *, modes: _Modes,
                loop: bool) -> _Carry:
    run = _decode_loop if loop else _decode_step
    return run(step_function(cfg, params_for_step), _batch_axes(cfg), carry, sampler, modes)


# ----------------------------------------------------------------------------- the one-token step

# Batch-1 decoding on CPU stores Linear kernels `[out, in]` from this width on (see `step_params`).
OUT_IN_MIN_EMBD = 768
# The top-level parameters of RWKV-4..7 around the layer stack `blocks`.
_TOP_LEVEL = frozenset({"emb", "ln0", "ln_out", "head"})


def _layerwise(cfg: RWKVConfig, params: Params) -> bool:
    return jax.default_backend() == "cpu" and cfg.version >= 4 and set(params) == _TOP_LEVEL | {"blocks"}


def step_params(cfg: RWKVConfig, params: Params, batch_size: int | None = None) -> Any:
    """The parameters in the form `step_function` takes, for decoding `batch_size` rows.

    On CPU, for RWKV-4..7, that is `(top-level params, [one tree per layer])`: `RWKV.step` scans
    over the stacked layer weights, and XLA's CPU backend then copies every layer's matrices out
    of the stack on each token (a dynamic slice feeding a dot is materialised), which made
    decoding ~2x slower than reading each weight once. Split once here (a copy of the layer
    weights for the duration of the call), a step reads each weight in place. At batch size 1
    (`prepare_decoding`'s default) and `n_embd >= OUT_IN_MIN_EMBD`, every Linear's `kernel
    [in, out]` (the bulk of the bytes) is moreover stored transposed, as `kernel_out_in
    [out, in]`: XLA's CPU matrix-vector product streams that layout 7-15% faster there (2-9%
    slower at D256-D512, and ~40% slower in batched products; experiments/RESULTS.md).
    Elsewhere (not measured on GPU/TPU, where the copy would also double the weights' memory)
    and for RWKV-1..3 (position-dependent pieces, copy head) the stacked params go to
    `RWKV.step`.
    """
    if not _layerwise(cfg, params):
        return params
    top = {name: value for name, value in params.items() if name != "blocks"}
    layered = top, _split_layers(params["blocks"], cfg.n_layer)
    return _kernels_out_in(layered) if batch_size == 1 and cfg.n_embd >= OUT_IN_MIN_EMBD else layered


@jax.jit
def _kernels_out_in(tree: Params) -> Params:
    """Every `{"kernel": [in, out]}` Linear of `tree` (bias-free, as in RWKV-4..7) as
    `{"kernel_out_in": [out, in]}`."""
    if isinstance(tree, (list, tuple)):
        return type(tree)(_kernels_out_in(item) for item in tree)
    if not isinstance(tree, dict):
        return tree
    if set(tree) == {"kernel"} and tree["kernel"].ndim == 2:
        return {"kernel_out_in": tree["kernel"].T}
    return {name: _kernels_out_in(value) for name, value in tree.items()}


def _dense_from_out_in_kernel(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    """A flax method interceptor: an `nn.Dense` whose params hold `kernel_out_in` (see
    `step_params`) computes `x @ kernel_out_in.T` as one product over the rows of the stored
    matrix; every other call runs unchanged."""
    module = context.module
    if not (isinstance(module, nn.Dense) and context.method_name == "__call__"
            and "kernel_out_in" in module.variables.get("params", {})):
        return next_fun(*args, **kwargs)
    (x,) = args
    kernel = module.variables["params"]["kernel_out_in"]
    dtype = module.dtype or jnp.result_type(x, kernel)
    return jnp.einsum("...i,oi->...o", x.astype(dtype), kernel.astype(dtype))


@functools.partial(jax.jit, static_argnums=1)
def _split_layers(blocks: Params, n_layer: int) -> list[Params]:
    return [jax.tree.map(lambda stacked: stacked[layer], blocks) for layer in range(n_layer)]


def step_function(cfg: RWKVConfig, params_for_step: Any) -> StepFn:
    """`(token [B], state) -> (logits [B, V] float32, state)`: `RWKV.step` for the parameters of
    `step_params`. For RWKV-4..7 the same modules the model is built from (embedding, ln0, the
    layer `Block`, ln_out, head) run in a Python loop over the layers, so the result is exactly
    `RWKV.step`'s (tests/test_generate.py checks this)."""
    if not isinstance(params_for_step, tuple):
        model = RWKV(cfg)
        return lambda token, state: model.apply({"params": params_for_step}, token, state, method=RWKV.step)
    top, layers = params_for_step

    @nn.intercept_methods(_dense_from_out_in_kernel)  # reads the transposed kernels of batch-1 params
    def step(token: Array, state: State) -> tuple[Array, State]:
        x = embedding_rows(top["emb"]["embedding"], token[:, None]).astype(cfg.compute_dtype)
        x = layer_norm(cfg, "ln0").apply({"params": top["ln0"]}, x)
        v_first = jnp.zeros_like(x) if cfg.version == 7 else jnp.zeros((), x.dtype)
        new_state = {name: [] for name in state}
        for layer, layer_params in enumerate(layers):
            layer_state = {name: value[layer] for name, value in state.items()}
            (x, v_first), layer_state = Block(cfg).apply({"params": layer_params}, (x, v_first),
                                                         (jnp.int32(layer), layer_state), (None, None))
            for name, value in layer_state.items():
                new_state[name].append(value)
        h = layer_norm(cfg, "ln_out").apply({"params": top["ln_out"]}, x)
        logits = linear(cfg, cfg.vocab_size, "head", orthogonal(1.0)).apply({"params": top["head"]}, h)
        return logits[:, 0].astype(jnp.float32), {name: jnp.stack(values) for name, values in new_state.items()}

    return step


@functools.partial(jax.jit, static_argnames="cfg")
def _forward_last(cfg: RWKVConfig, params: Params, tokens: Array, state: State) -> tuple[Array, State]:
    logits, state = RWKV(cfg).apply({"params": params}, tokens, state)
    return logits[:, -1], state


def _check_max_new_tokens(max_new_tokens: int) -> None:
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens}")


def _start(logits: Array, state: State, max_new_tokens: int) -> _Carry:
    _check_max_new_tokens(max_new_tokens)
    B, V = logits.shape
    return _Carry(t=jnp.zeros((), jnp.int32), tokens=jnp.full((B, max_new_tokens), PAD, jnp.int32),
                  done=jnp.zeros(B, jnp.bool_), state=state, logits=logits, seen=jnp.zeros((B, V), jnp.bool_),
                  occurrence=jnp.zeros((B, V), jnp.float32))


def _result(carry: _Carry) -> GenerationResult:
    tokens = np.asarray(carry.tokens)
    # A row's emitted tokens are contiguous: once it stops it only emits PAD.
    return GenerationResult(tokens=[row[row != PAD].tolist() for row in tokens],
                            stopped=np.asarray(carry.done).tolist(), state=carry.state, logits=carry.logits)


# ----------------------------------------------------------------------------- helpers


def _pieces(length: int, chunk: int | None) -> list[int]:
    """`length` as `chunk`s, then the binary digits of the rest, largest first (13 -> 8, 4, 1)."""
    pieces = [chunk] * (length // chunk) if chunk else []
    rest = length - sum(pieces)
    return pieces + [1 << bit for bit in reversed(range(rest.bit_length())) if rest >> bit & 1]


def _config(model_or_cfg: RWKV | RWKVConfig) -> RWKVConfig:
    return model_or_cfg.cfg if isinstance(model_or_cfg, RWKV) else model_or_cfg


@functools.lru_cache(maxsize=None)
def _batch_axes(cfg: RWKVConfig) -> dict[str, int]:
    """Each state entry's batch axis (1 for per-layer entries [L, B, ...], 0 for model-level ones),
    found as the axis where the shapes for batch 1 and batch 2 differ."""
    one, two = (jax.eval_shape(functools.partial(init_state, cfg, batch)) for batch in (1, 2))
    return {name: next(axis for axis, (a, b) in enumerate(zip(one[name].shape, two[name].shape)) if a != b)
            for name in one}


def _along(mask: Array, ndim: int, axis: int) -> Array:
    """`mask [B]` shaped to broadcast along `axis` of an ndim-array."""
    shape = [1] * ndim
    shape[axis] = mask.shape[0]
    return mask.reshape(shape)


def _check_state_shapes(cfg: RWKVConfig, state: State, batch_size: int) -> None:
    expected = jax.eval_shape(functools.partial(init_state, cfg, batch_size))
    if set(state) != set(expected) or any(tuple(state[k].shape) != expected[k].shape for k in expected):
        got = {k: tuple(v.shape) for k, v in state.items()}
        raise ValueError(f"state does not fit the RWKV-{cfg.version} config with batch {batch_size}: "
                         f"expected {({k: v.shape for k, v in expected.items()})}, got {got}")


def _check_v1_room(cfg: RWKVConfig, state: State | None, new_tokens: Sequence[int], what: str) -> None:
    """RWKV-1 is defined only for positions < ctx_len, and the jitted prefill and decoding loop
    cannot raise there (its rows silently become NaN, and greedy decoding then emits token 0):
    refuse up front when row b's next `new_tokens[b]` tokens, from `state["pos"][b]` (0 without
    a state), would pass it. A state of the wrong batch is left to the shape check."""
    if cfg.version != 1:
        return
    pos = np.zeros(len(new_tokens), np.int64) if state is None else state.get("pos")
    if pos is None or isinstance(pos, jax.core.Tracer) or np.shape(pos) != (len(new_tokens),):
        return
    start = np.asarray(pos, np.int64)
    last = start + np.asarray(new_tokens, np.int64) - 1
    if np.any(last >= cfg.ctx_len):
        row = int(np.argmax(last))
        raise ValueError(f"RWKV-1 is defined only for positions < ctx_len={cfg.ctx_len}: {what} would reach position "
                         f"{last[row]} (row {row} starts at position {start[row]}). Start from a fresh state, ask "
                         "for fewer tokens or use a model with a larger ctx_len.")


def _check_ids(vocab_size: int, id_lists: Sequence[Sequence[int]], allow_empty: bool = False) -> None:
    """Out-of-range ids would be gathered as garbage under jit; reject them (and empty prompts)."""
    if not id_lists:
        raise ValueError("no prompts")
    for ids in id_lists:
        if not len(ids):
            if allow_empty:
                continue
            raise ValueError("every prompt needs at least one token (World models: start it with token 0)")
        values = np.asarray(ids)
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"token ids must be a flat list of ints, got {ids!r}"[:200])
        if values.min() < 0 or values.max() >= vocab_size:
            raise ValueError(f"token ids must be in [0, {vocab_size}), got min {values.min()}, max {values.max()}")
