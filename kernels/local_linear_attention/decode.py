"""Triton decode kernels of local linear attention: one new query per sequence over its KV cache.

Per (sequence b, query head h), with ``n = cache_seqlens[b]`` cached keys (the query's own included):

1. ``_stats_kernel``: one sweep over the keys for the online softmax (max, ``omega``) and
   ``kbar = sum_j p_j k_j``, a second sweep for the centred covariance
   ``C = sum_j p_j (k_j - kbar)(k_j - kbar)^T`` (a D x D fp32 accumulator, ``tl.dot`` in IEEE fp32).
   Centring before the products keeps ``C`` accurate relative to itself, where raw moments
   ``sum p k k^T - kbar kbar^T`` would cancel to an error of ``eps |k|^2``.
2. The D x D systems ``(C + lambda I) eta = q - kbar``, one per (b, h), by a batched float64
   Cholesky solve in PyTorch (``reference.ridge_cholesky``: a non-positive-definite system is an error
   on the CPU and NaN outputs on a GPU, without a host synchronisation).
3. ``_output_kernel``: one sweep over keys and values, ``o = sum_j p_j (1 + eta.(k_j - kbar)) v_j``.

Head dims up to 128 (any size: padded to a power of two >= 16); fp16, bf16 and fp32 caches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyfastrl.kernels.launch_target import tile_target
from pyfastrl.kernels.local_linear_attention import reference

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128

# (key block, warps) per tile target and padded head dim: the largest key blocks whose sm90 build
# (triton.compile, cuobjdump -res-usage) uses no stack under Triton 3.6 and 3.8: at D <= 64 32 keys
# and 8 warps (64-114 registers a thread); at D = 128 16 keys (tl.dot's minimum) and 16 warps
# (82-89 registers: the D x D fp32 accumulator is 32 a thread), where 8 warps took 122 registers
# under 3.8 and spilled 24 bytes to the stack under 3.6. Not timed on a GPU.
def _tiles(target: str, block_d: int) -> tuple[int, int]:
    if target == "interpreter":
        return 16, 1
    return (32, 8) if block_d <= 64 else (16, 16)


@triton.jit
def _load_keys(base, n0, length, stride_t, offs_d, head_dim, BLOCK_N: tl.constexpr):
    """A (BLOCK_N, BLOCK_D) tile of one head's cache rows n0.., zero past ``length`` and ``head_dim``."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask = (offs_n[:, None] < length) & (offs_d[None, :] < head_dim)
    tile = tl.load(base + offs_n[:, None] * stride_t + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    return tile, offs_n < length


@triton.jit
def _stats_kernel(
    q_ptr, k_ptr, seqlens_ptr, kbar_ptr, cov_ptr, lse_ptr,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh,
    num_heads, head_dim, scale,
    REP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_heads
    h = pid % num_heads
    length = tl.load(seqlens_ptr + b)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=offs_d < head_dim, other=0.0).to(tl.float32)
    k_base = k_ptr + b * stride_kb + (h // REP) * stride_kh

    row_max = tl.full([], float("-inf"), tl.float32)
    omega = tl.zeros([], tl.float32)
    key_sum = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(0, length, BLOCK_N):
        keys, valid = _load_keys(k_base, n0, length, stride_kt, offs_d, head_dim, BLOCK_N)
        scores = tl.where(valid, tl.sum(keys * q[None, :], 1) * scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 0))
        rescale = tl.exp(row_max - new_max)
        weights = tl.exp(scores - new_max)
        omega = omega * rescale + tl.sum(weights, 0)
        key_sum = key_sum * rescale + tl.sum(weights[:, None] * keys, 0)
        row_max = new_max
    kbar = key_sum / omega

    cov = tl.zeros([BLOCK_D, BLOCK_D], tl.float32)
    for n0 in range(0, length, BLOCK_N):
        keys, valid = _load_keys(k_base, n0, length, stride_kt, offs_d, head_dim, BLOCK_N)
        scores = tl.sum(keys * q[None, :], 1) * scale
        p = tl.where(valid, tl.exp(scores - row_max) / omega, 0.0)
        centred = tl.where(valid[:, None] & (offs_d[None, :] < head_dim), keys - kbar[None, :], 0.0)
        cov += tl.dot(tl.trans(centred * p[:, None]), centred, input_precision="ieee")

    out_row = b * num_heads + h
    tl.store(kbar_ptr + out_row * head_dim + offs_d, kbar, mask=offs_d < head_dim)
    cov_mask = (offs_d[:, None] < head_dim) & (offs_d[None, :] < head_dim)
    tl.store(cov_ptr + out_row * head_dim * head_dim + offs_d[:, None] * head_dim + offs_d[None, :], cov, mask=cov_mask)
    tl.store(lse_ptr + out_row, row_max + tl.log(omega))


@triton.jit
def _output_kernel(
    q_ptr, k_ptr, v_ptr, seqlens_ptr, kbar_ptr, eta_ptr, lse_ptr, out_ptr,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_oh, num_heads, head_dim, scale,
    REP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_heads
    h = pid % num_heads
    length = tl.load(seqlens_ptr + b)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < head_dim
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=dmask, other=0.0).to(tl.float32)
    row = b * num_heads + h
    kbar = tl.load(kbar_ptr + row * head_dim + offs_d, mask=dmask, other=0.0)
    eta = tl.load(eta_ptr + row * head_dim + offs_d, mask=dmask, other=0.0)
    lse = tl.load(lse_ptr + row)
    k_base = k_ptr + b * stride_kb + (h // REP) * stride_kh
    v_base = v_ptr + b * stride_vb + (h // REP) * stride_vh
    p_sum = tl.zeros([], tl.float32)
    pd_sum = tl.zeros([], tl.float32)
    pv_sum = tl.zeros([BLOCK_D], tl.float32)
    pdv_sum = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(0, length, BLOCK_N):
        keys, valid = _load_keys(k_base, n0, length, stride_kt, offs_d, head_dim, BLOCK_N)
        values, _ = _load_keys(v_base, n0, length, stride_vt, offs_d, head_dim, BLOCK_N)
        p = tl.where(valid, tl.exp(tl.sum(keys * q[None, :], 1) * scale - lse), 0.0)
        d = tl.sum((keys - kbar[None, :]) * eta[None, :], 1)  # eta.(k_j - kbar)
        p_sum += tl.sum(p, 0)
        pd_sum += tl.sum(p * d, 0)
        pv_sum += tl.sum(p[:, None] * values, 0)
        pdv_sum += tl.sum((p * d)[:, None] * values, 0)
    # o = sum_j p_j (1 + d_j - dbar) v_j: dbar (0 in exact arithmetic) removed, since the rounding of
    # kbar shifts every d_j by one amount, which eta (large where the keys barely vary) makes large.
    vbar = pv_sum / p_sum
    out = vbar + pdv_sum / p_sum - (pd_sum / p_sum) * vbar
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=dmask)


def decode(q, k_cache, v_cache, cache_seqlens, ridge, scale: float):
    """``q (B, Hq, D)``, ``k_cache, v_cache (B, T_max, Hkv, D)`` (unit-stride head dim),
    ``cache_seqlens (B,)`` int32, ``ridge (Hq,)``. Returns ``(B, Hq, D)`` in q's dtype."""
    batch, num_heads, head_dim = q.shape
    rep = num_heads // k_cache.shape[2]
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n, warps = _tiles(tile_target(q.device), block_d)
    kbar = torch.empty((batch, num_heads, head_dim), dtype=torch.float32, device=q.device)
    cov = torch.empty((batch, num_heads, head_dim, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, num_heads), dtype=torch.float32, device=q.device)
    grid = (batch * num_heads,)
    common = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    _stats_kernel[grid](q, k_cache, cache_seqlens, kbar, cov, lse, *common, num_heads, head_dim, scale,
                        REP=rep, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)

    eye = torch.eye(head_dim, dtype=torch.float64, device=q.device)
    matrix = cov.double() + ridge.double().view(num_heads, 1, 1) * eye
    cholesky = reference.ridge_cholesky(matrix, lambda i: f"sequence {i[0]}, query head {i[1]} (decode)")
    eta = torch.cholesky_solve((q.double() - kbar.double())[..., None], cholesky)[..., 0].float().contiguous()

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _output_kernel[grid](q, k_cache, v_cache, cache_seqlens, kbar, eta, lse, out, *common,
                         v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
                         num_heads, head_dim, scale, REP=rep, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    return out
