"""Compile every Pallas GPU kernel to NVIDIA machine code without a GPU and print its resources.

``jax.export(..., platforms=["cuda"])`` proves that the kernels lower to Triton IR; XLA turns that
IR into machine code only on the device. This script closes most of that gap from a CPU machine:
it captures the Triton module of every ``pallas_call`` that the forward and gradient of each WKV
kernel lower to, compiles it with the ``triton`` package's own pipeline (TTIR -> TTGIR -> LLVM IR
-> PTX -> ``ptxas``) for ``--arch`` (default sm_90, the H100/H200), and prints per kernel the
dynamic shared memory, registers per thread and stack frame (local memory: mostly register
spills, which slow a kernel down). A compile error here is one the device would hit.

    pip install triton==3.8.0   # optional tool, not a dependency of rwkv-jax
    python experiments/triton_compile_check.py                   # the benchmark shape, bf16
    python experiments/triton_compile_check.py --dtype float32 --versions 7

Caveats: the device compiles with the Triton build inside XLA and the ptxas of its CUDA, which
can allocate registers differently; the numbers are a strong hint, not the device's own.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pallas_kernels.diag import wkv6_pallas  # noqa: E402
from pallas_kernels.dplr import wkv7_pallas  # noqa: E402
from pallas_kernels.platform import TRITON_CUSTOM_CALL, export_ahead_of_time  # noqa: E402
from pallas_kernels.vector import wkv4_pallas  # noqa: E402


@dataclasses.dataclass
class TritonModule:
    name: str
    ir: str  # Triton IR (TTIR), textual
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


@contextlib.contextmanager
def capture_triton_modules():
    """Collects a ``TritonModule`` for every Pallas kernel lowered for "cuda" inside the block."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    modules: list[TritonModule] = []
    pending: list[str] = []
    lower, custom_call = registration.lowering.lower_jaxpr_to_triton_module, registration.mlir.custom_call

    def lower_and_keep(*args, **kwargs):
        result = lower(*args, **kwargs)
        pending.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    def custom_call_and_keep(call_target_name, *args, backend_config=None, **kwargs):
        if call_target_name == TRITON_CUSTOM_CALL:
            number = lambda key: int(str(backend_config[key]).split()[0])  # noqa: E731 - "8 : i32"
            modules.append(TritonModule(
                str(backend_config["name"]).strip('"'), pending.pop(), number("num_warps"),
                number("num_stages"), (number("grid_x"), number("grid_y"), number("grid_z"))))
        return custom_call(call_target_name, *args, backend_config=backend_config, **kwargs)

    registration.lowering.lower_jaxpr_to_triton_module = lower_and_keep
    registration.mlir.custom_call = custom_call_and_keep
    try:
        yield modules
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
        registration.mlir.custom_call = custom_call
    if pending:
        raise RuntimeError(f"{len(pending)} Triton module(s) were lowered but not embedded as "
                           f"{TRITON_CUSTOM_CALL} (jax {jax.__version__})")


def forward_and_gradient(fn, num_args: int):
    """The gradient of a scalar of all of ``fn``'s outputs with respect to its first ``num_args``
    inputs: exporting it lowers every forward kernel (the custom VJP's forward) and backward one."""

    def loss(*args):
        return sum(jnp.sum(x) for x in jax.tree.leaves(fn(*args)))

    return jax.grad(loss, argnums=tuple(range(num_args)))


def kernel_modules(version: int, batch: int, seq_len: int, heads: int, dim: int, dtype) -> list[TritonModule]:
    """The Triton modules of one version's forward and backward kernels at one shape."""
    tokens = jax.ShapeDtypeStruct((batch, seq_len, heads, dim), dtype)
    state = jax.ShapeDtypeStruct((batch, heads, dim, dim), jnp.float32)
    if version == 7:
        kernel, args = functools.partial(wkv7_pallas, platform="gpu"), (*[tokens] * 6, state)
    elif version == 6:
        bonus = jax.ShapeDtypeStruct((heads, dim), jnp.float32)
        kernel, args = functools.partial(wkv6_pallas, platform="gpu"), (*[tokens] * 4, bonus, state)
    elif version == 4:
        channels = heads * dim
        key = jax.ShapeDtypeStruct((batch, seq_len, channels), dtype)
        vector = jax.ShapeDtypeStruct((channels,), jnp.float32)
        vector_state = tuple(jax.ShapeDtypeStruct((batch, channels), jnp.float32) for _ in range(3))
        kernel, args = functools.partial(wkv4_pallas, platform="gpu"), (key, key, vector, vector, vector_state)
    else:
        raise ValueError(f"no Pallas kernel for version {version}")
    with capture_triton_modules() as modules:
        export_ahead_of_time(forward_and_gradient(kernel, len(args)), "gpu", *args)
    return modules


@dataclasses.dataclass
class Resources:
    shared_bytes: int
    registers: int
    stack_bytes: int
    seconds: float


def compile_module(module: TritonModule, arch: int) -> Resources:
    """Compiles ``module`` to a cubin for ``sm_<arch>`` with the ``triton`` package; raises on
    any compiler error."""
    import triton
    from triton.backends.compiler import GPUTarget

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, f"{module.name}.ttir")  # the suffix selects the TTIR parser
        with open(source, "w") as handle:
            handle.write(module.ir)
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": module.num_warps, "num_stages": module.num_stages})
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as handle:
            handle.write(kernel.asm["cubin"])
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
    registers = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return Resources(kernel.metadata.shared, int(registers.group(1)), int(stack.group(1)),
                     time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", type=int, nargs="+", default=[7, 6, 4])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 32], help="head sizes N")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 or 80")
    args = parser.parse_args()
    # A fresh cache, so that the compile column times real compiles, not cache hits.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_compile_check_")
    import triton

    print(f"jax {jax.__version__}, triton {triton.__version__}, sm_{args.arch}, "
          f"B={args.batch} T={args.seq_len} H={args.heads} {args.dtype}\n")
    print("| ver | N | kernel | grid | warps | shared (KiB) | registers | stack (B) | compile (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    failures = 0
    for version in args.versions:
        for dim in args.dims:
            for module in kernel_modules(version, args.batch, args.seq_len, args.heads, dim,
                                         jnp.dtype(args.dtype)):
                row = f"| v{version} | {dim} | {module.name} | {module.grid} | {module.num_warps} |"
                try:
                    res = compile_module(module, args.arch)
                except Exception as error:  # noqa: BLE001 - report every kernel, then fail
                    failures += 1
                    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                    print(f"{row} FAILED: {first_line[:200]} | | | |", flush=True)
                    continue
                print(f"{row} {res.shared_bytes / 1024:.0f} | {res.registers} | {res.stack_bytes} | "
                      f"{res.seconds:.1f} |", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
