"""Tokenizers for RWKV models, all with `encode(str) -> list[int]`, `decode(ids) -> str` and
`vocab_size`:

- `WorldTokenizer`: RWKV-4 World and every v5/v6/v7 World model (vocabulary shipped here);
- `HFTokenizer`: a HuggingFace `tokenizers` JSON, e.g. the GPT-NeoX `20B_tokenizer.json` of the
  RWKV-4 Pile models (needs the optional `tokenizers` package);
- `SentencePieceTokenizer` (and `train_sentencepiece`), `ByteTokenizer` (ids 0..255 = bytes).

Each also has `token_bytes()`: how many bytes of text every id stands for, which bits per byte
divides by (`rwkv_jax.evaluation.perplexity`).
"""

from typing import Protocol

from rwkv_jax.tokenizers.other import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer, sentencepiece_token_bytes,
                                      train_sentencepiece)
from rwkv_jax.tokenizers.world import WorldTokenizer


class Tokenizer(Protocol):
    """What generation and the CLI need from a tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


__all__ = ["Tokenizer", "WorldTokenizer", "HFTokenizer", "SentencePieceTokenizer", "ByteTokenizer",
           "sentencepiece_token_bytes", "train_sentencepiece"]
