"""Ground truth from the official ``rwkv`` pip package (0.8.32), run in a subprocess.

Tests of rwkv-jax compare against BlinkDL's inference package with ``strategy='cpu fp32'``.
This module provides two things:

* :func:`make_official_checkpoint` writes a random checkpoint in the official ``.pth`` layout
  (a ``torch.save`` of a plain ``dict`` of tensors with exactly the keys, shapes and key order of
  released BlinkDL checkpoints) for RWKV-4, 5.2 (x052), 6 (x060) or 7 (x070), in fp32 or bf16;
* :func:`run_official` runs the package on a token list and returns the logits of every position
  and the final recurrent state as float32 numpy arrays.

Why a subprocess
----------------
``rwkv.model`` makes its decisions when it is *imported*: ``RWKV_V7_ON=1`` replaces the module's
``RWKV`` class by ``RWKV_x070`` (and then only v7 files can be loaded; without it v7 files are
misdetected), ``RWKV_JIT_ON`` picks TorchScript or eager classes, ``RWKV_CUDA_ON`` compiles (or
not) CUDA kernels. Python caches the module, so v4-v6 and v7 cannot both run in one process, and
whatever the first importer set would silently hold for every later test. Each call therefore
starts ``sys.executable`` on this very file (via ``-c`` and ``runpy``, worker mode
``--official-worker JOB_DIR``, cwd = the job directory) with a clean, explicit environment:

    RWKV_JIT_ON=1  RWKV_CUDA_ON=0  (+ RWKV_V7_ON=1 for v7 only)
    RWKV_V7_ON / RWKV_DE_VERSION / RWKV_RESCALE_LAYER / RWKV_DML_ON removed otherwise
    CUDA_VISIBLE_DEVICES=''        (the reference is the CPU fp32 path)

Inputs (tokens, an optional initial state) and outputs (logits, final state) travel as ``.npz``
files in a temporary directory; the package's own prints go to the child's stdout, which is
captured and only shown when the child fails, so it can never mix with the result channel.
The parent process (usually a JAX test) never imports ``rwkv``; it imports ``torch`` only to
write checkpoints (``torch.save``).

State layout returned by :func:`run_official` (the package's own order and layout, spec 13.4):

* v4: 5 entries per layer i: ``5i+0`` att x_prev (C), ``5i+1`` aa (A), ``5i+2`` bb (A),
  ``5i+3`` pp (A, starts at -1e30), ``5i+4`` ffn x_prev (C);
* v5.2 / v6: 3 per layer: att x_prev (C), S (H, N, N) indexed **[key, value]**, ffn x_prev (C);
* v7: 3 per layer: att x_prev (C), S (H, N, N) indexed **[value, key]**, ffn x_prev (C).

The x_prev entries hold the *LayerNorm output* (ln1 / ln2) of the previous token, not the
residual stream.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Sequence

import numpy as np

__all__ = [
    "official_available",
    "make_official_checkpoint",
    "run_official",
    "run_official_many",
    "default_lora_dims",
    "default_dim_ffn",
    "state_shapes",
    "LAST_RUN_SECONDS",
]

SUPPORTED_VERSIONS = (4, 5, 6, 7)
# What the legacy class must detect for each version we write (spec 13.3).
_EXPECTED_DETECTED = {4: 4.0, 5: 5.2, 6: 6.0, 7: 7.0}
_WORKER_FLAG = "--official-worker"
# Wall-clock seconds of the most recent subprocess run (spawn + import + load + forward).
LAST_RUN_SECONDS: float | None = None

_AVAILABLE: bool | None = None
# The child runs this file via ``-c`` + runpy rather than ``python this_file.py`` so that its
# sys.path[0] is the (empty) job directory, not tests/: nothing in tests/ can shadow torch/rwkv.
_BOOT = (
    "import runpy, sys; f = sys.argv[1]; sys.argv = [f, %r, sys.argv[2]]; "
    "runpy.run_path(f, run_name='__main__')" % _WORKER_FLAG
)


def official_available() -> bool:
    """True when both ``torch`` and ``rwkv`` can be found by this interpreter.

    Uses ``importlib.util.find_spec`` only: nothing is imported, so calling this at test
    collection time is cheap and cannot freeze the package's import-time configuration.
    """
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            _AVAILABLE = (
                importlib.util.find_spec("torch") is not None
                and importlib.util.find_spec("rwkv") is not None
            )
        except (ImportError, ValueError):
            _AVAILABLE = False
    return _AVAILABLE


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------


def default_dim_ffn(version: int, n_embd: int) -> int:
    """Channel-mix hidden size used by the official training code for each version."""
    if version in (4, 7):
        return 4 * n_embd
    if version in (5, 6):
        return int(3.5 * n_embd) // 32 * 32
    raise ValueError(f"unsupported version {version!r}")


def default_lora_dims(version: int, n_embd: int) -> dict[str, int]:
    """LoRA widths: v6 ``{'mix': 32, 'decay': 64}``; v7 from the ``RWKV-v5/src/model.py``
    formulas (spec 9.4) ``{'w', 'a', 'v', 'g'}``; ``{}`` for v4/v5."""
    if version == 6:
        return {"mix": 32, "decay": 64}
    if version == 7:
        C = n_embd
        return {
            "w": max(32, int(round(1.8 * (C**0.5) / 32) * 32)),
            "a": max(32, int(round(1.8 * (C**0.5) / 32) * 32)),
            "v": max(32, int(round(1.3 * (C**0.5) / 32) * 32)),
            "g": max(32, int(round(0.6 * (C**0.8) / 32) * 32)),
        }
    if version in (4, 5):
        return {}
    raise ValueError(f"unsupported version {version!r}")


def state_shapes(version: int, *, n_layer: int, n_embd: int, head_size: int = 64) -> list[tuple[int, ...]]:
    """Shapes of the package's state list for a model written by :func:`make_official_checkpoint`."""
    C = n_embd
    if version == 4:
        return [(C,), (C,), (C,), (C,), (C,)] * n_layer
    if version in (5, 6, 7):
        H = C // head_size
        return [(C,), (H, head_size, head_size), (C,)] * n_layer
    raise ValueError(f"unsupported version {version!r}")


# --------------------------------------------------------------------------------------------
# Random official-format checkpoints
# --------------------------------------------------------------------------------------------


class _Gen:
    """Small helpers over one numpy Generator; everything is produced in float64."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def normal(self, shape, std: float) -> np.ndarray:
        return self.rng.standard_normal(shape) * std

    def matrix(self, out_dim: int, in_dim: int, gain: float = 1.0) -> np.ndarray:
        """Linear weight (out, in) with std gain/sqrt(fan_in) (torch ``nn.Linear`` layout)."""
        return self.normal((out_dim, in_dim), gain / math.sqrt(in_dim))

    def lora(self, fan_in: int, fan_out: int, gain: float) -> np.ndarray:
        """LoRA factor used as ``x @ W`` (shape (fan_in, fan_out)), std gain/sqrt(fan_in)."""
        return self.normal((fan_in, fan_out), gain / math.sqrt(fan_in))

    def ln_weight(self, n: int, centre=1.0) -> np.ndarray:
        return centre + self.normal((n,), 0.1)

    def ln_bias(self, n: int) -> np.ndarray:
        return self.normal((n,), 0.05)

    def perturb(self, base: np.ndarray, std: float) -> np.ndarray:
        return base + self.normal(base.shape, std)


# LoRA gains: first factor pre-activation std ~0.5 (tanh/sigmoid clearly non-linear), second
# factor output std ~0.2-0.25: large enough that a missing tanh, a wrong block order of
# time_maa_w2 or a dropped value-residual shows up far above bf16 tolerances, small enough to
# stay in the range of trained models. (With gain 0.1 on both factors the LoRA contribution is
# ~0.01 and tanh is linear to 1%.)
_LORA_IN_GAIN = 0.5
_LORA_OUT_GAIN = 0.5


def _ratios(layer: int, n_layer: int) -> tuple[float, float]:
    r0 = layer / (n_layer - 1) if n_layer > 1 else 0.0  # ratio_0_to_1
    r1 = 1.0 - layer / n_layer  # ratio_1_to_almost0
    return r0, r1


def _v4_layer(g: _Gen, l: int, L: int, C: int, A: int, F: int) -> dict[str, np.ndarray]:
    r0, r1 = _ratios(l, L)
    d = (np.arange(C) / C).reshape(1, 1, C)
    n = np.arange(A)
    zig = ((n + 1) % 3) - 1
    att = {
        # v4neo RWKV_TimeMix registration order
        "time_decay": g.perturb(-5 + 8 * (n / max(A - 1, 1)) ** (0.7 + 1.3 * r0), 0.3),
        "time_first": g.perturb(np.full(A, math.log(0.3)) + 0.5 * zig, 0.1),
        "time_mix_k": g.perturb(d**r1, 0.05),
        "time_mix_v": g.perturb(d**r1 + 0.3 * r0, 0.05),
        "time_mix_r": g.perturb(d ** (0.5 * r1), 0.05),
        "key.weight": g.matrix(A, C),
        "value.weight": g.matrix(A, C),
        "receptance.weight": g.matrix(A, C),
        "output.weight": g.matrix(C, A),
    }
    ffn = {
        "time_mix_k": g.perturb(d**r1, 0.05),
        "time_mix_r": g.perturb(d**r1, 0.05),
        "key.weight": g.matrix(F, C),
        "receptance.weight": g.matrix(C, C),
        "value.weight": g.matrix(C, F),
    }
    return {"att": att, "ffn": ffn}


def _x052_decay_bonus(A: int, r0: float) -> tuple[np.ndarray, np.ndarray]:
    n = np.arange(A)
    decay = -6 + 5 * (n / max(A - 1, 1)) ** (0.7 + 1.3 * r0)
    faaaa = r0 * (1 - n / max(A - 1, 1)) + 0.1 * (((n + 1) % 3) - 1)
    return decay, faaaa


def _v5_layer(g: _Gen, l: int, L: int, C: int, A: int, F: int, H: int, N: int) -> dict:
    r0, r1 = _ratios(l, L)
    d = (np.arange(C) / C).reshape(1, 1, C)
    decay, faaaa = _x052_decay_bonus(A, r0)
    att = {
        # RWKV_Tmix_x052 registration order
        "time_mix_k": g.perturb(d**r1, 0.05),
        "time_mix_v": g.perturb(d**r1 + 0.3 * r0, 0.05),
        "time_mix_r": g.perturb(d ** (0.5 * r1), 0.05),
        "time_mix_g": g.perturb(d ** (0.5 * r1), 0.05),
        "time_decay": g.perturb(decay, 0.3).reshape(H, N),
        "time_faaaa": g.perturb(faaaa, 0.1).reshape(H, N),
        "receptance.weight": g.matrix(A, C),
        "key.weight": g.matrix(A, C),
        "value.weight": g.matrix(A, C),
        "output.weight": g.matrix(C, A),
        "gate.weight": g.matrix(A, C),
        "ln_x.weight": g.ln_weight(A, ((1 + l) / L) ** 0.7),
        "ln_x.bias": g.ln_bias(A),
    }
    ffn = {
        "time_mix_k": g.perturb(d**r1, 0.05),
        "time_mix_r": g.perturb(d**r1, 0.05),
        "key.weight": g.matrix(F, C),
        "receptance.weight": g.matrix(C, C),
        "value.weight": g.matrix(C, F),
    }
    return {"att": att, "ffn": ffn}


def _v6_layer(g: _Gen, l: int, L: int, C: int, A: int, F: int, H: int, N: int, dims: dict) -> dict:
    r0, r1 = _ratios(l, L)
    d = (np.arange(C) / C).reshape(1, 1, C)
    decay, faaaa = _x052_decay_bonus(A, r0)
    D_mix, D_dec = dims["mix"], dims["decay"]
    att = {
        # RWKV_Tmix_x060 registration order
        "time_maa_x": g.perturb(1 - d**r1, 0.05),
        "time_maa_w": g.perturb(1 - d**r1, 0.05),
        "time_maa_k": g.perturb(1 - d**r1, 0.05),
        "time_maa_v": g.perturb(1 - (d**r1 + 0.3 * r0), 0.05),
        "time_maa_r": g.perturb(1 - d ** (0.5 * r1), 0.05),
        "time_maa_g": g.perturb(1 - d ** (0.5 * r1), 0.05),
        "time_maa_w1": g.lora(C, 5 * D_mix, _LORA_IN_GAIN),
        "time_maa_w2": g.normal((5, D_mix, C), _LORA_OUT_GAIN / math.sqrt(D_mix)),
        "time_decay": g.perturb(decay, 0.3).reshape(1, 1, A),
        "time_decay_w1": g.lora(C, D_dec, _LORA_IN_GAIN),
        "time_decay_w2": g.lora(D_dec, A, _LORA_OUT_GAIN),
        "time_faaaa": g.perturb(faaaa, 0.1).reshape(H, N),
        "receptance.weight": g.matrix(A, C),
        "key.weight": g.matrix(A, C),
        "value.weight": g.matrix(A, C),
        "output.weight": g.matrix(C, A),
        "gate.weight": g.matrix(A, C),
        "ln_x.weight": g.ln_weight(A, ((1 + l) / L) ** 0.7),
        "ln_x.bias": g.ln_bias(A),
    }
    ffn = {
        "time_maa_k": g.perturb(1 - d ** (r1**3), 0.05),
        "time_maa_r": g.perturb(1 - d ** (r1**3), 0.05),
        "key.weight": g.matrix(F, C),
        "receptance.weight": g.matrix(C, C),
        "value.weight": g.matrix(C, F),
    }
    return {"att": att, "ffn": ffn}


def _v7_layer(g: _Gen, l: int, L: int, C: int, F: int, H: int, N: int, dims: dict, keep_v: bool) -> dict:
    r0, r1 = _ratios(l, L)
    c = np.arange(C)
    d = (c / C).reshape(1, 1, C)
    lin = c / max(C - 1, 1) - 0.5
    z = ((c % N) - (N - 1) / 2) / ((N - 1) / 2)
    zz = z * np.abs(z)
    D_w, D_a, D_v, D_g = dims["w"], dims["a"], dims["v"], dims["g"]
    row = lambda v: np.asarray(v, dtype=np.float64).reshape(1, 1, C)  # noqa: E731
    att = {
        # RWKV_Tmix_x070 registration order
        "x_r": g.perturb(1 - d ** (0.2 * r1), 0.05),
        "x_w": g.perturb(1 - d ** (0.9 * r1), 0.05),
        "x_k": g.perturb(1 - d ** (0.7 * r1), 0.05),
        "x_v": g.perturb(1 - d ** (0.7 * r1), 0.05),
        "x_a": g.perturb(1 - d ** (0.9 * r1), 0.05),
        "x_g": g.perturb(1 - d ** (0.2 * r1), 0.05),
        "w0": g.perturb(row(-6 + 6 * (c / max(C - 1, 1)) ** (1 + r0**0.3) + 0.5 + 2.5 * zz), 0.3),
        "w1": g.lora(C, D_w, _LORA_IN_GAIN),
        "w2": g.lora(D_w, C, _LORA_OUT_GAIN),
        "a0": g.perturb(row(-0.19 + 0.3 * zz + 0.4 * lin), 0.3),
        "a1": g.lora(C, D_a, _LORA_IN_GAIN),
        "a2": g.lora(D_a, C, _LORA_OUT_GAIN),
        "v0": g.perturb(row(0.73 - 0.4 * lin), 0.3),
        "v1": g.lora(C, D_v, _LORA_IN_GAIN),
        "v2": g.lora(D_v, C, _LORA_OUT_GAIN),
        "g1": g.lora(C, D_g, _LORA_IN_GAIN),
        # g = sigmoid(x g1) g2 has no outer activation: gain 1 keeps the gate O(0.5).
        "g2": g.lora(D_g, C, 1.0),
        "k_k": g.perturb(row(0.71 - 0.1 * lin), 0.1),
        "k_a": g.perturb(np.full((1, 1, C), 1.02), 0.1),
        "r_k": g.perturb(np.full((H, N), -0.04), 0.1),
        "receptance.weight": g.matrix(C, C),
        "key.weight": g.matrix(C, C),
        "value.weight": g.matrix(C, C),
        "output.weight": g.matrix(C, C),
        "ln_x.weight": g.ln_weight(C, ((1 + l) / L) ** 0.7),
        "ln_x.bias": g.ln_bias(C),
    }
    if not keep_v:
        for k in ("v0", "v1", "v2"):
            del att[k]
    ffn = {
        "x_k": g.perturb(1 - d ** (r1**4), 0.05),
        "key.weight": g.matrix(F, C),
        "value.weight": g.matrix(C, F),
    }
    return {"att": att, "ffn": ffn}


def _build_arrays(version, n_layer, n_embd, vocab_size, head_size, dim_ffn, seed, with_layer0_v, lora_dims):
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"version must be one of {SUPPORTED_VERSIONS}, got {version!r}")
    if n_layer < 1 or n_embd < 1 or vocab_size < 1:
        raise ValueError("n_layer, n_embd and vocab_size must be positive")
    C = A = n_embd
    L = n_layer
    F = default_dim_ffn(version, C) if dim_ffn is None else int(dim_ffn)
    H = N = 0
    if version >= 5:
        if head_size < 1 or A % head_size:
            raise ValueError(f"n_embd={A} must be a multiple of head_size={head_size}")
        H, N = A // head_size, head_size
    dims = default_lora_dims(version, C)
    if lora_dims:
        unknown = set(lora_dims) - set(dims)
        if unknown:
            raise ValueError(f"unknown lora_dims keys {sorted(unknown)} for v{version}; valid: {sorted(dims)}")
        dims.update({k: int(v) for k, v in lora_dims.items()})

    g = _Gen(seed)
    out: dict[str, np.ndarray] = {}
    # Embedding: a trained-model scale (the LayerNorm ln0 right after it sees O(1) rows; the
    # training init of 1e-4 would sit below LN's eps and make ln0 degenerate).
    out["emb.weight"] = g.normal((vocab_size, C), 1.0)
    for l in range(L):
        p = f"blocks.{l}."
        # Block registration order: ln1, ln2, (ln0 in layer 0), att, ffn.
        out[p + "ln1.weight"] = g.ln_weight(C)
        out[p + "ln1.bias"] = g.ln_bias(C)
        out[p + "ln2.weight"] = g.ln_weight(C)
        out[p + "ln2.bias"] = g.ln_bias(C)
        if l == 0:
            out[p + "ln0.weight"] = g.ln_weight(C)
            out[p + "ln0.bias"] = g.ln_bias(C)
        if version == 4:
            parts = _v4_layer(g, l, L, C, A, F)
        elif version == 5:
            parts = _v5_layer(g, l, L, C, A, F, H, N)
        elif version == 6:
            parts = _v6_layer(g, l, L, C, A, F, H, N, dims)
        else:
            parts = _v7_layer(g, l, L, C, F, H, N, dims, keep_v=(l > 0 or with_layer0_v))
        for sub in ("att", "ffn"):
            for k, v in parts[sub].items():
                out[f"{p}{sub}.{k}"] = v
    out["ln_out.weight"] = g.ln_weight(C)
    out["ln_out.bias"] = g.ln_bias(C)
    out["head.weight"] = g.matrix(vocab_size, C)
    return out


def make_official_checkpoint(
    path,
    version: int,
    *,
    n_layer: int,
    n_embd: int,
    vocab_size: int,
    head_size: int = 64,
    dim_ffn: int | None = None,
    dtype: str = "fp32",
    seed: int = 0,
    with_layer0_v: bool = True,
    lora_dims: dict | None = None,
) -> dict[str, np.ndarray]:
    """Write a random official-format state_dict .pth (torch.save of a dict of torch tensors, exactly
    the keys, shapes and key order of released BlinkDL checkpoints) for version 4, 5 (5.2 = x052),
    6 (x060) or 7 (x070), in fp32 or bf16, and return the same tensors as float32 numpy arrays
    (bf16 values upcast exactly), in the file's key order.

    ``dim_att == n_embd``. ``dim_ffn`` defaults to 4C (v4, v7) or int(3.5C)//32*32 (v5, v6).
    ``lora_dims``: v6 keys ``mix`` (D_mix, default 32), ``decay`` (D_dec, default 64); v7 keys
    ``w``, ``a``, ``v``, ``g`` (default from the spec 9.4 formulas). ``with_layer0_v=False`` drops
    ``blocks.0.att.v0/v1/v2`` (v7), as in released v7 files.
    Note: the package misdetects a 1-layer v5.2 file as 5.1 (spec 13.3 detection depends on key
    order); :func:`run_official` refuses to return results for it. Use n_layer >= 2 for v5.

    Values: official init formulas for decays, bonuses and mixes plus random perturbations;
    Linear weights N(0, 1/fan_in); LayerNorm/GroupNorm weights around their init (1, or
    ((1+l)/L)^0.7 for ln_x) with noise 0.1, biases N(0, 0.05^2); LoRA factors with std
    0.5/sqrt(fan_in) (v7 ``g2``: 1/sqrt(fan_in)); embedding N(0, 1). The file is written in the
    requested dtype; the returned arrays are that file's tensors upcast to float32.
    """
    import torch  # only needed here; the package itself is never imported in this process

    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    tdtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    arrays = _build_arrays(version, n_layer, n_embd, vocab_size, head_size, dim_ffn, seed, with_layer0_v, lora_dims)
    tensors = {}
    result = {}
    for k, v in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(tdtype).contiguous()
        tensors[k] = t
        result[k] = t.float().numpy().copy()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(tensors, path)
    return result


# --------------------------------------------------------------------------------------------
# Running the package
# --------------------------------------------------------------------------------------------


def _child_env(version: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("RWKV_V7_ON", "RWKV_DE_VERSION", "RWKV_RESCALE_LAYER", "RWKV_DML_ON"):
        env.pop(k, None)
    env["RWKV_JIT_ON"] = "1"
    env["RWKV_CUDA_ON"] = "0"
    if version == 7:
        env["RWKV_V7_ON"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONSTARTUP", None)
    return env


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.symlink(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def run_official_many(
    path,
    version: int,
    jobs: Sequence[tuple[Sequence[int], Sequence[np.ndarray] | None]],
    *,
    timeout: float = 600.0,
    expect_detected: float | None = None,
) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Like :func:`run_official` for several independent ``(tokens, state)`` jobs that share one
    subprocess and one model load (each job starts from its own given state or the zero state).
    ``expect_detected`` replaces the version the package must detect (e.g. 5.0 or 5.1 for the
    RWKV-5 previews; default: 4.0, 5.2, 6.0 or 7.0). A job state of ``None`` is the package's
    default initial state (zero, or a state-tuned file's ``time_state``)."""
    global LAST_RUN_SECONDS
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"version must be one of {SUPPORTED_VERSIONS}, got {version!r}")
    src = os.path.abspath(os.fspath(path))
    if not os.path.isfile(src):
        raise FileNotFoundError(src)
    specs = []
    payloads = []
    for tokens, state in jobs:
        toks = np.asarray([int(t) for t in tokens], dtype=np.int64)
        if toks.ndim != 1 or toks.size == 0:
            raise ValueError("tokens must be a non-empty list of ints")
        arrs = {"tokens": toks}
        if state is not None:
            for i, s in enumerate(state):
                arrs[f"state_{i}"] = np.ascontiguousarray(np.asarray(s, dtype=np.float32))
        specs.append({"n_state": None if state is None else len(state)})
        payloads.append(arrs)

    with tempfile.TemporaryDirectory(prefix="rwkv_official_") as job_dir:
        # The v7 class always appends '.pth' to the name it is given; the legacy class accepts
        # either. A link named model.pth serves both whatever the caller's file is called.
        _link_or_copy(src, os.path.join(job_dir, "model.pth"))
        for j, arrs in enumerate(payloads):
            np.savez(os.path.join(job_dir, f"in_{j}.npz"), **arrs)
        with open(os.path.join(job_dir, "job.json"), "w") as f:
            json.dump({"version": version, "jobs": specs, "expect_detected": expect_detected}, f)
        cmd = [sys.executable, "-c", _BOOT, os.path.abspath(__file__), job_dir]
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd,
            cwd=job_dir,
            env=_child_env(version),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        LAST_RUN_SECONDS = time.perf_counter() - t0
        if proc.returncode != 0 or not os.path.exists(os.path.join(job_dir, "done")):
            raise RuntimeError(
                f"official rwkv package failed (v{version}, rc={proc.returncode}) on {src}\n"
                f"--- stderr (tail) ---\n{proc.stderr[-6000:]}\n--- stdout (tail) ---\n{proc.stdout[-2000:]}"
            )
        results = []
        for j in range(len(payloads)):
            with np.load(os.path.join(job_dir, f"out_{j}.npz")) as z:
                logits = np.array(z["logits"], dtype=np.float32)
                n = int(z["n_state"])
                state = [np.array(z[f"state_{i}"], dtype=np.float32) for i in range(n)]
            results.append((logits, state))
    return results


def run_official(
    path, version: int, tokens: list[int], state: list[np.ndarray] | None = None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run the official package (strategy 'cpu fp32') on `tokens` in sequence mode with
    full_output=True (for a single token the package's one-token path) and return
    (logits [T, V] float32, final state as a list of float32 numpy arrays in the package's own
    order/layout; see the module docstring). ``state`` (same layout) is the initial state, or
    None for the package's zero state (v4 pp = -1e30)."""
    return run_official_many(path, version, [(tokens, state)])[0]


# --------------------------------------------------------------------------------------------
# Worker (runs in the child process only)
# --------------------------------------------------------------------------------------------


def _worker_main(job_dir: str) -> None:
    import torch

    torch.set_grad_enabled(False)
    with open(os.path.join(job_dir, "job.json")) as f:
        spec = json.load(f)
    version = int(spec["version"])
    if (os.environ.get("RWKV_V7_ON") == "1") != (version == 7):
        raise RuntimeError("RWKV_V7_ON does not match the requested version")

    from rwkv.model import RWKV  # import-time configuration comes from the env set by the parent

    model_base = os.path.join(job_dir, "model")
    if version == 7:
        model = RWKV(model=model_base, strategy="cpu fp32")  # appends '.pth' itself
        detected = 7.0
        n_layer = model.n_layer
        per_layer = 3
    else:
        model = RWKV(model=model_base + ".pth", strategy="cpu fp32", verbose=False)
        detected = float(model.version)
        n_layer = model.args.n_layer
        per_layer = 5 if version == 4 else 3
    expected = spec.get("expect_detected") or _EXPECTED_DETECTED[version]
    if abs(detected - expected) > 1e-6:
        hint = ""
        if version == 5 and n_layer == 1:
            hint = (" (the package's detection loop only upgrades to 5.2 at an att.time_decay key seen"
                    " after some ln_x/gate key; with released key order that first happens in layer 1,"
                    " so 1-layer v5.2 files are misread as 5.1 with N=1 heads)")
        raise RuntimeError(
            f"package detected v{detected} but v{version} (expected {expected}) was requested{hint}"
        )

    for j, job in enumerate(spec["jobs"]):
        with np.load(os.path.join(job_dir, f"in_{j}.npz")) as z:
            tokens = [int(t) for t in z["tokens"]]
            n_state = job["n_state"]
            if n_state is None:
                state = None
            else:
                if n_state != per_layer * n_layer:
                    raise ValueError(f"state has {n_state} entries, expected {per_layer * n_layer}")
                state = [torch.from_numpy(np.array(z[f"state_{i}"], dtype=np.float32)).contiguous() for i in range(n_state)]
        logits, new_state = model.forward(tokens, state, full_output=True)
        logits = logits.detach().float().cpu().numpy().reshape(len(tokens), -1)
        out = {"logits": logits, "n_state": np.int64(len(new_state))}
        for i, s in enumerate(new_state):
            out[f"state_{i}"] = s.detach().float().cpu().contiguous().numpy().copy()
        np.savez(os.path.join(job_dir, f"out_{j}.npz"), **out)
    with open(os.path.join(job_dir, "done"), "w") as f:
        f.write("ok")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == _WORKER_FLAG:
    try:
        _worker_main(sys.argv[2])
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
