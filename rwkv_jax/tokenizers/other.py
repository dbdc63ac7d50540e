"""Tokenizers other than World: bytes, SentencePiece, and HuggingFace `tokenizers` JSON files."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import sentencepiece as spm

# SentencePiece's stand-in for a space, and its byte-fallback pieces (`<0x0A>` is the byte 10).
SPACE_MARKER = "\u2581"
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


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

    def token_bytes(self) -> np.ndarray:
        """`[256]` bytes of text per token, for bits per byte: one each."""
        return np.ones(self.vocab_size, np.int64)


class SentencePieceTokenizer:
    """A trained SentencePiece model (`.model` file)."""

    def __init__(self, model_file: str | os.PathLike) -> None:
        self._sp = spm.SentencePieceProcessor(model_file=os.fspath(model_file))
        self.vocab_size: int = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))

    def token_bytes(self) -> np.ndarray:
        """`[V]` bytes of text each piece stands for, for bits per byte (`sentencepiece_token_bytes`)."""
        return sentencepiece_token_bytes(self._sp)


def sentencepiece_token_bytes(processor: spm.SentencePieceProcessor) -> np.ndarray:
    """`[V]` bytes of text each piece of a SentencePiece model stands for: "▁" is a space, a
    byte-fallback piece `<0xNN>` is one byte, control and unknown pieces (`<s>`, `<unk>`) are none.

    Decoding each piece alone does not give this: it drops the "▁" at the start of a text, and a
    byte piece holding part of a character decodes to U+FFFD (three bytes). The pieces stand for
    the text as the model normalised it: SentencePiece's defaults put a "▁" before the text (the
    dummy prefix, one byte more) and collapse runs of whitespace (fewer bytes); `rwkv-jax train`'s
    models do neither, so their pieces stand for exactly the text's bytes.
    """
    sizes = np.zeros(processor.get_piece_size(), np.int64)
    for i in range(sizes.size):
        if processor.is_byte(i):
            sizes[i] = 1
        elif not (processor.is_control(i) or processor.is_unknown(i)):
            sizes[i] = len(processor.id_to_piece(i).replace(SPACE_MARKER, " ").encode("utf-8"))
    return sizes


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

    def token_bytes(self) -> np.ndarray:
        """`[V]` bytes of text each token stands for, for bits per byte.

        Special tokens (which `decode` skips) have none, other added tokens the UTF-8 length of
        their text. The model's own tokens: for a byte-level BPE (GPT-2, GPT-NeoX: a `ByteLevel`
        decoder) one byte per character of its byte alphabet; for a SentencePiece-style vocabulary
        (a `Metaspace`, `Replace("▁", " ")` or `ByteFallback` decoder) the SentencePiece rules of
        `sentencepiece_token_bytes`. Decoding each token alone does not give this (a byte-level
        token holding part of a character decodes to U+FFFD, three bytes). Raises ValueError for
        other decoders, whose tokens' bytes depend on their neighbours (e.g. WordPiece's "##").
        """
        decoders = _decoder_types(json.loads(self._tokenizer.to_str()).get("decoder"))
        byte_level = "ByteLevel" in decoders
        if not byte_level and not decoders & {"Metaspace", "Replace", "ByteFallback"}:
            raise ValueError(f"cannot tell the bytes of each token of a Hugging Face tokenizer with decoder(s) "
                             f"{sorted(decoders) or 'none'}: only byte-level BPE (ByteLevel) and SentencePiece-style "
                             "(Metaspace, Replace, ByteFallback) vocabularies are supported")
        sizes = np.zeros(self.vocab_size, np.int64)
        added = self._tokenizer.get_added_tokens_decoder()
        for i in range(self.vocab_size):
            if i in added:  # decoded as their text, not through the decoder
                sizes[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
                continue
            token = self._tokenizer.id_to_token(i)
            if token is None:  # a gap in the ids
                continue
            if byte_level:  # every character of a byte-level token stands for one byte
                sizes[i] = len(token)
            elif "ByteFallback" in decoders and BYTE_PIECE.fullmatch(token):
                sizes[i] = 1
            else:
                sizes[i] = len(token.replace(SPACE_MARKER, " ").encode("utf-8"))
        return sizes


def _decoder_types(decoder: dict | None) -> set[str]:
    """The types of a `tokenizers` JSON decoder and of the decoders of a `Sequence` one; a `Replace`
    counts as one only when it is SentencePiece's "▁" -> " "."""
    if not decoder:
        return set()
    kind = decoder.get("type")
    if kind == "Sequence":
        return set().union(*(_decoder_types(part) for part in decoder.get("decoders", [])))
    if kind == "Replace" and (decoder.get("pattern"), decoder.get("content")) != ({"String": SPACE_MARKER}, " "):
        return {"Replace (not of '▁' by ' ')"}
    return {kind}
