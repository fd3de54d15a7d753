"""Triton kernels of prefix-grouped attention (the ``"triton"`` backend).

Three launches, each over a block table precomputed on the ``PrefixGroupLayout``:

* ``_forward_kernel`` (query block x query head): online softmax over the group's prefix keys (no
  mask) and then the block's own segment (causal); writes the output and the natural-log LSE.
* ``_backward_dkdv_kernel`` (key block x kv head): for a prefix key block it walks the contiguous
  query range "prefix rows after it, then every member's suffix" of its group, so the sum of the
  prefix gradient over members happens in registers: no prefix K/V copies, no atomics. The query
  heads sharing a kv head (GQA) are summed in the same program.
* ``_backward_dq_kernel`` (query block x query head): the forward's iteration, recomputing the
  probabilities from the saved LSE.

``delta = rowsum(dO * O)`` is computed once by ``_backward_delta_kernel``. Accumulation is fp32;
inputs are fp16, bf16 or fp32 (fp32 matmuls use IEEE precision, not TF32). Any head dim that is
a multiple of 16 up to 256 (non powers of two are masked up to the next one).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyfastrl.kernels.attention_common import INTERPRETED, LN2, LOG2E, dot

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def block_sizes(head_dim: int) -> tuple[int, int, int]:
    """Rows per program of (forward, dQ, dK/dV): the block sizes of the layout tables to pass."""
    if INTERPRETED:
        return 16, 16, 16
    if head_dim <= 128:
        return 128, 64, 64
    return 64, 32, 32


def _inner_tile(head_dim: int) -> int:
    """Columns of the tile each program loops over (keys in forward/dQ, queries in dK/dV)."""
    if INTERPRETED:
        return 16
    return 64 if head_dim <= 128 else 32


def _num_warps(head_dim: int) -> int:
    return 4 if head_dim <= 64 else 8


@triton.jit
def _query_block(BLOCKS, Q, stride_qt, stride_qh, head,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's query-block row (see PrefixGroupLayout.query_blocks), its row and head-dim
    offsets and masks, and its query tile."""
    row = BLOCKS + tl.program_id(0) * 5
    q_start = tl.load(row)
    q_end = tl.load(row + 1)
    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_end
    d_valid = offs_d < HEAD_DIM
    q = tl.load(Q + offs_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    return q_end, tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), offs_m, offs_d, m_valid, d_valid, q


@triton.jit
def _key_range(PHASE: tl.constexpr, q_end, causal_start, full_start, full_end):
    """Keys of a query block: phase 0 the group's prefix, seen whole by suffix rows (empty for
    prefix rows); phase 1 the block's own segment up to its last row, causal."""
    if PHASE == 0:
        return full_start, full_end
    return causal_start, q_end


@triton.jit
def _key_tile_mask(PHASE: tl.constexpr, offs_m, offs_n, hi):
    keep = (offs_n < hi)[None, :]
    if PHASE == 1:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    return keep


@triton.jit
def _forward_kernel(
    Q, K, V, O, LSE, BLOCKS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    num_tokens, scale_log2,
    REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    head = tl.program_id(1)
    kv_head = head // REP
    q_end, causal_start, full_start, full_end, offs_m, offs_d, m_valid, d_valid, q = _query_block(
        BLOCKS, Q, stride_qt, stride_qh, head, HEAD_DIM, BLOCK_D, BLOCK_M)
    k_base = K + kv_head * stride_kh + offs_d[:, None]
    v_base = V + kv_head * stride_vh + offs_d[None, :]

    # A finite start keeps exp2(m_old - m_new) at 0, never NaN, for rows whose first tile is masked.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for phase in tl.static_range(2):
        lo, hi = _key_range(phase, q_end, causal_start, full_start, full_end)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_valid = offs_n < hi
            kt = tl.load(k_base + offs_n[None, :] * stride_kt, mask=d_valid[:, None] & n_valid[None, :], other=0.0)
            s = dot(q, kt, PRECISION, UPCAST) * scale_log2
            s = tl.where(_key_tile_mask(phase, offs_m, offs_n, hi), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * stride_vt, mask=n_valid[:, None] & d_valid[None, :], other=0.0)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
            m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + offs_m[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    tl.store(LSE + head * num_tokens + offs_m, (m_i + tl.log2(l_safe)) * LN2, mask=m_valid)


@triton.jit
def _backward_delta_kernel(
    O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, num_tokens,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    head = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < num_tokens)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + offs_m[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * num_tokens + offs_m, delta, mask=offs_m < num_tokens)


@triton.jit
def _backward_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, BLOCKS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    num_tokens, scale, scale_log2,
    REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    row = BLOCKS + tl.program_id(0) * 3
    kv_head = tl.program_id(1)
    k_start = tl.load(row)
    k_end = tl.load(row + 1)
    q_end = tl.load(row + 2)

    offs_n = k_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < k_end
    d_valid = offs_d < HEAD_DIM
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + offs_n[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    for r in range(REP):
        head = kv_head * REP + r
        for m0 in range(k_start, q_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_valid = offs_m < q_end
            qd_mask = m_valid[:, None] & d_valid[None, :]
            q = tl.load(Q + offs_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=qd_mask, other=0.0)
            do = tl.load(DO + offs_m[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                         mask=qd_mask, other=0.0)
            lse = tl.load(LSE + head * num_tokens + offs_m, mask=m_valid, other=0.0)
            delta = tl.load(DELTA + head * num_tokens + offs_m, mask=m_valid, other=0.0)
            s = dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2
            keep = m_valid[:, None] & n_valid[None, :] & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, tl.exp2(s - lse[:, None] * LOG2E), 0.0)
            dv += dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
            dp = dot(do, tl.trans(v), PRECISION, UPCAST)
            ds = p * (dp - delta[:, None])
            dk += dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)

    tl.store(DK + offs_n[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + offs_n[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _backward_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, BLOCKS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    num_tokens, scale, scale_log2,
    REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    head = tl.program_id(1)
    kv_head = head // REP
    q_end, causal_start, full_start, full_end, offs_m, offs_d, m_valid, d_valid, q = _query_block(
        BLOCKS, Q, stride_qt, stride_qh, head, HEAD_DIM, BLOCK_D, BLOCK_M)
    qd_mask = m_valid[:, None] & d_valid[None, :]
    do = tl.load(DO + offs_m[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=qd_mask, other=0.0)
    lse2 = tl.load(LSE + head * num_tokens + offs_m, mask=m_valid, other=0.0) * LOG2E
    delta = tl.load(DELTA + head * num_tokens + offs_m, mask=m_valid, other=0.0)
    k_base = K + kv_head * stride_kh + offs_d[:, None]
    v_base = V + kv_head * stride_vh + offs_d[:, None]
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for phase in tl.static_range(2):
        lo, hi = _key_range(phase, q_end, causal_start, full_start, full_end)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            dn_mask = d_valid[:, None] & (offs_n < hi)[None, :]
            kt = tl.load(k_base + offs_n[None, :] * stride_kt, mask=dn_mask, other=0.0)
            vt = tl.load(v_base + offs_n[None, :] * stride_vt, mask=dn_mask, other=0.0)
            s = dot(q, kt, PRECISION, UPCAST) * scale_log2
            keep = m_valid[:, None] & _key_tile_mask(phase, offs_m, offs_n, hi)
            p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
            ds = p * (dot(do, vt, PRECISION, UPCAST) - delta[:, None])
            dq += dot(ds.to(kt.dtype), tl.trans(kt), PRECISION, UPCAST)

    tl.store(DQ + offs_m[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)


def _common(q: torch.Tensor, k: torch.Tensor):
    head_dim = q.shape[2]
    return dict(
        REP=q.shape[1] // k.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        UPCAST=INTERPRETED,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=_num_warps(head_dim),
    )


def forward(q, k, v, query_blocks, scale: float):
    """Launch the forward. ``query_blocks`` = ``layout.query_blocks(block_sizes(D)[0])``.
    Inputs need unit stride in the head dim. Returns ``out (T, Hq, D)`` and ``lse (Hq, T)`` fp32."""
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((num_heads, num_tokens), dtype=torch.float32, device=q.device)
    grid = (query_blocks.shape[0], num_heads)
    _forward_kernel[grid](
        q, k, v, out, lse, query_blocks,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        num_tokens, scale * LOG2E.value,
        BLOCK_M=block_sizes(head_dim)[0], BLOCK_N=_inner_tile(head_dim), num_stages=2, **_common(q, k),
    )
    return out, lse


def backward(grad_out, q, k, v, out, lse, dq_blocks, dkdv_blocks, scale: float):
    """Launch the backward; the block tables come from ``block_sizes(D)[1:]``. Returns ``(dq, dk, dv)``."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_dq, block_dkdv = block_sizes(head_dim)
    common = _common(q, k)
    delta = torch.empty((num_heads, num_tokens), dtype=torch.float32, device=q.device)
    _backward_delta_kernel[(triton.cdiv(num_tokens, 64), num_heads)](
        out, grad_out, delta, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1), num_tokens,
        HEAD_DIM=head_dim, BLOCK_D=common["BLOCK_D"], BLOCK_M=64,
    )
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    strides = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        grad_out.stride(0), grad_out.stride(1),
    )
    _backward_dkdv_kernel[(dkdv_blocks.shape[0], k.shape[1])](
        q, k, v, grad_out, lse, delta, dk, dv, dkdv_blocks, *strides,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        num_tokens, scale, scale * LOG2E.value,
        BLOCK_M=_inner_tile(head_dim), BLOCK_N=block_dkdv, num_stages=1, **common,
    )
    _backward_dq_kernel[(dq_blocks.shape[0], num_heads)](
        q, k, v, grad_out, lse, delta, dq, dq_blocks, *strides,
        dq.stride(0), dq.stride(1),
        num_tokens, scale, scale * LOG2E.value,
        BLOCK_M=block_dq, BLOCK_N=_inner_tile(head_dim), num_stages=1, **common,
    )
    return dq, dk, dv
