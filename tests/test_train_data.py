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


def test_magic_prime_is_the_official_one():
    # Largest prime p ≡ 2 (mod 3) below num_tokens / ctx_len - 1: 1000/10 - 1 = 99 -> 89 (97 ≡ 1).
    assert data_lib.magic_prime(1000, 10) == 89
    # The official MiniPile demo: 1498226207 tokens at ctx_len 512 -> magic_prime 2926181 (spec §9.9).
    assert data_lib.magic_prime(1498226207, 512) == 2926181


def test_magic_prime_sampler_visits_every_aligned_crop_once_per_pass_and_ignores_the_seed():
    tokens = np.arange(5000, dtype=np.uint16)
    data = data_lib.TokenData(tokens, val_fraction=0.1)           # 4500 train tokens
    ctx_len, batch_size = 16, 4
    p = data_lib.magic_prime(len(data.train), ctx_len)
    assert p == 269                                               # 277, 271 are ≡ 1 (mod 3)
    offsets = np.concatenate([data.train_offsets(0, step, batch_size, ctx_len, "magic_prime")
                              for step in range(-(-p // batch_size))])[:p]
    assert sorted(offsets) == list(range(0, p * ctx_len, ctx_len))   # a permutation of the crops
    assert not np.array_equal(offsets, np.sort(offsets))              # scrambled
    batch = data.train_batch(5, 3, batch_size, ctx_len, "magic_prime")
    assert np.array_equal(batch, data.train_batch(0, 3, batch_size, ctx_len, "magic_prime"))
    assert batch.shape == (batch_size, ctx_len + 1) and batch.max() < len(data.train)
    # Sample n = 1 + step·B + row, offset ((f·n³) mod p)·ctx_len with f = int(p·(√5−1)/2).
    f = int(p * (5**0.5 - 1) / 2)
    assert batch[2, 0] == (f * (1 + 3 * batch_size + 2) ** 3 % p) * ctx_len


def test_world_tokens_go_through_the_same_memmapped_pipeline(tmp_path):
    text = "Hello world, packed documents.\nZweite Zeile: ünïcödé 你好\n" * 20
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    world = data_lib.make_tokenizer("world", tmp_path / "t.txt", tmp_path / "cache", 0)
    assert world.vocab_size == 65536
    npy = data_lib.prepare_tokens(str(tmp_path / "t.txt"), world, tmp_path / "cache")
    assert "world" in npy.name
    tokens = np.load(npy, mmap_mode="r")
    assert tokens.dtype == np.uint16 and len(tokens) < len(text.encode("utf-8")) / 2
    assert world.decode(tokens) == text
    assert int(world.token_bytes()[np.asarray(tokens)].sum()) == len(text.encode("utf-8"))
    assert world.token_bytes()[0] == 0                           # end-of-document has no bytes
