"""Triton kernels of the flash backend's CUDA path (see ``flash.py``): one launch each.

* ``merge_``: completion rows hold the causal part's output and LSE; the cross part's (over the
  group's prompt) is merged in place through the log-sum-exps:
  ``l = log(e^l1 + e^l2)``, ``o = e^(l1-l) o1 + e^(l2-l) o2`` (fp32 arithmetic).
* ``add_rows_``: the backward's accumulation: the cross call's dQ into the completion rows and its
  dK/dV into the prompt rows (fp32 sums, one rounding to the gradient's dtype).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyfastrl.kernels.launch_target import tile_target


def _block_m(device: torch.device) -> int:
    return 16 if tile_target(device) == "interpreter" else 64


@triton.jit
def _merge_kernel(OUT, LSE, CROSS_OUT, CROSS_LSE, ROWS, num_rows,
                  stride_ot, stride_oh, stride_lh, stride_ct, stride_ch, stride_clh,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    head = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < num_rows
    mask = m_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = tl.load(ROWS + offs_m, mask=m_valid, other=0)
    l1 = tl.load(LSE + head * stride_lh + rows, mask=m_valid, other=0.0).to(tl.float32)
    l2 = tl.load(CROSS_LSE + head * stride_clh + offs_m, mask=m_valid, other=0.0).to(tl.float32)
    top = tl.maximum(l1, l2)
    lse = top + tl.log(tl.exp(l1 - top) + tl.exp(l2 - top))
    out_ptrs = OUT + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    o1 = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    o2 = tl.load(CROSS_OUT + offs_m[:, None] * stride_ct + head * stride_ch + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    merged = tl.exp(l1 - lse)[:, None] * o1 + tl.exp(l2 - lse)[:, None] * o2
    tl.store(out_ptrs, merged.to(OUT.dtype.element_ty), mask=mask)
    tl.store(LSE + head * stride_lh + rows, lse, mask=m_valid)


def merge_(out: torch.Tensor, lse: torch.Tensor, cross_out: torch.Tensor, cross_lse: torch.Tensor,
           rows: torch.Tensor) -> None:
    """Merge ``cross_out (N, H, D)`` / ``cross_lse (H, N)`` into rows ``rows (N,)`` of ``out (T, H, D)``
    / ``lse (H, T)`` (float32) in place. Head dims must have unit stride."""
    num_rows, num_heads, head_dim = cross_out.shape
    if num_rows == 0:
        return
    block_m = _block_m(out.device)
    grid = (triton.cdiv(num_rows, block_m), num_heads)
    _merge_kernel[grid](out, lse, cross_out, cross_lse, rows, num_rows,
                        out.stride(0), out.stride(1), lse.stride(0), cross_out.stride(0), cross_out.stride(1),
                        cross_lse.stride(0), HEAD_DIM=head_dim, BLOCK_M=block_m,
                        BLOCK_D=triton.next_power_of_2(head_dim))


@triton.jit
def _add_tile(DST, SRC, ROWS, block, num_rows, head, stride_dt, stride_dh, stride_st, stride_sh,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < num_rows
    mask = m_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = tl.load(ROWS + offs_m, mask=m_valid, other=0)
    dst_ptrs = DST + rows[:, None] * stride_dt + head * stride_dh + offs_d[None, :]
    total = tl.load(dst_ptrs, mask=mask, other=0.0).to(tl.float32) + tl.load(
        SRC + offs_m[:, None] * stride_st + head * stride_sh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(dst_ptrs, total.to(DST.dtype.element_ty), mask=mask)


@triton.jit
def _add_rows_kernel(DQ, CROSS_DQ, Q_ROWS, num_q_rows, q_blocks,
                     DK, DV, CROSS_DK, CROSS_DV, K_ROWS, num_k_rows, num_kv_heads,
                     stride_dqt, stride_dqh, stride_cqt, stride_cqh,
                     stride_dkt, stride_dkh, stride_ckt, stride_ckh,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Programs ``0..q_blocks-1`` add dQ row blocks (every query head); the rest add dK and dV row
    blocks (kv heads only)."""
    block = tl.program_id(0)
    head = tl.program_id(1)
    if block < q_blocks:
        _add_tile(DQ, CROSS_DQ, Q_ROWS, block, num_q_rows, head, stride_dqt, stride_dqh, stride_cqt, stride_cqh,
                  HEAD_DIM, BLOCK_M, BLOCK_D)
    elif head < num_kv_heads:
        block -= q_blocks
        _add_tile(DK, CROSS_DK, K_ROWS, block, num_k_rows, head, stride_dkt, stride_dkh, stride_ckt, stride_ckh,
                  HEAD_DIM, BLOCK_M, BLOCK_D)
        _add_tile(DV, CROSS_DV, K_ROWS, block, num_k_rows, head, stride_dkt, stride_dkh, stride_ckt, stride_ckh,
                  HEAD_DIM, BLOCK_M, BLOCK_D)


def add_rows_(dq, cross_dq, q_rows, dk, dv, cross_dk, cross_dv, k_rows) -> None:
    """``dq[q_rows] += cross_dq``, ``dk[k_rows] += cross_dk``, ``dv[k_rows] += cross_dv`` in one
    launch (rows distinct within each index; fp32 sums). ``dq (T, Hq, D)``, ``dk, dv (T, Hkv, D)``
    (same strides), ``cross_dq (Nq, Hq, D)``, ``cross_dk, cross_dv (Nk, Hkv, D)`` (same strides)."""
    num_q_rows, num_heads, head_dim = cross_dq.shape
    num_k_rows, num_kv_heads, _ = cross_dk.shape
    if dk.stride() != dv.stride() or cross_dk.stride() != cross_dv.stride():
        raise ValueError("add_rows_: dk/dv and cross_dk/cross_dv must share strides")
    block_m = _block_m(dq.device)
    q_blocks = triton.cdiv(num_q_rows, block_m)
    grid = (q_blocks + triton.cdiv(num_k_rows, block_m), num_heads)
    _add_rows_kernel[grid](dq, cross_dq, q_rows, num_q_rows, q_blocks,
                           dk, dv, cross_dk, cross_dv, k_rows, num_k_rows, num_kv_heads,
                           dq.stride(0), dq.stride(1), cross_dq.stride(0), cross_dq.stride(1),
                           dk.stride(0), dk.stride(1), cross_dk.stride(0), cross_dk.stride(1),
                           HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_D=triton.next_power_of_2(head_dim))
