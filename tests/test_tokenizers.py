"""Tokenizers: World byte-exact against the official `rwkv` package, and the thin wrappers."""

from __future__ import annotations

import functools
import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rwkv_jax.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, WorldTokenizer, train_sentencepiece
from rwkv_jax.tokenizers import world

official_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer")
OFFICIAL_VOCAB = os.path.join(os.path.dirname(official_tokenizer.__file__), "rwkv_vocab_v20230424.txt")
SETTINGS = settings(max_examples=200, deadline=None)

CORPORA = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45 p.m.; isn't it?\n" * 3,
    "chinese": "人工智能是计算机科学的一个分支，它企图了解智能的实质。\n我们今天去北京大学吃饭吧！",
    "code": "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif (a && b) { c[i] = 0x1F; }\n",
    "emoji": "🙂🚀👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️ 🫠",
    "control": "".join(map(chr, range(32))) + "\x7f\x85\u2028\u2029\ufeff\U0010ffff",
    "whitespace": " " * 300 + "\n" * 200 + "\r\n" * 50 + "\t" * 40 + "　" * 10,
    "nul": "\x00" * 5 + "a\x00b",
    "mixed scripts": "Привет мир. مرحبا بالعالم. नमस्ते दुनिया. こんにちは世界. 안녕하세요. e\u0301 Å",
}


@functools.cache
def ours() -> WorldTokenizer:
    return WorldTokenizer()


@functools.cache
def official() -> official_tokenizer.TRIE_TOKENIZER:
    return official_tokenizer.TRIE_TOKENIZER(OFFICIAL_VOCAB)


def test_shipped_vocab_is_the_official_file():
    def digest(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    shipped = os.path.join(os.path.dirname(world.__file__), world.VOCAB_FILE)
    assert digest(shipped) == digest(OFFICIAL_VOCAB)
    assert ours().vocab_size == 65536 and ours().eod_id == 0


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_world_encode_matches_official_and_round_trips(name):
    text = CORPORA[name]
    ids = ours().encode(text)
    assert ids == official().encode(text)
    assert ours().decode(ids) == text


@SETTINGS
@given(st.text() | st.text(st.sampled_from(" \n\r\t0a.中🙂\x00"), max_size=400))
def test_world_encode_matches_official_on_any_text(text):
    ids = ours().encode(text)
    assert ids == official().encode(text)
    assert ours().decode(ids) == text


@SETTINGS
@given(st.binary(max_size=200))
def test_world_encode_bytes_matches_official_on_any_bytes(data):
    assert ours().encode_bytes(data) == official().encodeBytes(data)


@SETTINGS
@given(st.lists(st.integers(1, 65529), max_size=20))
def test_world_decode_matches_official_including_invalid_utf8(ids):
    assert ours().decode_bytes(ids) == official().decodeBytes(ids)
    assert ours().decode(ids) == official().decode(ids)


def test_world_decode_of_cut_characters_and_ids_without_bytes_is_one_replacement_char_like_official():
    first_byte_of_zhong = ours().encode_bytes("中".encode()[:1])
    for ids in (first_byte_of_zhong, [0], ours().encode("ok") + [65530], [65535], [-1]):
        assert ours().decode(ids) == official().decode(ids) == "\ufffd"
    with pytest.raises(ValueError, match="no bytes"):
        ours().decode_bytes([0])


def test_world_encode_rejects_lone_surrogates_like_official():
    for tokenizer in (ours(), official()):
        with pytest.raises(UnicodeEncodeError):
            tokenizer.encode("a\ud800b")


def write_vocab(path, tokens):
    lines = [f"{i} {token!r} {len(token if isinstance(token, bytes) else token.encode())}"
             for i, token in enumerate(tokens, 1)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


SINGLE_BYTES = [bytes([b]) for b in range(256)]


@SETTINGS
@given(st.text(st.sampled_from("abcdx"), max_size=60))
def test_custom_vocab_greedy_longest_match_backtracks_like_official(tmp_path_factory, text):
    # "abcd" and "ab" are tokens but "abc" is not: "abcx" must backtrack to "ab", "c", "x".
    path = tmp_path_factory.getbasetemp() / "tricky_vocab.txt"
    if not path.exists():
        write_vocab(path, SINGLE_BYTES + ["ab", "abcd", "bcd", "bc", "dabcd", "xx", "xxx" * 3])
    assert WorldTokenizer(path).encode(text) == official_tokenizer.TRIE_TOKENIZER(str(path)).encode(text)


def test_custom_vocab_is_parsed_without_eval(tmp_path):
    path = write_vocab(tmp_path / "evil.txt", SINGLE_BYTES)
    with open(path, "a", encoding="utf-8") as f:
        f.write("257 __import__('os').system('exit 1') 2\n")
    with pytest.raises(ValueError, match="line 257"):
        WorldTokenizer(path)


def test_custom_vocab_without_every_single_byte_is_refused(tmp_path):
    with pytest.raises(ValueError, match="single-byte"):
        WorldTokenizer(write_vocab(tmp_path / "partial.txt", SINGLE_BYTES[1:] + ["ab"]))


def test_byte_tokenizer_round_trips_and_replaces_bad_bytes():
    tokenizer = ByteTokenizer()
    text = "héllo 中 🙂\x00"
    assert tokenizer.encode(text) == list(text.encode()) and tokenizer.vocab_size == 256
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode([104, 0xE4, 105]) == "h\ufffdi"
    with pytest.raises(ValueError):
        tokenizer.decode([256])


def test_sentencepiece_wrapper_trains_encodes_and_decodes(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the cat {i} sat on the mat number {i * 7}" for i in range(300)), encoding="utf-8")
    model_file = train_sentencepiece([corpus], 60, tmp_path / "sp", model_type="bpe", minloglevel=2)
    tokenizer = SentencePieceTokenizer(model_file)
    ids = tokenizer.encode("the cat sat on the mat 42")
    assert tokenizer.vocab_size == 60 and all(0 <= i < 60 for i in ids)
    assert tokenizer.decode(ids) == "the cat sat on the mat 42"


def tiny_byte_level_bpe(path):
    """A tiny byte-level BPE in the format of the GPT-NeoX 20B file (the real one is not shipped),
    with its special tokens and, as that file, added whitespace tokens; returns the `tokenizers` object."""
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([CORPORA["english"], CORPORA["code"], CORPORA["chinese"]], trainer)
    hf.add_tokens(["  ", "\t\t"])
    hf.save(str(path))
    return hf


def test_hf_tokenizer_matches_the_official_pipeline(tmp_path):
    official_utils = pytest.importorskip("rwkv.utils")
    path = tmp_path / "tiny_tokenizer.json"
    hf = tiny_byte_level_bpe(path)

    tokenizer, pipeline = HFTokenizer(path), official_utils.PIPELINE(None, str(path))
    assert tokenizer.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    for text in CORPORA.values():
        ids = tokenizer.encode(text)
        assert ids == pipeline.encode(text)
        assert tokenizer.decode(ids) == pipeline.decode(ids)
    assert tokenizer.decode(tokenizer.encode(CORPORA["english"])) == CORPORA["english"]


# ------------------------------------------------------------------- token_bytes, for bits per byte


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_world_and_byte_token_bytes_add_up_to_the_text(name):
    text = CORPORA[name]
    for tokenizer in (ours(), ByteTokenizer()):
        assert int(tokenizer.token_bytes()[tokenizer.encode(text)].sum()) == len(text.encode("utf-8"))
    assert ours().token_bytes()[0] == 0 and not ours().token_bytes()[65530:].any()  # no bytes


def test_sentencepiece_token_bytes_count_spaces_and_byte_pieces_and_nothing_for_control_pieces(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPORA["english"] * 20 + CORPORA["code"] * 20, encoding="utf-8")
    # Lossless (as `rwkv-jax train`'s): what the tokens stand for is exactly the text.
    tokenizer = SentencePieceTokenizer(train_sentencepiece(
        [corpus], 400, tmp_path / "sp", model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False, minloglevel=2))
    sizes, pieces = tokenizer.token_bytes(), [tokenizer._sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    assert sizes[pieces.index("<unk>")] == sizes[pieces.index("<s>")] == 0 and sizes[pieces.index("<0xF0>")] == 1
    for text in (CORPORA["english"], " leading  spaces\n", CORPORA["emoji"], CORPORA["mixed scripts"]):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert int(sizes[ids].sum()) == len(text.encode("utf-8")), text


def test_hf_token_bytes_count_the_byte_level_alphabet_and_nothing_for_special_tokens(tmp_path):
    hf = tiny_byte_level_bpe(tmp_path / "tiny_tokenizer.json")
    tokenizer = HFTokenizer(tmp_path / "tiny_tokenizer.json")
    sizes = tokenizer.token_bytes()
    assert sizes[hf.token_to_id("<|endoftext|>")] == 0 and sizes[hf.token_to_id("  ")] == 2
    for name in ("english", "emoji", "mixed scripts", "whitespace", "code"):  # emoji: pieces of characters
        ids = tokenizer.encode(CORPORA[name])
        assert int(sizes[ids].sum()) == len(CORPORA[name].encode("utf-8")), name


def test_hf_token_bytes_of_a_sentencepiece_style_vocabulary_count_the_space_marker(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    sp_style = tokenizers.SentencePieceBPETokenizer()  # Metaspace: "▁" for spaces, one before the text
    sp_style.train_from_iterator([CORPORA["english"]], vocab_size=100)
    sp_style.save(str(tmp_path / "sp_style.json"))
    tokenizer = HFTokenizer(tmp_path / "sp_style.json")
    text = "the lazy dog jumps over the fox"
    assert int(tokenizer.token_bytes()[tokenizer.encode(text)].sum()) == len(text) + 1


def test_hf_token_bytes_refuse_decoders_whose_bytes_depend_on_the_neighbours(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    word_piece = tokenizers.BertWordPieceTokenizer()  # "##" joins a piece to the previous one
    word_piece.train_from_iterator([CORPORA["english"]], vocab_size=100)
    word_piece.save(str(tmp_path / "word_piece.json"))
    with pytest.raises(ValueError, match=r"decoder\(s\) \['WordPiece'\]"):
        HFTokenizer(tmp_path / "word_piece.json").token_bytes()
