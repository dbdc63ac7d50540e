"""The RWKV World tokenizer (`rwkv_vocab_v20230424`: RWKV-4 World and every v5, v6, v7 World model).

Encoding is greedy longest-prefix matching over the UTF-8 bytes (not BPE): from the current
position take the longest vocabulary entry the remaining bytes start with, emit its id, advance.
Ids 1..256 are the single bytes, so every byte string is encodable; id 0 is end-of-document and
has no bytes. Results are byte-exact with the official `rwkv.rwkv_tokenizer.TRIE_TOKENIZER`.

`rwkv_vocab_v20230424.txt` next to this module is a verbatim copy of the file shipped in the
official `rwkv` pip package 0.8.32 (Apache-2.0, https://github.com/BlinkDL/ChatRWKV, same
SHA-256 8324476023347dec2964625ccb2075c864d250a9c6d9a74f36daba628de8c008); it has no header of its
own. Each line is `<id> <Python str or bytes literal> <byte length>`.

Speed: instead of walking a trie in Python for every token, the vocabulary is compiled once into a
regular expression shaped like its trie, so `re.findall` does the whole walk in C (about twice
the official tokenizer's speed; see experiments/bench_tokenizer.py).
"""

from __future__ import annotations

import ast
import functools
import importlib.resources
import itertools
import os
import re
from typing import Iterable, Sequence

import numpy as np

VOCAB_FILE = "rwkv_vocab_v20230424.txt"


class WorldTokenizer:
    """Encode text to World token ids and back, exactly as the official tokenizer does.

    `WorldTokenizer()` uses the vocabulary shipped with this package; `vocab_file` takes another
    file in the same format. Loading takes about 2 s (building the matcher) the first time per
    file, then is cached for the process.

    Attributes:
      vocab_size: 65536, the World models' embedding size (ids 65530..65535 are unused); for
        another `vocab_file`, its largest id + 1.
      eod_id: 0, end of document (a World prompt starts with it, as in the official usage).
    """

    eod_id = 0

    def __init__(self, vocab_file: str | os.PathLike | None = None) -> None:
        path = None if vocab_file is None else os.path.abspath(vocab_file)
        self._id_to_bytes, self._bytes_to_id, self._matcher = _load_vocab(path)
        self.vocab_size: int = 65536 if vocab_file is None else max(self._id_to_bytes) + 1

    def encode(self, text: str) -> list[int]:
        """`text` -> token ids (raises UnicodeEncodeError on lone surrogates, as the official)."""
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Any byte string -> token ids."""
        # Every single byte is a token, so the matches tile `data` with no gaps.
        return list(map(self._bytes_to_id.__getitem__, self._matcher.findall(data)))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Token ids -> the concatenation of their bytes.

        Raises ValueError for an id without bytes (0, negative, or beyond the vocabulary).
        """
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # numpy / jax arrays
        try:
            return b"".join(map(self._id_to_bytes.__getitem__, ids))
        except KeyError as err:
            raise ValueError(f"token id {err.args[0]!r} has no bytes in the World vocabulary "
                             f"(text ids are 1..{max(self._id_to_bytes)}; 0 is end-of-document)") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text, exactly as the official `decode`.

        Like the official, if the bytes are not valid UTF-8 (for instance a multi-byte character
        cut at either end of `ids`) or an id has no bytes, the whole result is the single
        character U+FFFD; `decode_bytes(ids).decode("utf-8", "replace")` replaces only the
        offending bytes.
        """
        try:
            return self.decode_bytes(ids).decode("utf-8")
        except ValueError:  # UnicodeDecodeError is a ValueError
            return "\ufffd"

    def token_bytes(self) -> np.ndarray:
        """`[vocab_size]` bytes of each token, for bits per byte (0 for ids without bytes: 0, 65530..)."""
        sizes = np.zeros(self.vocab_size, np.int64)
        for idx, token in self._id_to_bytes.items():
            sizes[idx] = len(token)
        return sizes


@functools.cache
def _load_vocab(path: str | None) -> tuple[dict[int, bytes], dict[bytes, int], re.Pattern]:
    """The vocabulary at `path` (None: the packaged file), parsed and compiled once per process."""
    if path is None:
        text = importlib.resources.files(__package__).joinpath(VOCAB_FILE).read_text(encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    return _compile_vocab(text)


def _compile_vocab(text: str) -> tuple[dict[int, bytes], dict[bytes, int], re.Pattern]:
    """Parse a vocab file's text into `(id -> bytes, bytes -> id, matcher)`."""
    id_to_bytes = _parse_vocab(text)
    bytes_to_id = {token: idx for idx, token in id_to_bytes.items()}
    if len(bytes_to_id) != len(id_to_bytes):
        raise ValueError("World vocab file maps two ids to the same bytes")
    missing = [b for b in range(256) if bytes([b]) not in bytes_to_id]
    if missing:
        # Without every single byte some inputs could not be encoded (and findall would skip them).
        raise ValueError(f"World vocab file lacks the single-byte tokens {missing[:8]}...")
    return id_to_bytes, bytes_to_id, re.compile(_trie_regex(sorted(bytes_to_id), 0))


def _parse_vocab(text: str) -> dict[int, bytes]:
    """`<id> <str or bytes literal> <byte length>` lines -> {id: bytes}, without `eval`."""
    id_to_bytes: dict[int, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            idx = int(line[:line.index(" ")])
            token = ast.literal_eval(line[line.index(" "):line.rindex(" ")].strip())
            length = int(line[line.rindex(" "):])
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"World vocab line {number} is not '<id> <literal> <length>': {line!r}") from err
        if isinstance(token, str):
            token = token.encode("utf-8")
        if not isinstance(token, bytes) or len(token) != length or not token or idx in id_to_bytes:
            raise ValueError(f"World vocab line {number} is inconsistent: {line!r}")
        id_to_bytes[idx] = token
    return id_to_bytes


def _trie_regex(tokens: Sequence[bytes], depth: int) -> bytes:
    """A regex matching the longest of `tokens` at the current position, from byte `depth` on.

    `tokens` are sorted and share their first `depth` bytes. Each trie node becomes an
    alternation over its children's next byte (only one alternative can match); a child that is
    itself a token makes the rest optional as `(?:rest|)`, whose first branch is tried first, so
    the match goes as deep as possible and backtracks to the deepest complete token: the greedy
    longest match. `re` tries alternatives in order, skipping those whose first byte or class
    does not match with a cheap test, so the childless children go first as one character
    class, then the others, larger subtrees (likelier bytes) first.
    """
    return b"|".join(_trie_alternatives(tokens, depth))


def _trie_alternatives(tokens: Sequence[bytes], depth: int) -> list[bytes]:
    branches: list[tuple[int, bytes]] = []
    leaves = []
    deeper = [token for token in tokens if len(token) > depth]
    for byte, group in itertools.groupby(deeper, key=lambda token: token[depth]):
        group = list(group)
        literal = re.escape(bytes([byte]))
        if len(group) == 1 and len(group[0]) == depth + 1:
            leaves.append(literal)
            continue
        rest = _trie_alternatives(group, depth + 1)
        if len(group[0]) == depth + 1:  # the child is a token (sorted, so it comes first)
            branches.append((len(group), literal + b"(?:" + b"|".join(rest) + b"|)"))
        elif len(rest) == 1:
            branches.append((len(group), literal + rest[0]))
        else:
            branches.append((len(group), literal + b"(?:" + b"|".join(rest) + b")"))
    alternatives = [leaves[0]] if len(leaves) == 1 else [b"[" + b"".join(leaves) + b"]"] if leaves else []
    return alternatives + [pattern for _, pattern in sorted(branches, key=lambda branch: -branch[0])]
