"""Training on packed documents (`TrainConfig.doc_sep`): the token after each end-of-document
token restarts the recurrent state, so the training loss of a packed crop is the loss of its
documents run one by one from `init_state`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rwkv_jax as rj
from helpers import random_params
from rwkv_jax.train import TrainConfig, train
from rwkv_jax.train.config import ConfigError
from rwkv_jax.train.loop import document_starts, loss_fn

SEP = 0


def test_document_starts_follow_each_separator():
    inputs = jnp.asarray([[SEP, 5, 6, SEP, SEP, 7], [4, 5, 6, 7, 8, SEP]])
    expected = [[False, True, False, False, True, True], [False] * 6]
    assert document_starts(inputs, SEP).tolist() == expected


@pytest.mark.parametrize("version", [3, 4, 7])
def test_packed_loss_equals_the_loss_of_the_documents_run_separately(version):
    extra = {"head_qk": 16, "ctx_len": 8} if version == 3 else {"chunk_size": 4}   # v3 with its copy head
    cfg = rj.RWKVConfig(version=version, n_layer=2, n_embd=32, vocab_size=20, head_size=16, **extra)
    params = random_params(cfg)
    # One row of three documents (each ends with SEP), the next document cut off by the crop.
    row = np.asarray([3, 4, 5, SEP, 6, 7, SEP, 8, 9, 10, 11, SEP, 12, 13], np.int32)
    batch = jnp.asarray(np.stack([row, row[::-1].copy()]))
    packed = float(jax.jit(lambda p, b: loss_fn(rj.RWKV(cfg), p, b, 0.0, SEP))(params, batch))
    plain = float(jax.jit(lambda p, b: loss_fn(rj.RWKV(cfg), p, b, 0.0))(params, batch))

    nll = []
    for tokens in np.asarray(batch):
        inputs, targets = tokens[:-1], tokens[1:]
        bounds = [0, *(np.flatnonzero(inputs == SEP) + 1), len(inputs)]
        for start, end in zip(bounds[:-1], bounds[1:]):
            logits, _ = rj.RWKV(cfg).apply({"params": params}, jnp.asarray(inputs[None, start:end]))
            nll.append(optax.softmax_cross_entropy_with_integer_labels(logits[0], jnp.asarray(targets[start:end])))
    separate = float(jnp.mean(jnp.concatenate(nll)))
    assert abs(packed - separate) < 1e-5 * separate      # largest seen: 7e-8 relative (v3)
    assert abs(plain - separate) > 1e-3                   # without resets the documents see each other


def test_training_with_doc_sep_runs_and_lowers_the_loss(tmp_path):
    # Byte data; a newline ends a "document" here (every line of the corpus is packed).
    cfg = TrainConfig.from_args(["preset=tiny", "version=6", "steps=12", f"out={tmp_path}", "doc_sep=10",
                                 "eval_every=12", "save_every=12", "log_every=4", "ctx_len=32"])
    losses = train(cfg)["losses"]
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < losses[0]


def test_doc_sep_is_refused_for_rwkv1():
    with pytest.raises(ConfigError, match="RWKV-1"):
        TrainConfig.from_args(["preset=tiny", "version=1", "doc_sep=0"])
