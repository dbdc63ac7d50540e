"""Pallas WKV kernels for GPU (Triton lowering) and TPU (Mosaic), one module per family.

Each function has the signature and results of the XLA parallel form it replaces, plus
keyword-only ``chunk_size``, ``platform`` ("gpu", "tpu" or None = from the default backend) and
``interpret`` (Pallas interpret mode, for CPU tests); each module's ``supports(head_size, dtype,
platform)`` says which configurations are tested:

* ``pallas_kernels.dplr.wkv7_pallas``   == ``rwkv_jax.wkv.dplr.wkv7_parallel``   (RWKV-7)
* ``pallas_kernels.diag.wkv6_pallas``   == ``rwkv_jax.wkv.diag.wkv6_parallel``   (RWKV-5/6)
* ``pallas_kernels.vector.wkv4_pallas`` == ``rwkv_jax.wkv.vector.wkv4_parallel`` (RWKV-4)

``pallas_kernels.sharding.shard_wkv`` runs any of them per shard over batch (and heads).
"""
