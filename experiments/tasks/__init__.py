"""Synthetic and text tasks for comparing RWKV versions, each deterministic given a seed.

Every generator returns `(inputs [B, T] int32, labels [B, T] int32)` where `labels` holds the
token the model must predict *at* each position, or `IGNORE_INDEX` where nothing is scored:

- `mqar`: multi-query associative recall (Zoology), scored only at the query positions;
- `state_tracking`: group word problems (prefix products over Z60, A4xZ5, A5, S5), scored everywhere;
- `charlm`: byte language modelling on the built-in corpus, scored everywhere (next byte).
"""

IGNORE_INDEX = -100
