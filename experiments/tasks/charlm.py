"""Byte-level language modelling on the built-in Shakespeare corpus.

Tokens are UTF-8 bytes (V = 256, one token per byte, so nats per token / ln 2 is bits per byte).
The last `val_fraction` of the corpus is held out. Training draws random crops; validation
tiles the held-out bytes with consecutive windows, which may be longer than the training
context to measure the loss at positions the model never trained on.
"""

from __future__ import annotations

import functools

import numpy as np

from rwkv_jax.train.data import builtin_corpus_path

VOCAB_SIZE = 256


@functools.lru_cache(maxsize=None)
def corpus_bytes() -> np.ndarray:
    """The built-in corpus as `[n]` int32 byte values."""
    return np.frombuffer(builtin_corpus_path().read_bytes(), np.uint8).astype(np.int32)


def split(val_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """`(train, val)` byte arrays: the val split is the corpus's tail."""
    data = corpus_bytes()
    cut = int(len(data) * (1.0 - val_fraction))
    return data[:cut], data[cut:]


def train_batch(num_examples: int, seq_len: int, seed: int, val_fraction: float = 0.05
                ) -> tuple[np.ndarray, np.ndarray]:
    """`(inputs [B, T], labels [B, T])` int32: random crops of the training split; labels are the
    next bytes (`labels[:, t] = inputs[:, t + 1]` within the crop)."""
    train, _ = split(val_fraction)
    starts = np.random.default_rng(seed).integers(0, len(train) - seq_len - 1, size=num_examples)
    crops = np.stack([train[s:s + seq_len + 1] for s in starts])
    return crops[:, :-1], crops[:, 1:]


def val_windows(num_examples: int, seq_len: int, val_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """`(inputs [B, T], labels [B, T])`: the first B consecutive, non-overlapping windows of the
    validation split (fewer if it is too short)."""
    _, val = split(val_fraction)
    count = min(num_examples, (len(val) - 1) // seq_len)
    if count < 1:
        raise ValueError(f"the validation split ({len(val)} bytes) is shorter than one window of {seq_len + 1}")
    inputs = np.stack([val[i * seq_len:(i + 1) * seq_len] for i in range(count)])
    labels = np.stack([val[i * seq_len + 1:(i + 1) * seq_len + 1] for i in range(count)])
    return inputs, labels
