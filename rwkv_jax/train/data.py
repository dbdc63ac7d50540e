"""Text -> token arrays on disk -> deterministic random crops.

- Tokenizers: `ByteTokenizer` (token = byte value, V = 256), `WorldTokens` (the RWKV World
  vocabulary, V = 65536) and `SentencePieceTokenizer` (load a `.model`, or train one on the
  corpus with `train_sentencepiece`).
- `tokenize_file` writes the tokens of a UTF-8 text file to a `.npy` (uint16 when V <= 65536,
  else uint32), streaming so the text never has to fit in memory; `TokenData` memory-maps it.
  `TokenData.load` takes only a 1-D integer array of ids in [0, V) (`check_token_ids`): anything
  else would index the embedding out of range, which JAX does not report.
- `TokenData.train_batch(seed, step, B, T)` draws B random crops of T+1 tokens from the training
  split with `np.random.default_rng([seed, step])`: a batch depends only on (seed, step), so a
  resumed run sees exactly the batches an uninterrupted one would. `sampler="magic_prime"` takes
  the official binidx order instead (`magic_prime_offsets`), a function of the step alone.
- The validation split is the last `val_fraction` of the tokens; `eval_batches` tiles it (or any
  token array) with consecutive windows.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from rwkv_jax.tokenizers import sentencepiece_token_bytes
from rwkv_jax.train.config import BUILTIN_CORPUS, ConfigError

CHUNK = 1 << 24   # bytes of text or of tokens handled at once


def builtin_corpus_path() -> Path:
    """The shipped Shakespeare corpus (see rwkv_jax/data/README.md)."""
    return Path(str(resources.files("rwkv_jax.data") / "shakespeare.txt"))


def resolve_data_path(data: str) -> Path:
    """`"shakespeare"` -> the built-in corpus; anything else is the path of an existing file."""
    path = builtin_corpus_path() if data == BUILTIN_CORPUS else Path(data)
    if not path.is_file():
        raise ConfigError(f"data file {str(path)!r} does not exist (data= takes a UTF-8 text file, a token .npy, "
                          f"or {BUILTIN_CORPUS!r})")
    return path


class Tokenizer(Protocol):
    """What training needs of a tokenizer: ids in [0, vocab_size) and each token's byte length."""

    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, tokens: np.ndarray) -> str: ...

    def token_bytes(self) -> np.ndarray:
        """`[V]` UTF-8 length of each token's text, for bits-per-byte."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: V = 256, every token is one byte."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64)

    def decode(self, tokens: np.ndarray) -> str:
        return bytes(np.asarray(tokens, np.uint8)).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(256, np.int64)


class WorldTokens:
    """The RWKV World tokenizer (`rwkv_jax.tokenizers.WorldTokenizer`, V = 65536) with the numpy
    interface training uses. Id 0 is end-of-document and has no bytes."""

    def __init__(self):
        from rwkv_jax.tokenizers import WorldTokenizer

        self.world = WorldTokenizer()
        self.vocab_size = self.world.vocab_size

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.world.encode(text), np.int64)

    def decode(self, tokens: np.ndarray) -> str:
        return self.world.decode_bytes([int(t) for t in tokens if t != self.world.eod_id]).decode("utf-8", "replace")

    def token_bytes(self) -> np.ndarray:
        return self.world.token_bytes()


class SentencePieceTokenizer:
    """A sentencepiece model (`.model` file)."""

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        self.model_file = str(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        self.vocab_size = int(self.sp.get_piece_size())

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text), np.int64)

    def decode(self, tokens: np.ndarray) -> str:
        return self.sp.decode([int(t) for t in tokens])

    def token_bytes(self) -> np.ndarray:
        return sentencepiece_token_bytes(self.sp)


def train_sentencepiece(text_path: str | os.PathLike, model_prefix: str | os.PathLike, vocab_size: int,
                        max_sentences: int = 200_000) -> SentencePieceTokenizer:
    """Train a BPE sentencepiece model on a text file.

    Byte fallback, so every text encodes; identity normalisation and no dummy prefix, so
    `decode(encode(a) + encode(b)) == a + b`: encoding a file chunk by chunk loses nothing.
    """
    import sentencepiece as spm

    tmp_prefix = f"{model_prefix}.{os.getpid()}"    # renamed when complete, as in tokenize_file
    spm.SentencePieceTrainer.train(
        input=str(text_path), model_prefix=tmp_prefix, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, input_sentence_size=max_sentences,
        shuffle_input_sentence=True, split_digits=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", add_dummy_prefix=False, minloglevel=2)
    os.replace(f"{tmp_prefix}.vocab", f"{model_prefix}.vocab")
    os.replace(f"{tmp_prefix}.model", f"{model_prefix}.model")
    return SentencePieceTokenizer(f"{model_prefix}.model")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _decode_utf8(data: bytes, path: Path, offset: int) -> str:
    """`data`, which starts at byte `offset` of `path`, as text; ConfigError where it is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text: invalid byte 0x{data[error.start]:02x} at byte offset "
                          f"{offset + error.start} ({error.reason})") from None


def _read_text_chunks(path: Path) -> Iterator[str]:
    """The UTF-8 file in pieces of about `CHUNK` bytes, cut after a newline so that no token
    straddles two pieces (and no character: a newline byte is never inside a UTF-8 sequence).
    Line endings are kept as they are. A byte that is not UTF-8 raises ConfigError with its offset."""
    with open(path, "rb") as f:
        carry, offset = b"", 0          # offset: where `carry` starts in the file
        while chunk := f.read(CHUNK):
            chunk = carry + chunk
            cut = chunk.rfind(b"\n") + 1
            if cut == 0:
                carry = chunk
                continue
            yield _decode_utf8(chunk[:cut], path, offset)
            carry, offset = chunk[cut:], offset + cut
        if carry:
            yield _decode_utf8(carry, path, offset)


def read_text(path: str | os.PathLike) -> str:
    """A whole UTF-8 text file; ConfigError naming the offset of the first byte that is not UTF-8."""
    return "".join(_read_text_chunks(Path(path)))


def tokenize_file(text_path: str | os.PathLike, out_path: str | os.PathLike, tokenizer: Tokenizer) -> Path:
    """Tokenize a UTF-8 text file into a 1-D `.npy` of token ids; returns `out_path`.

    Written to a temporary file and renamed, so an interrupted run (or a file that turns out not
    to be UTF-8, a ConfigError) never leaves a truncated array that a later run would take for
    finished (and processes of a multi-host run, which all tokenize, never write the same file at
    once).
    """
    text_path, out_path = Path(text_path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    with tempfile.TemporaryFile(dir=out_path.parent) as raw:
        count = 0
        for chunk in _read_text_chunks(text_path):
            tokens = tokenizer.encode(chunk)
            raw.write(tokens.astype(dtype).tobytes())
            count += len(tokens)
        raw.seek(0)
        tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.tmp")
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(count,))
        step = CHUNK // dtype.itemsize
        for start in range(0, count, step):
            n = min(step, count - start)
            array[start:start + n] = np.frombuffer(raw.read(n * dtype.itemsize), dtype)
        array.flush()
        del array
    os.replace(tmp, out_path)
    return out_path


def file_digest(path: str | os.PathLike) -> str:
    """Short SHA-256 of a file's contents (names the token cache, so edits re-tokenize)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def check_token_ids(tokens: np.ndarray, vocab_size: int, source: str) -> None:
    """ConfigError unless `tokens` is a 1-D array of integer ids in [0, vocab_size). A memory-mapped
    array is scanned `CHUNK` bytes at a time, so a large data set is never loaded whole."""
    if tokens.ndim != 1:
        raise ConfigError(f"{source}: token data must be a 1-D array of ids, got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ConfigError(f"{source}: token ids must be integers, got dtype {tokens.dtype}")
    if len(tokens) == 0:
        return
    step = max(CHUNK // tokens.dtype.itemsize, 1)
    low, high = None, None
    for start in range(0, len(tokens), step):
        piece = np.asarray(tokens[start:start + step])
        piece_low, piece_high = int(piece.min()), int(piece.max())
        low = piece_low if low is None else min(low, piece_low)
        high = piece_high if high is None else max(high, piece_high)
    if low < 0 or high >= vocab_size:
        raise ConfigError(f"{source}: token ids must be in [0, {vocab_size}) for a tokenizer of {vocab_size} tokens, "
                          f"but they range from {low} to {high}")


class TokenData:
    """A memory-mapped token array with a train/validation split at `1 - val_fraction`."""

    def __init__(self, tokens: np.ndarray, val_fraction: float):
        self.tokens = tokens
        self.val_fraction = val_fraction
        n_val = int(round(len(tokens) * val_fraction))
        self.split = len(tokens) - n_val
        if self.split < 2 or n_val < 2:
            raise ConfigError(f"{len(tokens)} tokens are too few for a train/validation split at {val_fraction}")

    @classmethod
    def load(cls, npy_path: str | os.PathLike, val_fraction: float, vocab_size: int) -> TokenData:
        """The tokens of a `.npy`, memory-mapped, after `check_token_ids` against `vocab_size`."""
        try:
            tokens = np.load(npy_path, mmap_mode="r")
        except ValueError as error:    # not an .npy, or an object array (needs pickle)
            raise ConfigError(f"{npy_path}: not a token .npy file ({error})") from None
        check_token_ids(tokens, vocab_size, str(npy_path))
        return cls(tokens, val_fraction)

    def check_windows(self, ctx_len: int, sampler: str = "random") -> None:
        """ConfigError unless the training split holds crops of `ctx_len + 1` tokens for `sampler`
        and the validation split at least one window: checked before a run builds its model."""
        self.train_offsets(0, 0, 1, ctx_len, sampler)
        if len(self.val) < ctx_len + 1:
            raise ConfigError(f"the validation split (the last val_fraction={self.val_fraction} of the data, "
                              f"{len(self.val)} tokens) is shorter than one window of ctx_len+1={ctx_len + 1} "
                              "tokens: raise val_fraction, lower ctx_len or use more data")

    @property
    def train(self) -> np.ndarray:
        return self.tokens[:self.split]

    @property
    def val(self) -> np.ndarray:
        return self.tokens[self.split:]

    def train_offsets(self, seed: int, step: int, batch_size: int, ctx_len: int, sampler: str = "random"
                      ) -> np.ndarray:
        """Start offsets `[B]` of step `step`'s crops: a pure function of (seed, step), or of the
        step alone for `sampler="magic_prime"` (see `magic_prime_offsets`)."""
        high = len(self.train) - ctx_len - 1
        if high < 1:
            raise ConfigError(f"the training split ({len(self.train)} tokens) is too short for random crops of "
                              f"ctx_len+1={ctx_len + 1} tokens (it needs at least {ctx_len + 2})")
        if sampler == "magic_prime":
            return magic_prime_offsets(len(self.train), step, batch_size, ctx_len)
        return np.random.default_rng([seed, step]).integers(0, high, size=batch_size, endpoint=True)

    def train_batch(self, seed: int, step: int, batch_size: int, ctx_len: int, sampler: str = "random"
                    ) -> np.ndarray:
        """`[B, ctx_len + 1]` int32 crops of the training split for step `step`."""
        return self.crops(self.train, self.train_offsets(seed, step, batch_size, ctx_len, sampler), ctx_len)

    @staticmethod
    def crops(tokens: np.ndarray, offsets: np.ndarray, ctx_len: int) -> np.ndarray:
        return np.stack([np.asarray(tokens[o:o + ctx_len + 1]) for o in offsets]).astype(np.int32)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def magic_prime(num_tokens: int, ctx_len: int) -> int:
    """The official `magic_prime` of a data set: the largest prime p ≡ 2 (mod 3) below
    num_tokens / ctx_len - 1 (spec §10)."""
    p = math.ceil(num_tokens / ctx_len - 1) - 1
    while p >= 2 and not (p % 3 == 2 and _is_prime(p)):
        p -= 1
    if p < 2:
        raise ConfigError(f"{num_tokens} tokens hold too few crops of ctx_len={ctx_len} for the magic-prime sampler")
    return p


def magic_prime_offsets(num_tokens: int, step: int, batch_size: int, ctx_len: int) -> np.ndarray:
    """Start offsets `[B]` of step `step` in the official binidx order (RWKV-v5 `src/dataset.py`):
    global sample n = 1 + step·B + row goes to `((f·n³) mod p)·ctx_len` with p = `magic_prime`
    and f = int(p·(√5−1)/2).

    p ≡ 2 (mod 3) makes n ↦ n³ a bijection mod p and f is coprime to p, so every p consecutive
    samples visit each of the p crops at offsets 0, ctx_len, …, (p−1)·ctx_len exactly once, in a
    scrambled order; a crop of ctx_len + 1 tokens starting there always fits.
    """
    p = magic_prime(num_tokens, ctx_len)
    factor = int(p * (math.sqrt(5) - 1) / 2)
    n = 1 + step * batch_size + np.arange(batch_size, dtype=object)  # Python ints: n³ overflows int64
    return np.asarray([(factor * int(i) ** 3) % p * ctx_len for i in n], np.int64)


def eval_batches(tokens: np.ndarray, ctx_len: int, batch_size: int, max_batches: int | None
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Consecutive windows of `ctx_len + 1` tokens (overlapping by one, so every token but the
    first is scored once), batched; the last batch is padded with weight-0 rows."""
    starts = np.arange(0, max(len(tokens) - ctx_len, 0), ctx_len)
    if len(starts) == 0:
        raise ConfigError(f"{len(tokens)} tokens are fewer than one window of ctx_len+1={ctx_len + 1}")
    n_batches = math.ceil(len(starts) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    batches = []
    for i in range(n_batches):
        chunk = starts[i * batch_size:(i + 1) * batch_size]
        rows = TokenData.crops(tokens, chunk, ctx_len)
        weight = np.zeros(batch_size, np.float32)
        weight[:len(chunk)] = 1.0
        batches.append((np.pad(rows, ((0, batch_size - len(chunk)), (0, 0))), weight))
    return batches


def make_tokenizer(spec: str, text_path: Path, cache_dir: Path, vocab_size: int) -> Tokenizer:
    """`"byte"`, `"world"`, a `.model` path, or `"sentencepiece"` (train one on `text_path`, cached in
    `cache_dir`)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "world":
        return WorldTokens()
    if spec == "sentencepiece":
        prefix = cache_dir / f"sp{vocab_size}-{file_digest(text_path)}"
        if Path(f"{prefix}.model").exists():
            return SentencePieceTokenizer(f"{prefix}.model")
        for _ in _read_text_chunks(text_path):   # a clear error before sentencepiece reads it
            pass
        cache_dir.mkdir(parents=True, exist_ok=True)
        return train_sentencepiece(text_path, prefix, vocab_size)
    if spec.endswith(".model"):
        if not Path(spec).is_file():
            raise ConfigError(f"tokenizer={spec!r}: no such sentencepiece model file")
        return SentencePieceTokenizer(spec)
    raise ConfigError(f"tokenizer must be 'byte', 'world', 'sentencepiece' or a sentencepiece .model path, got {spec!r}")


def tokenizer_tag(tokenizer: Tokenizer) -> str:
    """A short name that changes whenever the token ids would (names the token cache)."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        return "sp-" + file_digest(tokenizer.model_file)
    return "world" if isinstance(tokenizer, WorldTokens) else "byte"


def prepare_tokens(data: str, tokenizer: Tokenizer, cache_dir: Path) -> Path:
    """A token `.npy` for `data`: used as is if it is one, else tokenized once into `cache_dir`."""
    path = resolve_data_path(data)
    if path.suffix == ".npy":
        return path
    out = cache_dir / f"{path.stem}-{file_digest(path)}-{tokenizer_tag(tokenizer)}.npy"
    return out if out.exists() else tokenize_file(path, out, tokenizer)
