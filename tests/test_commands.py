"""`rwkv-jax generate` and `rwkv-jax chat` (rwkv_jax.commands), on a tiny byte-level model saved as an official .pth."""

from __future__ import annotations

import argparse
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkv_jax as rj
from rwkv_jax import commands
from rwkv_jax.generation import generate, official_penalty_exempt, prefill
from rwkv_jax.tokenizers import ByteTokenizer, WorldTokenizer

N_NEW = 10


@functools.cache
def tiny_byte_model(tmp_dir: str) -> tuple[str, rj.RWKVConfig, dict]:
    """A v7 model over bytes (official init plus noise), written with save_pth and read back."""
    cfg = rj.RWKVConfig(version=7, n_layer=2, n_embd=64, head_size=32, vocab_size=256)
    params = jax.jit(rj.RWKV(cfg).init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda p: jnp.asarray(p + (0.3 * np.std(p) + 0.05) * rng.randn(*p.shape), p.dtype), params)
    path = f"{tmp_dir}/tiny.pth"
    rj.save_pth(path, cfg, params)
    return (path, *rj.load_pth(path))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_byte_model(str(tmp_path_factory.mktemp("commands")))


def parse(add_arguments, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


class Recorder(io.StringIO):
    """A stdout that remembers each flushed piece."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[str] = []
        self._flushed = 0

    def flush(self) -> None:
        text = self.getvalue()
        if len(text) > self._flushed:
            self.pieces.append(text[self._flushed:])
            self._flushed = len(text)


def test_generate_streams_what_rj_generate_returns(model):
    path, cfg, params = model
    out = Recorder()
    commands.run_generate(parse(commands.add_generate_arguments, [
        "--checkpoint", path, "--prompt", "Hi\\n", "--temperature", "0", "--max-new-tokens", str(N_NEW)]), out)
    tokenizer = ByteTokenizer()
    expected = generate(cfg, params, [tokenizer.encode("Hi\n")], max_new_tokens=N_NEW, temperature=0,
                        presence_penalty=0.2, frequency_penalty=0.2,  # the CLI's defaults, as the official
                        penalty_exempt=official_penalty_exempt(tokenizer))
    text = tokenizer.decode(expected.tokens[0])
    assert out.getvalue() == text + "\n"
    assert len(out.pieces) > 2  # streamed, not printed at the end

    # --stop cuts the text before the first occurrence of the stop string.
    stop = text[4:6]
    out = Recorder()
    commands.run_generate(parse(commands.add_generate_arguments, [
        "--checkpoint", path, "--prompt", "Hi\\n", "--temperature", "0", "--max-new-tokens", str(N_NEW),
        "--stop", stop]), out)
    assert out.getvalue() == text[:text.index(stop)] + "\n"


def test_text_decoder_never_prints_half_a_character():
    text = "aé世🙂b"
    tokenizer = WorldTokenizer()
    ids = [byte + 1 for byte in text.encode("utf-8")]  # World ids 1..256 are the single bytes
    decoder = commands.TextDecoder(tokenizer)
    pieces = [decoder.add(i) for i in ids] + [decoder.finish()]
    assert pieces == ["a", "", "é", "", "", "世", "", "", "", "🙂", "b", ""]

    # Bytes that can never be valid become U+FFFD, as a one-shot decode with errors="replace".
    broken = "a".encode() + "世".encode()[:2] + b"b\xff" + "🙂".encode()[:3]
    decoder = commands.TextDecoder(tokenizer)
    streamed = "".join(decoder.add(byte + 1) for byte in broken) + decoder.finish()
    assert streamed == broken.decode("utf-8", errors="replace") == "a\ufffdb\ufffd\ufffd"


def test_text_decoder_without_token_bytes_waits_for_whole_characters():
    class TextOnly:  # like SentencePiece / HF: decode(ids) only
        vocab_size = 256

        def decode(self, ids):
            return ByteTokenizer().decode(ids)

    decoder = commands.TextDecoder(TextOnly())
    pieces = [decoder.add(byte) for byte in "é🙂x".encode("utf-8")] + [decoder.finish()]
    assert pieces == ["", "é", "", "", "", "🙂", "x", ""]


def test_text_decoder_reads_ids_without_text_as_replacement_characters_and_goes_on():
    # A World model's head is 65536 wide but ids 65530..65535 have no bytes; the official PIPELINE
    # decodes one to U+FFFD. A character it cuts short becomes U+FFFD too.
    tokenizer = WorldTokenizer()
    decoder = commands.TextDecoder(tokenizer)
    first_byte_of_zhong = "中".encode()[0] + 1
    pieces = [decoder.add(i) for i in tokenizer.encode("Hi") + [65533, first_byte_of_zhong, 65535]
              + tokenizer.encode("ok")] + [decoder.finish()]
    assert pieces == ["Hi", "\ufffd", "", "\ufffd\ufffd", "ok", ""]

    class TextOnly:  # decode(ids) only, with fewer tokens than the model's head
        vocab_size = 256

        def decode(self, ids):
            return ByteTokenizer().decode(ids)

    decoder = commands.TextDecoder(TextOnly())
    pieces = [decoder.add(i) for i in [ord("a"), 300, ord("b")]] + [decoder.finish()]
    assert "".join(pieces) == "a\ufffdb"


def test_stop_text_holds_back_only_possible_stop_prefixes():
    stopper = commands.StopText(["\n\n", "END"])
    assert [stopper.add(piece) for piece in ["ab\n", "c", "E", "N", "x\n"]] == ["ab", "\nc", "", "", "ENx"]
    assert stopper.add("\nrest") == "" and stopper.stopped  # "\n" + "\n" completed the stop


def test_chat_turns_equal_feeding_the_whole_conversation_at_once(model):
    _, cfg, params = model
    tokenizer = ByteTokenizer()
    session = commands.ChatSession(commands.LoadedModel(cfg, params), tokenizer, max_reply_tokens=N_NEW,
                                   temperature=0)
    first_text, first = session.reply("Hello there")
    second_text, second = session.reply("And then?")
    assert first_text == tokenizer.decode(first).split("\n\n")[0]

    turn = lambda message: tokenizer.encode(f"User: {message}\n\nAssistant:")  # noqa: E731
    history = turn("Hello there") + first + turn("And then?")
    expected = generate(cfg, params, [history], max_new_tokens=N_NEW, temperature=0)
    assert second == expected.tokens[0][:len(second)]
    assert session.fed == history + second
    _, whole_state = prefill(cfg, params, [history + second])
    for name in whole_state:
        np.testing.assert_allclose(session.state[name], whole_state[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_chat_reply_ends_at_a_blank_line_which_is_still_fed(model):
    _, cfg, params = model
    # A model that always says "\n": no layer contributes, ln_out is the constant 1, and only
    # the head's column for "\n" is non-zero.
    params = jax.tree.map(lambda p: p, params)
    params["ln_out"] = {"scale": jnp.zeros_like(params["ln_out"]["scale"]), "bias": jnp.ones_like(params["ln_out"]["bias"])}
    params["head"] = {"kernel": jnp.zeros_like(params["head"]["kernel"]).at[:, ord("\n")].set(1.0)}
    session = commands.ChatSession(commands.LoadedModel(cfg, params), ByteTokenizer(), max_reply_tokens=N_NEW,
                                   temperature=0)
    assert session.reply("Hi") == ("", [10, 10])
    assert session.fed[-3:] == [ord(":"), 10, 10]


def test_chat_reads_stdin_and_reset_forgets_the_conversation(model):
    path, _, _ = model
    args = parse(commands.add_chat_arguments, ["--checkpoint", path, "--temperature", "0", "--max-reply-tokens", "8"])

    def replies(stdin: str) -> list[str]:
        out = io.StringIO()
        commands.run_chat(args, io.StringIO(stdin), out)
        return [part.split("\n\n")[0] for part in out.getvalue().split("Assistant:")[1:]]

    hello, bye_after_hello, bye_after_reset = replies("Hello\nBye\n\n/reset\nBye\n")  # blank lines are skipped
    assert bye_after_reset == replies("Bye\n")[0]
    assert bye_after_hello != bye_after_reset  # the second turn saw the first


def test_ppl_prints_what_the_evaluation_functions_return(model, tmp_path):
    from rwkv_jax.evaluation import lambada_accuracy, perplexity

    path, cfg, params = model
    text, lambada = tmp_path / "text.txt", tmp_path / "lambada.jsonl"
    text.write_text("Some text to score, with ünïcode.\n")
    lambada.write_text('{"text": "one two three"}\n{"text": "four five"}\n')
    out = io.StringIO()
    commands.run_ppl(parse(commands.add_ppl_arguments, ["--checkpoint", path, "--text", str(text),
                                                        "--lambada", str(lambada)]), out)
    scored = perplexity(cfg, params, text=text.read_text(), tokenizer=ByteTokenizer())
    last_words = lambada_accuracy(cfg, params, ByteTokenizer(), lambada)
    assert out.getvalue() == (
        f"{text}: loss {scored.loss:.4f} nats/token | perplexity {scored.perplexity:.3f} | "
        f"{scored.bits_per_byte:.4f} bits/byte | {scored.tokens} tokens, {scored.bytes} bytes\n"
        f"{lambada}: accuracy {100 * last_words.accuracy:.2f}% | perplexity {last_words.perplexity:.3f} | 2 documents\n")
