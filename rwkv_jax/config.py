"""`RWKVConfig`: one frozen dataclass describing any RWKV model, with per-version defaults."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

SUPPORTED_VERSIONS = (1, 2, 3, 4, 5, 6, 7)
WKV_CHOICES = ("auto", "oracle", "parallel", "pallas")
# The WKV implementations that exist and are tested, per version; asking for anything not listed
# fails instead of silently falling back. "auto" picks "pallas" only where `pallas_is_verified`
# says so and the first entry otherwise.
TESTED_WKV = {1: ("parallel", "oracle"), 2: ("parallel", "oracle"), 3: ("parallel", "oracle"),
              4: ("parallel", "oracle", "pallas"), 5: ("parallel", "oracle", "pallas"),
              6: ("parallel", "oracle", "pallas"), 7: ("parallel", "oracle", "pallas")}
# The kernel module of each version (pallas_kernels.vector / diag / dplr).
PALLAS_MODULE = {4: "vector", 5: "diag", 6: "diag", 7: "dplr"}
# Platforms where the compiled kernels have passed their on-device tests (experiments/device_check.sh).
# Interpret-mode tests on CPU cover the math on both variants, but a kernel that has never been
# compiled and checked on the hardware is not picked by "auto": fail closed.
PALLAS_VERIFIED_PLATFORMS: tuple[str, ...] = ()
DEFAULT_CHUNK_SIZE = {5: 64, 6: 64, 7: 32}
# The official training scripts' context lengths (RWKV-1/train.py, RWKV-v2-RNN and RWKV-v3 train.py).
DEFAULT_CTX_LEN = {1: 256, 2: 1024, 3: 1024}
HEAD_QK_DIM = 256  # the official copy head's width (RWKV_HEAD_QK_DIM) in v1-v3
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# RWKV-5 sub-versions the official package tells apart (spec §7.1): the 5.0/5.1 previews have one
# decay and one bonus per head and 5.0 has no gate; 5.2 ("x052", Eagle) is what v5 means by default.
V5_VARIANTS = ("5.0", "5.1", "5.2")


def _lora_dim(scale: float, n_embd: int, power: float) -> int:
    """The official RWKV-7 LoRA width rule: max(32, round(scale * C**power / 32) * 32)."""
    return max(32, int(round(scale * n_embd**power / 32)) * 32)


@dataclasses.dataclass(frozen=True)
class RWKVConfig:
    """Sizes and numerics of an RWKV model.

    Only `version`, `n_layer`, `n_embd` and `vocab_size` are required; every other size gets the
    default the official training code uses for that version (`None` means "use the default";
    the resolved value is stored, so `cfg.dim_ffn` is always an int after construction).

    Attributes:
      version: 1, 2, 3, 4, 5 ("Eagle"), 6 ("Finch") or 7 ("Goose").
      v5_variant: RWKV-5 only: "5.2" (x052, the default: per-channel decay and bonus, SiLU gate),
        "5.1" (per-head scalar decay and bonus, gate) or "5.0" (per-head, no gate); None otherwise.
      v5_log_bonus: RWKV-5.0/5.1 only: the preview trainer without its 'r2' flag stores the bonus
        as `time_first` = log u (the `rwkv` package applies exp), with it as `time_faaaa` = u.
        True selects the former, so such files round-trip bit-exactly.
      n_layer, n_embd (C), vocab_size (V): model sizes.
      head_size: N, channels per head of v1 (its `n_attn / n_head`) and of the matrix-state
        versions (v5-v7); H = dim_att // N.
      dim_att: A, width of the time-mix projections (v1-v6; v7 requires A = C). Default C.
      dim_ffn: F, hidden width of the channel mix (the rows of its `key` weight). Default
        5C//2 (v1: the official `5 * n_ffn // 2` with n_ffn = C), 4C (v2-v4, v7) or
        int(3.5C)//32*32 (v5, v6).
      ctx_len: TT, v1-v3 only. v1's parameters are tied to it (`time_w` is (H, TT)) and it is
        defined only for positions < TT; in v2/v3 it is the window of the copy head (the official
        `copy_mask` size). Default 256 (v1) or 1024 (v2, v3), as the official training scripts.
      head_qk: D, width of the head-QK copy head (spec §2.3): 256 (official) by default for v1-v3,
        0 = no copy head; must be 0 for v4-v7.
      d_mix, d_decay: v6 LoRA widths of the data-dependent token shift (32) and decay (64).
      d_w, d_a, d_v, d_g: v7 LoRA widths (decay, in-context rate, value residual, gate),
        defaults from the official formulas in C.
      wkv: recurrence implementation: "oracle" (token-by-token scan), "parallel" (associative
        scan / chunked), "pallas" (the kernels in `pallas_kernels/`, v4-v7; on a CPU backend they
        run in Pallas interpret mode, which is for testing and slow) or "auto" ("pallas" where
        `pallas_is_verified`, else "parallel"; fails closed).
      chunk_size: chunk length of the chunked parallel form (v5-v7).
      dtype: compute dtype of activations and matmuls ("float32" or "bfloat16"); the WKV
        recurrence and its state are always float32.
      param_dtype: dtype of freshly initialised parameters.
    """

    version: int
    n_layer: int
    n_embd: int
    vocab_size: int
    head_size: int = 64
    dim_att: int | None = None
    dim_ffn: int | None = None
    d_mix: int | None = None
    d_decay: int | None = None
    d_w: int | None = None
    d_a: int | None = None
    d_v: int | None = None
    d_g: int | None = None
    ctx_len: int | None = None
    head_qk: int | None = None
    wkv: str = "auto"
    chunk_size: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    v5_variant: str | None = None
    v5_log_bonus: bool = False

    def __post_init__(self) -> None:
        if self.version not in SUPPORTED_VERSIONS:
            raise ValueError(f"RWKVConfig: version must be one of {SUPPORTED_VERSIONS}, got {self.version!r}")
        for name in ("n_layer", "n_embd", "vocab_size", "head_size"):
            _check_int(name, getattr(self, name), minimum=1)
        # Given sizes are checked before the defaults fill in the rest: a bad one would otherwise
        # only fail deep inside the first call. LoRA widths may be 0 (that LoRA then adds nothing).
        for name in ("dim_att", "dim_ffn", "chunk_size", "ctx_len"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        for name in ("d_mix", "d_decay", "d_w", "d_a", "d_v", "d_g", "head_qk"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=0)
        if self.wkv not in WKV_CHOICES:
            raise ValueError(f"RWKVConfig: wkv must be one of {WKV_CHOICES}, got {self.wkv!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"RWKVConfig: {name} must be one of {tuple(DTYPES)}, got {getattr(self, name)!r}")

        C, v = self.n_embd, self.version
        defaults: dict[str, Any] = {
            "dim_att": C,
            "dim_ffn": {1: 5 * C // 2, 5: int(3.5 * C) // 32 * 32, 6: int(3.5 * C) // 32 * 32}.get(v, 4 * C),
            "head_qk": HEAD_QK_DIM if v <= 3 else 0,
        }
        if v in DEFAULT_CTX_LEN:
            defaults["ctx_len"] = DEFAULT_CTX_LEN[v]
        if v == 6:
            defaults.update(d_mix=32, d_decay=64)
        if v == 7:
            defaults.update(d_w=_lora_dim(1.8, C, 0.5), d_a=_lora_dim(1.8, C, 0.5),
                            d_v=_lora_dim(1.3, C, 0.5), d_g=_lora_dim(0.6, C, 0.8))
        if v in DEFAULT_CHUNK_SIZE:
            defaults["chunk_size"] = DEFAULT_CHUNK_SIZE[v]
        if v == 5:
            defaults["v5_variant"] = "5.2"
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

        if v >= 4 and (self.ctx_len is not None or self.head_qk):
            raise ValueError(f"RWKVConfig: ctx_len and head_qk (the copy head) only exist for RWKV-1..3, got "
                             f"ctx_len={self.ctx_len!r}, head_qk={self.head_qk!r} for RWKV-{v}")
        if v == 5 and self.v5_variant not in V5_VARIANTS:
            raise ValueError(f"RWKVConfig: v5_variant must be one of {V5_VARIANTS}, got {self.v5_variant!r}")
        if v != 5 and self.v5_variant is not None:
            raise ValueError(f"RWKVConfig: v5_variant only exists for RWKV-5, got {self.v5_variant!r} for RWKV-{v}")
        if self.v5_log_bonus and self.v5_variant not in ("5.0", "5.1"):
            raise ValueError("RWKVConfig: v5_log_bonus (a `time_first` log-bonus) only exists for RWKV-5.0/5.1")
        if (v == 1 or v >= 5) and self.dim_att % self.head_size:
            raise ValueError(f"RWKVConfig: dim_att={self.dim_att} is not a multiple of head_size={self.head_size}")
        if v == 7 and self.dim_att != C:
            raise ValueError(f"RWKVConfig: RWKV-7 requires dim_att == n_embd, got {self.dim_att} != {C}")
        self.wkv_impl  # validates the wkv choice for this version

    @property
    def n_head(self) -> int:
        """H: number of heads (v1, v5-v7); for v2-v4 every channel is its own 'head'."""
        return self.dim_att // self.head_size if self.version in (1, 5, 6, 7) else self.dim_att

    @property
    def wkv_impl(self) -> str:
        """The concrete WKV implementation `wkv` resolves to; raises if it is not available."""
        tested = TESTED_WKV[self.version]
        if self.wkv == "auto":
            return "pallas" if pallas_is_verified(self) else tested[0]
        if self.wkv not in tested:
            raise ValueError(f"RWKVConfig: wkv={self.wkv!r} is not available for RWKV-{self.version} "
                             f"(available: {tested})")
        return self.wkv

    @property
    def compute_dtype(self) -> jnp.dtype:
        return DTYPES[self.dtype]

    @property
    def params_dtype(self) -> jnp.dtype:
        return DTYPES[self.param_dtype]

    def replace(self, **changes: Any) -> RWKVConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RWKVConfig:
        return cls(**json.loads(text))


def _check_int(name: str, value: Any, minimum: int) -> None:
    """`value` must be an int (not a bool) of at least `minimum` (1: positive, 0: non-negative)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive" if minimum == 1 else "a non-negative"
        raise ValueError(f"RWKVConfig: {name} must be {kind} int, got {value!r}")


def layer_ratios(layer: Any, n_layer: int) -> tuple[Any, Any]:
    """The official init's depth ratios: (l / (L-1), 1 - l / L). `layer` may be traced."""
    ratio_0_to_1 = layer / max(n_layer - 1, 1)
    ratio_1_to_almost0 = 1.0 - layer / n_layer
    return ratio_0_to_1, ratio_1_to_almost0



def pallas_platform() -> str | None:
    """The Pallas variant the default JAX backend runs ("gpu" or "tpu"); None on CPU."""
    from pallas_kernels.platform import backend_platform

    return backend_platform()


def pallas_is_verified(cfg: RWKVConfig) -> bool:
    """Whether `wkv="auto"` may use the kernel for `cfg` here: a kernel exists for the version, this
    backend is in `PALLAS_VERIFIED_PLATFORMS`, and the kernel's tests cover the head size and dtype."""
    platform = pallas_platform()
    if cfg.version not in PALLAS_MODULE or platform not in PALLAS_VERIFIED_PLATFORMS:
        return False
    import importlib

    kernels = importlib.import_module(f"pallas_kernels.{PALLAS_MODULE[cfg.version]}")
    width = cfg.head_size if cfg.version >= 5 else cfg.dim_att
    return kernels.supports(width, cfg.compute_dtype, platform)
