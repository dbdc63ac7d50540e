"""`rwkv-jax generate`, `rwkv-jax chat` and `rwkv-jax ppl`: use a checkpoint from the command line.

    rwkv-jax generate --checkpoint model.pth --prompt "The Eiffel tower is in" --max-new-tokens 50
    printf 'Hello\\n/reset\\nWho are you?\\n' | rwkv-jax chat --checkpoint model.pth --temperature 0
    rwkv-jax ppl --checkpoint model.pth --text book.txt          # loss, perplexity, bits per byte
    rwkv-jax ppl --checkpoint model.pth --lambada lambada_test.jsonl

Every command loads its model through `load_model` (official `.pth`, Hugging Face, fla, our orbax
directory, or a `rwkv-jax train` run directory) and picks the tokenizer with `load_tokenizer`.
Text is streamed as it is produced: `TextDecoder` turns token ids into text without ever
printing half a UTF-8 character.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

import jax

from rwkv_jax.config import RWKVConfig
from rwkv_jax.generation import iter_generate, official_penalty_exempt, prepare_decoding
from rwkv_jax.state import State
from rwkv_jax.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer, WorldTokenizer

WORLD_VOCAB_SIZE = 65536
END_OF_DOCUMENT = 0  # World models: prompts start with it, and sampling it ends a document
PREFILL_CHUNK = 256  # as the official PIPELINE's chunk_len


@dataclasses.dataclass
class LoadedModel:
    """What `load_model` returns: the model, its tokenizer if the checkpoint names one, and the
    initial state of a state-tuned file (None: zeros)."""

    cfg: RWKVConfig
    params: Any
    tokenizer: Tokenizer | None = None
    state: State | None = None


def load_model(path: str | Path) -> LoadedModel:
    """Load any checkpoint the commands accept: a `rwkv-jax train` run directory (its latest
    checkpoint and its tokenizer), or anything `rwkv_jax.io.convert.load_checkpoint` reads."""
    path = Path(path)
    if (path / "ckpt").is_dir():
        from rwkv_jax.train.loop import load_checkpoint as load_run

        train_state, meta = load_run(path)
        spec = meta["tokenizer"]
        tokenizer = ByteTokenizer() if spec == "byte" else SentencePieceTokenizer(path / spec)
        return LoadedModel(RWKVConfig(**meta["model_config"]), train_state["params"], tokenizer)
    from rwkv_jax.io.convert import load_checkpoint_with_state

    cfg, params, state = load_checkpoint_with_state(path)
    return LoadedModel(cfg, params, state=state)


def load_tokenizer(spec: str | None, model: LoadedModel) -> Tokenizer:
    """`spec`: "world", "byte", or a path (`.json`: Hugging Face `tokenizers`, `.model`:
    SentencePiece, `.txt`: a World-format vocabulary). None: the checkpoint's own tokenizer, else
    World for a 65536-token vocabulary and bytes for a 256-token one."""
    if spec is None:
        if model.tokenizer is not None:
            return model.tokenizer
        spec = {WORLD_VOCAB_SIZE: "world", 256: "byte"}.get(model.cfg.vocab_size)
        if spec is None:
            raise ValueError(f"cannot guess the tokenizer of a {model.cfg.vocab_size}-token vocabulary: "
                             "pass --tokenizer world|byte|PATH")
    if spec == "world":
        tokenizer: Tokenizer = WorldTokenizer()
    elif spec == "byte":
        tokenizer = ByteTokenizer()
    elif spec.endswith(".json"):
        tokenizer = HFTokenizer(spec)
    elif spec.endswith(".model"):
        tokenizer = SentencePieceTokenizer(spec)
    elif spec.endswith(".txt"):
        tokenizer = WorldTokenizer(spec)
    else:
        raise ValueError(f"--tokenizer must be world, byte, or a .json/.model/.txt file, got {spec!r}")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.cfg.vocab_size}")
    return tokenizer


def is_world(tokenizer: Tokenizer) -> bool:
    return isinstance(tokenizer, WorldTokenizer)


class TextDecoder:
    """Token ids in, text out, never half a character.

    Tokenizers that expose each token's bytes (World, bytes) go through an incremental UTF-8
    decoder: bytes of an unfinished character wait for the next token, and bytes that can never
    be valid become U+FFFD, exactly as a one-shot `decode(..., errors="replace")` of everything.
    Other tokenizers (SentencePiece, Hugging Face) are decoded whole each time and the new tail
    is emitted once it does not end in U+FFFD (an unfinished character), since their pieces
    decode differently alone than in context (leading spaces).

    An id without text (World's unused 65530..65535, which a 65536-wide head can still sample, or
    one beyond the tokenizer's vocabulary) reads as U+FFFD and the text goes on, as the official
    PIPELINE decodes it; a character it cuts short becomes U+FFFD too.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if hasattr(tokenizer, "decode_bytes") else None
        self._ids: list[int] = []
        self._emitted = ""

    def add(self, token: int) -> str:
        """The text that `token` completes (possibly "")."""
        if self._utf8 is not None:
            try:
                data = self._tokenizer.decode_bytes([token])
            except ValueError:  # an id without bytes
                return self._without_text()
            return self._utf8.decode(data)
        if not 0 <= token < self._tokenizer.vocab_size:
            return self._without_text()
        self._ids.append(token)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd") or not text.startswith(self._emitted):
            return ""
        new, self._emitted = text[len(self._emitted):], text
        return new

    def finish(self) -> str:
        """Whatever is still held back (an unfinished character becomes U+FFFD)."""
        if self._utf8 is not None:
            return self._utf8.decode(b"", final=True)
        text = self._tokenizer.decode(self._ids)
        new = text[len(self._emitted):] if text.startswith(self._emitted) else ""
        self._emitted = text
        return new

    def _without_text(self) -> str:
        """Finish what came before a token without text, then U+FFFD for it; start afresh after it."""
        text = self.finish()
        self._ids, self._emitted = [], ""
        return text + "\ufffd"


class StopText:
    """Cut streamed text at the first of some stop strings, holding back only what could still
    become one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._held = ""
        self.stopped = False

    def add(self, text: str) -> str:
        """The part of `text` safe to print now."""
        self._held += text
        hits = [i for i in (self._held.find(stop) for stop in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._held = self._held[:min(hits)], ""
            return out
        keep = max((n for stop in self._stops for n in range(1, len(stop)) if self._held.endswith(stop[:n])),
                   default=0)
        out = self._held[:len(self._held) - keep]
        self._held = self._held[len(out):]
        return out

    def finish(self) -> str:
        out, self._held = self._held, ""
        return out


def unescape(text: str) -> str:
    """`\\n`, `\\t` and `\\\\` typed on a command line as the characters they stand for."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


# ----------------------------------------------------------------------------- generate


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="official .pth, Hugging Face or fla directory, rwkv-jax orbax directory, or a "
                             "`rwkv-jax train` run directory")
    parser.add_argument("--tokenizer", default=None,
                        help="world, byte, or a .json (Hugging Face), .model (SentencePiece) or .txt (World "
                             "vocabulary) file; default: the run directory's, else world for 65536 tokens, "
                             "byte for 256")


def _add_sampling_arguments(parser: argparse.ArgumentParser, *, temperature: float, top_p: float,
                            presence: float, frequency: float) -> None:
    parser.add_argument("--temperature", type=float, default=temperature, help="0 is greedy (default %(default)s)")
    parser.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling (default %(default)s)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0: all")
    parser.add_argument("--presence", type=float, default=presence,
                        help="presence penalty, as the official alpha_presence (default %(default)s)")
    parser.add_argument("--frequency", type=float, default=frequency,
                        help="frequency penalty, as the official alpha_frequency (default %(default)s)")
    parser.add_argument("--penalty-decay", type=float, default=0.996,
                        help="the penalty counts decay by this per token (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    parser.add_argument("--no-eod-prefix", action="store_true",
                        help="World models: do not start the context with token 0 (end of document), which "
                             "the official usage prepends and without which converted models lose quality")


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `rwkv-jax generate`."""
    parser.description = ("Continue a prompt, printing the text as it is sampled. Defaults are the official "
                          "PIPELINE_ARGS. World models: token 0 (end of document) is put before the prompt, "
                          "as the official usage does (--no-eod-prefix to skip), and sampling it ends the text.")
    _add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the text to continue (\\n and \\t are understood)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="at most this many tokens (default %(default)s)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end when the text contains TEXT (not printed); repeatable; \\n and \\t are understood")
    _add_sampling_arguments(parser, temperature=1.0, top_p=0.85, presence=0.2, frequency=0.2)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, presence_penalty=args.presence,
                frequency_penalty=args.frequency, penalty_decay=args.penalty_decay,
                key=jax.random.key(args.seed))


def _context_start(tokenizer: Tokenizer, args: argparse.Namespace) -> list[int]:
    return [] if args.no_eod_prefix or not is_world(tokenizer) else [END_OF_DOCUMENT]


def run_generate(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Stream the continuation of `args.prompt` to `out` (stdout), flushed per token."""
    out = out or sys.stdout
    model = load_model(args.checkpoint)
    tokenizer = load_tokenizer(args.tokenizer, model)
    prompt = _context_start(tokenizer, args) + tokenizer.encode(unescape(args.prompt))
    if not prompt:
        raise ValueError("the prompt is empty")
    stream = iter_generate(model.cfg, model.params, prompt, max_new_tokens=args.max_new_tokens, state=model.state,
                           # The official PIPELINE counts spaces and digits 0 times for the frequency penalty.
                           penalty_exempt=official_penalty_exempt(tokenizer) if args.frequency else (),
                           stop_tokens=[END_OF_DOCUMENT] if is_world(tokenizer) else (),
                           prefill_chunk=PREFILL_CHUNK, **_sampling(args))
    decoder, stopper = TextDecoder(tokenizer), StopText([unescape(stop) for stop in args.stop])
    for token in stream:
        _write(out, stopper.add(decoder.add(token)))
        if stopper.stopped:
            break
    if not stopper.stopped:
        _write(out, stopper.add(decoder.finish()) + stopper.finish())
    _write(out, "\n")
    return 0


def _write(out: TextIO, text: str) -> None:
    if text:
        out.write(text)
        out.flush()


# ----------------------------------------------------------------------------- chat


class ChatSession:
    """The official chat loop (ChatRWKV `API_DEMO_CHAT.py`): each message is fed as
    `"User: {message}\\n\\nAssistant:"` on top of the state the conversation left, and the reply
    is sampled until its text contains "\\n\\n" (that token is fed too, so the next turn starts
    after it). Nothing is ever fed twice. World models: the conversation starts with token 0,
    and token 0 is never sampled (the demo's `out[0] -= 1e10`)."""

    def __init__(self, model: LoadedModel, tokenizer: Tokenizer, *, max_reply_tokens: int = 1000,
                 eod_prefix: bool = True, **sampling: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.params = prepare_decoding(model.cfg, model.params)  # laid out once for every turn
        self.max_reply_tokens, self.sampling = max_reply_tokens, sampling
        self.eod_prefix = eod_prefix and is_world(tokenizer)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation: back to the checkpoint's initial state."""
        self.state = self.model.state
        self.fed: list[int] = []  # every token the state has seen since the last reset
        self.turns = 0

    def reply(self, message: str, out: TextIO | None = None) -> tuple[str, list[int]]:
        """Answer `message` (streaming the text to `out` if given); returns the reply's text (up to
        "\\n\\n") and its tokens."""
        message = re.sub(r"\n+", "\n", message.strip())
        tokens = self.tokenizer.encode(f"User: {message}\n\nAssistant:")
        if not self.fed and self.eod_prefix:
            tokens = [END_OF_DOCUMENT] + tokens
        banned = [END_OF_DOCUMENT] if is_world(self.tokenizer) else ()
        sampling = dict(self.sampling)
        if sampling.get("key") is not None:  # a fresh random stream per turn
            sampling["key"] = jax.random.fold_in(sampling["key"], self.turns)
        self.turns += 1
        stream = iter_generate(self.model.cfg, self.params, tokens, max_new_tokens=self.max_reply_tokens,
                               state=self.state, banned_tokens=banned, prefill_chunk=PREFILL_CHUNK, **sampling)
        decoder, stopper = TextDecoder(self.tokenizer), StopText(["\n\n"])
        reply = ""
        for token in stream:
            piece = stopper.add(decoder.add(token))
            reply += piece
            if out is not None:
                _write(out, piece)
            if stopper.stopped:
                break
        else:
            piece = stopper.add(decoder.finish()) + stopper.finish()
            reply += piece
            if out is not None:
                _write(out, piece)
        result = stream.result
        self.state = result.state
        self.fed += tokens + result.tokens[0]
        return reply, result.tokens[0]


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `rwkv-jax chat`."""
    parser.description = ("Chat in the official 'User: ...\\n\\nAssistant:' format, one message per line of "
                          "stdin; the RNN state carries the conversation (nothing is re-fed). /reset starts "
                          "over. Defaults are those of the official API_DEMO_CHAT.py.")
    _add_model_arguments(parser)
    parser.add_argument("--max-reply-tokens", type=int, default=1000,
                        help="end a reply after this many tokens if it has not ended (default %(default)s)")
    _add_sampling_arguments(parser, temperature=1.0, top_p=0.3, presence=0.5, frequency=0.5)


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """Read messages from `stdin` until it ends; print each reply as "Assistant: ..." to `out`."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    model = load_model(args.checkpoint)
    sampling = _sampling(args)
    session = ChatSession(model, load_tokenizer(args.tokenizer, model), max_reply_tokens=args.max_reply_tokens,
                          eod_prefix=not args.no_eod_prefix, **sampling)
    interactive = stdin.isatty()
    while True:
        if interactive:
            _write(out, "User: ")
        line = stdin.readline()
        if not line:
            return 0
        if line.strip() == "/reset":
            session.reset()
            _write(out, "(conversation reset)\n")
            continue
        if not line.strip():
            continue
        _write(out, "Assistant:")
        session.reply(line, out)
        _write(out, "\n\n")


# ----------------------------------------------------------------------------- ppl


def add_ppl_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `rwkv-jax ppl`."""
    parser.description = ("Score a checkpoint: loss, perplexity and bits per byte of a text file (the whole file "
                          "as one sequence, the state streaming across chunks), and/or last-word accuracy on a "
                          "LAMBADA-format jsonl. World models: the text starts after token 0, as officially.")
    _add_model_arguments(parser)
    parser.add_argument("--text", help="a UTF-8 text file")
    parser.add_argument("--lambada", metavar="JSONL", help='one {"text": ...} per line; the last word is predicted')
    parser.add_argument("--chunk", type=int, default=512, help="tokens per call for --text (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="--text: contiguous streams scored side by side (1: exact; more: faster, each stream "
                             "after the first starts without context); --lambada: documents per call (default 8)")
    parser.add_argument("--no-eod-prefix", action="store_true", help="World models: do not start with token 0")


def run_ppl(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print the scores `add_ppl_arguments` asks for."""
    from rwkv_jax.evaluation import lambada_accuracy, perplexity

    out = out or sys.stdout
    if not args.text and not args.lambada:
        args.parser.error("give --text FILE and/or --lambada FILE")
    model = load_model(args.checkpoint)
    tokenizer = load_tokenizer(args.tokenizer, model)
    prefix = [] if args.no_eod_prefix else None
    if args.text:
        text = Path(args.text).read_text(encoding="utf-8")
        result = perplexity(model.cfg, model.params, text=text, tokenizer=tokenizer, prefix=prefix, chunk=args.chunk,
                            batch_size=args.batch_size)
        out.write(f"{args.text}: loss {result.loss:.4f} nats/token | perplexity {result.perplexity:.3f} | "
                  f"{result.bits_per_byte:.4f} bits/byte | {result.tokens} tokens, {result.bytes} bytes\n")
    if args.lambada:
        result = lambada_accuracy(model.cfg, model.params, tokenizer, args.lambada, prefix=prefix,
                                  batch_size=args.batch_size if args.batch_size > 1 else 8)
        out.write(f"{args.lambada}: accuracy {100 * result.accuracy:.2f}% | perplexity {result.perplexity:.3f} | "
                  f"{result.documents} documents\n")
    return 0
