"""CUDA decode kernel of local linear attention (the ``"cuda"`` backend of
``local_linear_attention_decode``, ``csrc/lla_decode``); same contract as ``decode.decode`` (Triton)
and ``reference.decode`` (float64).

One thread block per (sequence, query head), the whole computation in it: a sweep over the keys for
the online softmax and ``kbar``, a sweep for the centred covariance ``C`` (fp32, in registers),
the Cholesky factorisation of ``C + lambda I`` and the two triangular solves for ``eta`` in float64
in shared memory, a sweep over keys and values for the output. No workspace, no second launch, no
host synchronisation, no atomics (deterministic). The arithmetic is in
``csrc/lla_decode/lla_decode_math.h``, which the tests also compile for the host and check on CPU
against the float64 reference. Accuracy as the Triton decode's (fp32 sums, float64 solve): a system
that is not numerically positive definite gives NaN outputs for its head, a length outside
``1..T_max`` NaN (0) or the first ``T_max`` tokens.

Not yet run on a GPU: ``backend="auto"`` does not choose it.
"""
from __future__ import annotations

import torch

from pyfastrl.kernels import cuda_extension

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128  # csrc/lla_decode/lla_decode_math.h kMaxHeadDim


def strides(q, k_cache, v_cache, out) -> tuple[int, ...]:
    """The kernel's 10 element strides: q (b, h), k_cache (b, t, h), v_cache (b, t, h), out (b, h)."""
    return (*q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:2])


def decode(q, k_cache, v_cache, cache_seqlens, ridge, scale: float) -> torch.Tensor:
    """``q (B, Hq, D)``, ``k_cache, v_cache (B, T_max, Hkv, D)`` (one dtype of SUPPORTED_DTYPES, unit
    stride along D, any other strides), ``cache_seqlens (B,)`` int32, ``ridge (Hq,)`` float32, all on
    one CUDA device, ``D <= MAX_HEAD_DIM`` (the op checks these). Returns ``(B, Hq, D)`` in q's dtype."""
    batch, num_heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    seqlens, ridge = cache_seqlens.contiguous(), ridge.to(torch.float32).contiguous()
    with torch.cuda.device(q.device):
        cuda_extension.module().lla_decode(
            cuda_extension.DTYPE_CODES[q.dtype], q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
            seqlens.data_ptr(), ridge.data_ptr(), out.data_ptr(), batch, num_heads, k_cache.shape[2],
            k_cache.shape[1], head_dim, strides(q, k_cache, v_cache, out), float(scale),
            torch.cuda.current_stream(q.device).cuda_stream)
    return out
