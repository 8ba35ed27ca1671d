"""Programmatic dependent launch inside a Triton kernel (kernels/__init__.py `pdl`; imported only where triton is)."""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """A kernel launched with launch_pdl: wait until the kernel before it has finished (its writes visible),
    then let the kernel after it launch. Call it first, before any load or early return: every program of a
    PDL-launched kernel must wait, or a kernel two launches on could start before this one's input is ready."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
