"""Data shipped with the package: `shakespeare.txt`, the built-in training corpus (see README.md)."""
