"""Every Pallas GPU kernel compiles to an sm_90 (H100/H200) cubin, checked without a GPU.

The export tests only prove the jaxpr -> Triton IR lowering. Here each kernel's Triton module
goes through the ``triton`` package's whole pipeline down to ``ptxas`` (experiments/
triton_compile_check.py), which catches what the device compiler would reject: dot shapes,
layouts, shared memory over the per-block limit. Needs ``pip install triton==3.8.0`` (installed by
.ci/run for the slow tier; skipped without it).
"""

import re

import jax.numpy as jnp
import pytest

pytest.importorskip("triton")

from experiments.triton_compile_check import compile_module, kernel_modules  # noqa: E402

pytestmark = pytest.mark.slow

# sm_90's largest dynamic shared memory per block (227 KiB, opt-in).
SM90_SHARED_LIMIT = 227 * 1024
# A dot on data at one TF32 pass ("tf32" not followed by "x3").
SINGLE_PASS_TF32 = re.compile(r"inputPrecision = tf32(?!x3)")

KERNELS = {7: 4, 6: 4, 4: 2}  # forward + backward kernels per version
# Stack frame (mostly register spills) per thread allowed for the v7 kernels at their default
# chunk: at most 1,336 B with this ptxas; fp32 inputs at 32-token chunks, the old default, made
# ptxas fall back to 32 registers and a 12,984 B stack in the gradient kernel.
V7_STACK_LIMIT = 2048


@pytest.mark.parametrize(
    "version, dim, dtype",
    [
        (7, 64, jnp.bfloat16), (7, 32, jnp.bfloat16), (7, 64, jnp.float32),
        (6, 64, jnp.bfloat16), (6, 32, jnp.float32),
        (4, 64, jnp.bfloat16),
    ],
)
def test_kernels_compile_for_sm90(version, dim, dtype):
    modules = kernel_modules(version, batch=1, seq_len=128, heads=2, dim=dim, dtype=dtype)
    assert len(modules) == KERNELS[version]
    for module in modules:
        resources = compile_module(module, arch=90)  # raises on any compiler error
        assert 0 < resources.registers <= 255, module.name
        assert resources.shared_bytes <= SM90_SHARED_LIMIT, module.name
        if version == 7:
            assert resources.stack_bytes <= V7_STACK_LIMIT, (module.name, resources)
        # fp32 inputs never meet a single TF32 pass (they get TF32x3, ≈ fp32); bf16 inputs do.
        single_pass = bool(SINGLE_PASS_TF32.search(module.ir))
        if dtype == jnp.float32:
            assert not single_pass, module.name
    if dtype == jnp.bfloat16 and version != 4:  # the v4 kernels have no dots
        assert any(SINGLE_PASS_TF32.search(module.ir) for module in modules)
