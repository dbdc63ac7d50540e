"""Tokenizers other than World: bytes, SentencePiece, and HuggingFace `tokenizers` JSON files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import sentencepiece as spm


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes, for byte-level models (`vocab_size` 256)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raises ValueError for an id outside 0..255."""
        return bytes(ids.tolist() if hasattr(ids, "tolist") else ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Invalid UTF-8 (e.g. a character cut by the end of `ids`) becomes U+FFFD per bad byte."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A trained SentencePiece model (`.model` file)."""

    def __init__(self, model_file: str | os.PathLike) -> None:
        self._sp = spm.SentencePieceProcessor(model_file=os.fspath(model_file))
        self.vocab_size: int = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))


def train_sentencepiece(text_files: Sequence[str | os.PathLike], vocab_size: int,
                        model_prefix: str | os.PathLike, **options: Any) -> Path:
    """Train a SentencePiece model on `text_files`; returns the path of `<model_prefix>.model`.

    `options` go to `sentencepiece.SentencePieceTrainer.train` unchanged (e.g. `model_type="bpe"`,
    `character_coverage=1.0`, `byte_fallback=True`); its defaults apply otherwise.
    """
    spm.SentencePieceTrainer.train(input=",".join(os.fspath(f) for f in text_files), vocab_size=vocab_size,
                                   model_prefix=os.fspath(model_prefix), **options)
    return Path(f"{os.fspath(model_prefix)}.model")


class HFTokenizer:
    """A HuggingFace `tokenizers` JSON file, e.g. the GPT-NeoX `20B_tokenizer.json` of the RWKV-4
    Pile models (not shipped here: pass its path).

    Encodes and decodes as the official `rwkv.utils.PIPELINE` does with such a file (decoding
    skips special tokens such as `<|endoftext|>`). `vocab_size` counts the added tokens (50277
    for the 20B file, the Pile models' embedding size). Needs the optional `tokenizers` package
    (`pip install "rwkv-jax[hf]"`).
    """

    def __init__(self, json_path: str | os.PathLike) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ImportError('HFTokenizer needs the `tokenizers` package: pip install "rwkv-jax[hf]"') from err
        self._tokenizer = Tokenizer.from_file(os.fspath(json_path))
        self.vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))
