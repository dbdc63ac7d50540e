"""Scoring a model on text: perplexity and bits per byte of a file, LAMBADA last-word accuracy.

    result = perplexity(cfg, params, text=open("book.txt").read(), tokenizer=WorldTokenizer())
    print(result.loss, result.perplexity, result.bits_per_byte)
    print(lambada_accuracy(cfg, params, WorldTokenizer(), "lambada_test.jsonl"))

`perplexity` scores a whole file as one sequence: the recurrent state is carried from chunk to
chunk, so no token loses its context to a window boundary (unlike fixed-window evaluation).
`lambada_accuracy` follows BlinkDL's LAMBADA check (RWKV-LM `rwkv_v7_demo.py`, ChatRWKV
`run_lm_eval.py`): the target is the last word with its leading space, a document counts as
correct when the model's argmax reproduces every target token, and the reported perplexity is
`exp(-mean over documents of the target's total log-likelihood)`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.config import RWKVConfig
from rwkv_jax.model import RWKV
from rwkv_jax.state import State, init_state
from rwkv_jax.tokenizers import Tokenizer, WorldTokenizer

Array = jax.Array
Params = Any


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Attributes:
      loss: mean negative log-likelihood of the scored tokens, nats per token.
      perplexity: exp(loss).
      bits_per_byte: total negative log-likelihood in bits over the UTF-8 bytes of the scored
        tokens (None without a tokenizer, or with one that does not tell its tokens' bytes:
        see `token_byte_lengths`).
      tokens: how many tokens were scored; bytes: their UTF-8 length (None as bits_per_byte).
    """

    loss: float
    perplexity: float
    bits_per_byte: float | None
    tokens: int
    bytes: int | None


@dataclasses.dataclass(frozen=True)
class LambadaResult:
    """Attributes:
      accuracy: fraction of documents whose last word greedy decoding reproduces.
      perplexity: exp(-mean over documents of the last word's log-likelihood), as the official check.
      documents: how many were scored.
    """

    accuracy: float
    perplexity: float
    documents: int


def perplexity(model_or_cfg: RWKV | RWKVConfig, params: Params, tokens: Sequence[int] | np.ndarray | None = None, *,
               text: str | None = None, tokenizer: Tokenizer | None = None, prefix: Sequence[int] | None = None,
               chunk: int = 512, batch_size: int = 1) -> PerplexityResult:
    """Loss, perplexity and bits per byte of `tokens` (or of `text` encoded by `tokenizer`).

    Args:
      tokens: the ids to score, or None to encode `text` with `tokenizer`.
      tokenizer: encodes `text`, and gives each token's byte length for bits per byte.
      prefix: ids fed before `tokens` and not scored. Default: token 0 for a World tokenizer (as
        official World evaluations start), else none, in which case the first token has no
        prediction and is not scored.
      chunk: tokens per jitted call; the state streams across chunks, so it only bounds memory
        (the [batch_size, chunk, V] logits) and never changes the result.
      batch_size: split the sequence into this many contiguous streams scored side by side. 1
        scores the file as one sequence; with more, each stream after the first starts from the
        zero state, so its first tokens lose the context before them (faster, not identical).

    RWKV-1 is defined only for positions < ctx_len: there a stream may feed at most ctx_len tokens
    (the sequence's last token is only a target), else ValueError.
    """
    cfg = model_or_cfg.cfg if isinstance(model_or_cfg, RWKV) else model_or_cfg
    if tokens is None:
        if text is None or tokenizer is None:
            raise ValueError("pass tokens, or text and a tokenizer")
        tokens = tokenizer.encode(text)
    if prefix is None:
        prefix = [0] if isinstance(tokenizer, WorldTokenizer) else []
    if chunk <= 0 or batch_size <= 0:
        raise ValueError(f"chunk and batch_size must be positive, got {chunk}, {batch_size}")
    sequence = np.concatenate([np.asarray(prefix, np.int64), np.asarray(tokens, np.int64)])
    if sequence.size and (sequence.min() < 0 or sequence.max() >= cfg.vocab_size):
        raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
    inputs, targets = sequence[:-1], sequence[1:]
    # Target i is sequence[i + 1]; only the ones after the prefix are scored.
    weights = (np.arange(1, sequence.size) >= len(prefix)).astype(np.float32)
    if not weights.sum():
        raise ValueError("nothing to score: need at least one token after the prefix (two without one)")

    # [batch_size, steps]: stream b is the b-th run of `per_stream` positions, padded at the end
    # with weight-0 zeros to whole chunks.
    per_stream = -(-inputs.size // batch_size)
    steps = -(-per_stream // chunk) * chunk
    if cfg.version == 1:
        # Under jit RWKV-1 returns NaN for a call that would pass position ctx_len - 1 instead of
        # raising, so refuse here; and never pad past it, or the padding would NaN the last chunk.
        if per_stream > cfg.ctx_len:
            raise ValueError(f"RWKV-1 is defined only for positions < ctx_len={cfg.ctx_len}, but scoring "
                             f"{sequence.size} tokens feeds {per_stream} per stream: score a shorter text or use "
                             f"batch_size >= {-(-inputs.size // cfg.ctx_len)}")
        steps = min(steps, cfg.ctx_len)
    streams = [np.zeros((batch_size, steps), dtype) for dtype in (np.int32, np.int32, np.float32)]
    for array, values in zip(streams, (inputs, targets, weights)):
        for row in range(batch_size):
            segment = values[row * per_stream:(row + 1) * per_stream]
            array[row, :segment.size] = segment
    inputs, targets, weights = streams

    state = init_state(cfg, batch_size)
    nll = 0.0
    for start in range(0, steps, chunk):
        piece = slice(start, start + chunk)
        chunk_nll, state = _score_chunk(cfg, params, jnp.asarray(inputs[:, piece]), jnp.asarray(targets[:, piece]),
                                        jnp.asarray(weights[:, piece]), state)
        nll += float(chunk_nll)
    count = int(weights.sum())
    byte_lengths = None if tokenizer is None else token_byte_lengths(tokenizer)
    if byte_lengths is not None and targets.max() >= byte_lengths.size:
        raise ValueError(f"token id {int(targets.max())} is beyond the tokenizer's {byte_lengths.size} tokens")
    n_bytes = None if byte_lengths is None else int(np.sum(byte_lengths[targets] * weights))
    loss = nll / count
    return PerplexityResult(loss=loss, perplexity=math.exp(loss),
                            bits_per_byte=nll / math.log(2) / n_bytes if n_bytes else None,
                            tokens=count, bytes=n_bytes)


def lambada_accuracy(model_or_cfg: RWKV | RWKVConfig, params: Params, tokenizer: Tokenizer,
                     jsonl_path: str | os.PathLike, *, prefix: Sequence[int] | None = None, batch_size: int = 8,
                     limit: int | None = None) -> LambadaResult:
    """Last-word accuracy on a LAMBADA-format file: one `{"text": "..."}` per line.

    The context is the text before its last space, the target the last word with that space.
    `prefix` (default: token 0 for a World tokenizer, as the official check; else none) goes
    before every context. Documents run `batch_size` at a time, each from the zero state;
    `limit` scores only the first documents. RWKV-1: every document must fit in ctx_len, else
    ValueError naming its line.
    """
    cfg = model_or_cfg.cfg if isinstance(model_or_cfg, RWKV) else model_or_cfg
    if prefix is None:
        prefix = [0] if isinstance(tokenizer, WorldTokenizer) else []
    documents = []
    with open(jsonl_path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            text = json.loads(line)["text"]
            if " " not in text:
                raise ValueError(f"{jsonl_path}:{number}: no space, so no last word to predict")
            context, word = text.rsplit(" ", 1)
            documents.append((list(prefix) + list(tokenizer.encode(context)), list(tokenizer.encode(" " + word))))
            fed = len(documents[-1][0]) + len(documents[-1][1]) - 1  # the last target token is not fed
            if cfg.version == 1 and fed > cfg.ctx_len:  # under jit RWKV-1 would give NaN past it, not raise
                raise ValueError(f"{jsonl_path}:{number}: RWKV-1 is defined only for positions < ctx_len="
                                 f"{cfg.ctx_len}, but this document feeds {fed} tokens")
            if limit is not None and len(documents) == limit:
                break
    if not documents:
        raise ValueError(f"{jsonl_path}: no documents")
    if any(not source for source, _ in documents):
        raise ValueError("a document has an empty context and no prefix: nothing predicts its first target token")

    correct, log_likelihood = 0, 0.0
    for first in range(0, len(documents), batch_size):
        batch = documents[first:first + batch_size]
        # Right padding to a multiple of 32 tokens (few compiled shapes) and a full batch: a
        # causal model's outputs at real positions never see the padding after them.
        length = -(-max(len(s) + len(t) for s, t in batch) // 32) * 32
        if cfg.version == 1:  # padding past ctx_len would NaN the whole row
            length = min(length, cfg.ctx_len)
        rows = np.zeros((batch_size, length + 1), np.int32)
        for row, (source, target) in enumerate(batch):
            rows[row, :len(source) + len(target)] = source + target
        log_probs, hits = _next_token_scores(cfg, params, jnp.asarray(rows))
        log_probs, hits = np.asarray(log_probs), np.asarray(hits)
        for row, (source, target) in enumerate(batch):
            positions = slice(len(source) - 1, len(source) - 1 + len(target))  # the logits predicting `target`
            log_likelihood += float(np.sum(log_probs[row, positions], dtype=np.float64))
            correct += bool(np.all(hits[row, positions]))
    return LambadaResult(accuracy=correct / len(documents), perplexity=math.exp(-log_likelihood / len(documents)),
                         documents=len(documents))


def token_byte_lengths(tokenizer: Any) -> np.ndarray | None:
    """`[V]` UTF-8 length of every token (0 for ids without text, like World's 0), from the
    tokenizer's `token_bytes()` (every tokenizer in `rwkv_jax.tokenizers` and `rwkv_jax.train`
    has it) or else its `decode_bytes`; None for a tokenizer with neither.

    Not from `decode([i])`: a token decoded alone can lose a leading space (SentencePiece's "▁")
    or, holding part of a character, become U+FFFD (three bytes for one).
    """
    return _token_byte_lengths(tokenizer)


@functools.lru_cache(maxsize=8)
def _token_byte_lengths(tokenizer: Any) -> np.ndarray | None:
    if hasattr(tokenizer, "token_bytes"):
        return np.asarray(tokenizer.token_bytes(), np.int64)
    if not hasattr(tokenizer, "decode_bytes"):
        return None
    lengths = np.zeros(tokenizer.vocab_size, np.int64)
    for i in range(tokenizer.vocab_size):
        try:
            lengths[i] = len(tokenizer.decode_bytes([i]))
        except ValueError:  # no bytes: World's 0 and unused ids
            lengths[i] = 0
    return lengths


@functools.partial(jax.jit, static_argnames="cfg")
def _score_chunk(cfg: RWKVConfig, params: Params, inputs: Array, targets: Array, weights: Array, state: State
                 ) -> tuple[Array, State]:
    """Summed weighted negative log-likelihood of `targets [B, T]` after `inputs [B, T]`, and the state."""
    logits, state = RWKV(cfg).apply({"params": params}, inputs, state)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights), state


@functools.partial(jax.jit, static_argnames="cfg")
def _next_token_scores(cfg: RWKVConfig, params: Params, rows: Array) -> tuple[Array, Array]:
    """For `rows [B, T+1]` from the zero state: log p(rows[:, t+1]) and whether it is the argmax, `[B, T]`."""
    logits, _ = RWKV(cfg).apply({"params": params}, rows[:, :-1])
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    targets = rows[:, 1:]
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets
