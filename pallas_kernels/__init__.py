"""Pallas WKV kernels for GPU and TPU (not written yet: `RWKVConfig(wkv="pallas")` fails closed)."""
