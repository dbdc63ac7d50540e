"""Training data: the shipped corpus, tokenization to .npy, deterministic crops, the split,
evaluation windows and sentencepiece."""

from __future__ import annotations

import numpy as np
import pytest

from rwkv_jax.train import data as data_lib


def test_builtin_corpus_is_shipped_clean_and_about_a_megabyte():
    path = data_lib.builtin_corpus_path()
    raw = path.read_bytes()
    assert 0.9e6 < len(raw) <= 1.2e6
    text = raw.decode("utf-8")
    assert "\r" not in text and "\n\n\n" not in text
    assert "HAMLET" in text and "MACBETH" in text and "gutenberg" not in text.lower()


def test_byte_tokens_round_trip_through_npy_in_small_chunks(tmp_path, monkeypatch):
    text = "To be, or not to be: that is the question.\nWhether 'tis nobler — ünïcödé\n" * 50
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(data_lib, "CHUNK", 100)     # many chunks, cut at newlines
    out = data_lib.tokenize_file(tmp_path / "t.txt", tmp_path / "t.npy", data_lib.ByteTokenizer())
    tokens = np.load(out, mmap_mode="r")
    assert tokens.dtype == np.uint16 and len(tokens) == len(text.encode("utf-8"))
    assert data_lib.ByteTokenizer().decode(tokens) == text
    assert not list(tmp_path.glob("*.tmp"))


def test_prepare_tokens_tokenizes_once_and_reuses_the_cache(tmp_path):
    (tmp_path / "t.txt").write_text("abc\n" * 100)
    first = data_lib.prepare_tokens(str(tmp_path / "t.txt"), data_lib.ByteTokenizer(), tmp_path / "cache")
    stamp = first.stat().st_mtime_ns
    again = data_lib.prepare_tokens(str(tmp_path / "t.txt"), data_lib.ByteTokenizer(), tmp_path / "cache")
    assert again == first and again.stat().st_mtime_ns == stamp
    assert data_lib.prepare_tokens(str(first), data_lib.ByteTokenizer(), tmp_path / "other") == first


def test_crops_depend_only_on_seed_and_step_and_stay_in_the_train_split():
    tokens = np.arange(10_000, dtype=np.uint16)
    data = data_lib.TokenData(tokens, val_fraction=0.1)
    assert data.split == 9000 and np.array_equal(data.val, tokens[9000:])
    a = data.train_batch(seed=3, step=7, batch_size=16, ctx_len=32)
    assert a.shape == (16, 33) and a.dtype == np.int32
    assert np.array_equal(a, data_lib.TokenData(tokens, 0.1).train_batch(3, 7, 16, 32))
    assert not np.array_equal(a, data.train_batch(3, 8, 16, 32))
    assert not np.array_equal(a, data.train_batch(4, 7, 16, 32))
    assert np.all(np.diff(a, axis=1) == 1)                       # consecutive tokens
    many = np.concatenate([data.train_batch(0, s, 16, 32) for s in range(200)])
    assert many.max() < 9000                                     # never reads validation tokens


def test_eval_batches_score_every_token_after_the_first_once():
    tokens = np.arange(1000)
    batches = data_lib.eval_batches(tokens, ctx_len=32, batch_size=8, max_batches=None)
    targets = np.concatenate([rows[weight > 0, 1:].ravel() for rows, weight in batches])
    assert np.array_equal(targets, np.arange(1, 1 + len(targets)))
    assert len(targets) == (1000 - 1) // 32 * 32
    assert batches[-1][1].min() == 0.0                           # padded rows carry weight 0
    assert len(data_lib.eval_batches(tokens, 32, 8, max_batches=2)) == 2


def test_sentencepiece_trains_on_the_corpus_and_round_trips(tmp_path):
    text = data_lib.builtin_corpus_path().read_text(encoding="utf-8")[:200_000]
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    sp = data_lib.make_tokenizer("sentencepiece", tmp_path / "corpus.txt", tmp_path / "cache", 512)
    assert sp.vocab_size == 512
    sample = "Now is the winter of our discontent,\nMade glorious summer — by this sun of York.\n"
    ids = sp.encode(sample)
    assert sp.decode(ids) == sample
    assert len(ids) < len(sample.encode("utf-8")) * 0.7          # it compresses
    assert int(sp.token_bytes()[ids].sum()) == len(sample.encode("utf-8"))   # exact bytes for bits/byte
    again = data_lib.make_tokenizer("sentencepiece", tmp_path / "corpus.txt", tmp_path / "cache", 512)
    assert again.model_file == sp.model_file                      # trained once, then loaded
    npy = data_lib.prepare_tokens(str(tmp_path / "corpus.txt"), sp, tmp_path / "cache")
    assert np.load(npy).dtype == np.uint16


def test_unknown_tokenizer_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="tokenizer must be"):
        data_lib.make_tokenizer("gpt2", tmp_path / "x.txt", tmp_path, 100)
