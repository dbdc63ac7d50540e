"""Perplexity / bits per byte and LAMBADA accuracy against a plain token-by-token loop over `RWKV.step`."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkv_jax as rj
from rwkv_jax.evaluation import lambada_accuracy, perplexity
from rwkv_jax.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, train_sentencepiece

TEXT = "Hello, world! ünï 世界 " * 2  # 48 bytes: three chunks of 16 tokens


@functools.cache
def tiny() -> tuple[rj.RWKVConfig, dict]:
    cfg = rj.RWKVConfig(version=7, n_layer=2, n_embd=64, head_size=32, vocab_size=256)
    params = jax.jit(rj.RWKV(cfg).init)(jax.random.key(1), jnp.zeros((1, 1), jnp.int32))["params"]
    rng = np.random.RandomState(1)
    return cfg, jax.tree.map(lambda p: jnp.asarray(p + (0.3 * np.std(p) + 0.05) * rng.randn(*p.shape), p.dtype),
                             params)


@functools.cache
def step():
    cfg, params = tiny()
    return jax.jit(lambda token, state: rj.RWKV(cfg).apply({"params": params}, token, state, method=rj.RWKV.step))


def log_probs_by_steps(tokens: list[int]) -> np.ndarray:
    """float64 log p(tokens[i+1] | tokens[:i+1]) from the zero state, one `RWKV.step` per token."""
    cfg, _ = tiny()
    state, out = rj.init_state(cfg, 1), []
    for current, following in zip(tokens[:-1], tokens[1:]):
        logits, state = step()(jnp.asarray([current], jnp.int32), state)
        logits = np.asarray(logits[0], np.float64)
        out.append(logits[following] - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max())
    return np.asarray(out)


def test_perplexity_scores_the_file_as_one_sequence_across_chunks():
    cfg, params = tiny()
    tokens = ByteTokenizer().encode(TEXT)
    result = perplexity(cfg, params, text=TEXT, tokenizer=ByteTokenizer(), chunk=16)
    expected = -np.mean(log_probs_by_steps(tokens))  # no prefix: the first byte is not scored
    assert result.tokens == len(tokens) - 1 and result.bytes == len(tokens) - 1
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(expected / math.log(2), rel=1e-5)  # one byte per token


def test_perplexity_with_a_prefix_and_parallel_streams():
    cfg, params = tiny()
    tokens = ByteTokenizer().encode(TEXT)
    # A prefix is fed, not scored: every text token is.
    with_prefix = perplexity(cfg, params, tokens, prefix=[0], chunk=16)
    assert with_prefix.tokens == len(tokens) and with_prefix.bits_per_byte is None
    assert with_prefix.loss == pytest.approx(-np.mean(log_probs_by_steps([0] + tokens)), rel=1e-5)
    # Two streams: the second starts from the zero state at the middle of the inputs.
    split = perplexity(cfg, params, tokens, chunk=16, batch_size=2)
    half = -(-(len(tokens) - 1) // 2)
    expected = np.concatenate([log_probs_by_steps(tokens[:half + 1]), log_probs_by_steps(tokens[half:])])
    assert split.tokens == len(tokens) - 1
    assert split.loss == pytest.approx(-np.mean(expected), rel=1e-5)


CORPUS = "The quick brown fox jumps over the lazy dog, then naps in the sun.\n" * 40
TEXTS = {"ascii": "The dog naps; the fox jumps over it twice.\n  Then  the sun sets.",
         "accents and emoji": "The café’s naïve fox 🦊 jumps over 世界 🙂👍🏽, then naps."}


@functools.cache
def subword_tokenizer(kind: str, directory: str):
    """Tiny tokenizers that cut characters outside their corpus into bytes: SentencePiece as
    `rwkv-jax train` trains it (lossless), the same with SentencePiece's default dummy prefix
    (a "▁" before the text, dropped again by decode), or a byte-level BPE like GPT-NeoX's."""
    corpus = f"{directory}/corpus.txt"
    with open(corpus, "w", encoding="utf-8") as f:
        f.write(CORPUS)
    if kind.startswith("sentencepiece"):
        return SentencePieceTokenizer(train_sentencepiece(
            [corpus], 300, f"{directory}/sp", model_type="bpe", byte_fallback=True, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=kind.endswith("dummy prefix"), minloglevel=2))
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    hf.train_from_iterator([CORPUS], tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                                    initial_alphabet=alphabet))
    hf.save(f"{directory}/hf.json")
    return HFTokenizer(f"{directory}/hf.json")


@pytest.mark.parametrize("kind,name", [("sentencepiece", "accents and emoji"),
                                       ("sentencepiece, dummy prefix", "ascii"),
                                       ("sentencepiece, dummy prefix", "accents and emoji"),
                                       ("hf", "accents and emoji")])
def test_bits_per_byte_counts_every_byte_of_the_text_with_subword_tokenizers(kind, name, tmp_path_factory):
    tokenizer = subword_tokenizer(kind, str(tmp_path_factory.mktemp("tokenizer")))
    cfg = rj.RWKVConfig(version=7, n_layer=1, n_embd=32, head_size=16, vocab_size=tokenizer.vocab_size)
    params = jax.jit(rj.RWKV(cfg).init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    text = TEXTS[name]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    # Without a prefix the first token only starts the sequence: every byte after its text is scored.
    scored = perplexity(cfg, params, text=text, tokenizer=tokenizer, chunk=32)
    assert scored.tokens == len(ids) - 1
    assert scored.bytes == len(text.encode("utf-8")) - len(tokenizer.decode(ids[:1]).encode("utf-8"))
    assert scored.bits_per_byte == pytest.approx(scored.loss * scored.tokens / math.log(2) / scored.bytes, rel=1e-6)
    # With one every token is: the whole text (and the dummy prefix's space, a byte the model predicts).
    whole = perplexity(cfg, params, text=text, tokenizer=tokenizer, prefix=[ids[0]], chunk=32)
    assert whole.bytes == len(text.encode("utf-8")) + kind.endswith("dummy prefix")


class CharTokenizer:
    """Each character is the id the test chooses."""

    def __init__(self, ids: dict[str, int]) -> None:
        self.ids, self.vocab_size = ids, 256

    def encode(self, text: str) -> list[int]:
        return [self.ids[c] for c in text]


def test_lambada_accuracy_and_perplexity_follow_the_official_check(tmp_path):
    cfg, params = tiny()
    context = [5, 6, 7]
    greedy = rj.generate(cfg, params, [context], max_new_tokens=3, temperature=0).tokens[0]
    # Spell the model's own greedy continuation as " qr": that document must count as correct.
    tokenizer = CharTokenizer({"x": 5, "y": 6, "z": 7, " ": greedy[0], "q": greedy[1], "r": greedy[2], "w": 9})
    texts = ["xyz qr", "xyz rq", "zyx wq", "x y xy"]
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))

    result = lambada_accuracy(cfg, params, tokenizer, path, batch_size=3)  # a full batch and a padded one
    log_likelihoods, correct = [], 0
    for text in texts:
        source, target = tokenizer.encode(text.rsplit(" ", 1)[0]), tokenizer.encode(" " + text.rsplit(" ", 1)[1])
        log_probs = log_probs_by_steps(source + target)[len(source) - 1:]
        log_likelihoods.append(np.sum(log_probs))
        # Correct when every target token is the argmax: its log-probability is the largest one.
        correct += all(rj.generate(cfg, params, [source + target[:i]], max_new_tokens=1, temperature=0).tokens[0]
                       == [target[i]] for i in range(len(target)))
    assert correct >= 1 and result.documents == len(texts)
    assert result.accuracy == correct / len(texts)
    assert result.perplexity == pytest.approx(math.exp(-np.mean(log_likelihoods)), rel=1e-5)
