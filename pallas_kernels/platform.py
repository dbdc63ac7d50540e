"""Which Pallas variant runs where: "gpu" (Triton lowering) or "tpu" (Mosaic)."""

from __future__ import annotations

import jax

PLATFORMS = ("gpu", "tpu")


def backend_platform() -> str | None:
    """The variant for `jax.default_backend()`: "gpu", "tpu", or None on a CPU backend."""
    backend = jax.default_backend()
    return "gpu" if backend in ("cuda", "rocm", "gpu") else "tpu" if backend == "tpu" else None


def resolve_platform(platform: str | None, interpret: bool) -> str:
    """`platform` as given, else the backend's; in interpret mode on a CPU backend the GPU variant.
    ValueError on a CPU backend without `interpret` (`jax.export` for a device names the platform,
    so kernels still lower from a CPU)."""
    if platform is None:
        platform = backend_platform() or ("gpu" if interpret else None)
        if platform is None:
            raise ValueError(
                f"Pallas WKV kernels need a GPU or TPU (the default backend is {jax.default_backend()!r}); "
                "pass interpret=True to run a variant in Pallas interpret mode, or use the XLA forms in rwkv_jax.wkv.")
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS} or None, got {platform!r}")
    return platform
