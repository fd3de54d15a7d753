"""Pieces shared by the attention kernels (prefix-grouped and local linear attention)."""
import triton
import triton.language as tl

from pyfastrl._backend import triton_interpreting

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Triton's interpreter (3.8, 3.9) multiplies bf16 dot operands as raw uint16 bits and ignores TF32
# modes: under it every product is an upcast IEEE fp32 one. Compiled kernels never take that branch.
INTERPRETED = triton_interpreting()


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """``tl.dot`` with ``input_precision=PRECISION``; upcast IEEE fp32 under the interpreter."""
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)
