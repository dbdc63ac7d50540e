"""Benchmark `rwkv_jax.tokenizers.WorldTokenizer` against the official `rwkv` package's tokenizer.

    python experiments/bench_tokenizer.py                 # ~1 MB mixed corpus, best of 5
    python experiments/bench_tokenizer.py --mb 4 --repeats 3

The corpus is built deterministically from what every Python install has, no downloads:
English (the reference manual in `pydoc_data.topics`), code (standard-library sources),
Chinese (synthetic: seeded random CJK entries of the World vocabulary with punctuation, so its
token statistics are only roughly those of real text), and a tail of emoji, control
characters and runs of whitespace. Prints one row per part and the whole: bytes, tokens,
encode MB/s (best of `--repeats`) for the official `TRIE_TOKENIZER` and ours, their ratio,
whether the ids agree, and both tokenizers' load times.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import random
import time

import pydoc_data.topics

import rwkv.rwkv_tokenizer as official_tokenizer
from rwkv_jax.tokenizers import WorldTokenizer

CODE_MODULES = ("collections", "json.decoder", "argparse", "email.message", "http.client", "inspect")
SHARES = {"english": 0.4, "code": 0.35, "chinese": 0.15, "emoji/control/space": 0.10}


def build_corpus(total_bytes: int, tokenizer: WorldTokenizer) -> dict[str, str]:
    rng = random.Random(0)
    english = "\n\n".join(pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics))
    code = "\n".join(inspect.getsource(importlib.import_module(name)) for name in CODE_MODULES)
    cjk = [text for text in (tokenizer.decode([i]) for i in range(257, 65530))
           if text and all("\u4e00" <= ch <= "\u9fff" for ch in text)]
    chinese = "".join(rng.choice(cjk) + rng.choice("，。、；：？！\n" if rng.random() < 0.15 else [""])
                      for _ in range(total_bytes))
    symbols = [chr(c) for c in range(0x1F300, 0x1FAFF)] + list("\x00\x01\x1b\x7f\t\r\n") + [" " * 8, "\n\n\n", "\t\t"]
    tail = "".join(rng.choice(symbols) + (" " if rng.random() < 0.3 else "") for _ in range(total_bytes))
    sources = {"english": english * 4, "code": code * 4, "chinese": chinese, "emoji/control/space": tail}
    return {name: _cut(sources[name], int(share * total_bytes)) for name, share in SHARES.items()}


def _cut(text: str, n_bytes: int) -> str:
    """The longest prefix of `text` with at most `n_bytes` UTF-8 bytes."""
    if len(text.encode()) < n_bytes:
        raise ValueError(f"source too short for {n_bytes} bytes")
    return text.encode()[:n_bytes].decode("utf-8", errors="ignore")


def best_time(fn, arg, repeats: int) -> tuple[float, list[int]]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(arg)
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1.0, help="corpus size in MB (1e6 bytes)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    start = time.perf_counter()
    official = official_tokenizer.TRIE_TOKENIZER(os.path.join(os.path.dirname(official_tokenizer.__file__),
                                                              "rwkv_vocab_v20230424.txt"))
    official_load = time.perf_counter() - start
    start = time.perf_counter()
    ours = WorldTokenizer()
    ours_load = time.perf_counter() - start

    parts = build_corpus(int(args.mb * 1e6), ours)
    parts["all"] = "".join(parts.values())
    print(f"load: official {official_load:.2f} s, ours {ours_load:.2f} s (first call per process; cached after)")
    print(f"{'part':<20} {'bytes':>9} {'tokens':>8} {'official MB/s':>14} {'ours MB/s':>10} {'ratio':>6}  same ids")
    for name, text in parts.items():
        n_bytes = len(text.encode())
        t_official, ids_official = best_time(official.encode, text, args.repeats)
        t_ours, ids_ours = best_time(ours.encode, text, args.repeats)
        print(f"{name:<20} {n_bytes:>9} {len(ids_ours):>8} {n_bytes / t_official / 1e6:>14.2f} "
              f"{n_bytes / t_ours / 1e6:>10.2f} {t_official / t_ours:>6.2f}  {ids_ours == ids_official}")


if __name__ == "__main__":
    main()
