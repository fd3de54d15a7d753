"""Triton kernels of local linear attention (the ``"triton"`` backend); formulas in ``reference.py``.

Nothing of size T x T, and no D x D matrix per query, is ever stored. Every solve with
``B_i = C_i + lambda I`` is a Jacobi-preconditioned conjugate gradient whose matrix-vector product is
a sweep over the causal key tiles: ``B d = sum_j p_j (k_j.d) k_j - (kbar.d) kbar + lambda d``. A
query block iterates until every row's residual is below ``tolerance * |rhs|`` (or the cap), so easy
blocks stop early.

Three launches:

* ``_forward_kernel`` (query block x (batch, query head)): a statistics pass (online max, then
  sum p, sum p k, sum p k^2: the lse, kbar and the Jacobi diagonal), the CG solve for ``eta``, and an
  output pass ``o = sum_j p_j a_j v_j``. Saves ``eta``, ``lse`` and each row's final relative residual.
* ``_backward_query_kernel`` (same grid): a statistics pass from the saved lse (kbar, rbar,
  ``sum p r k``), the adjoint CG solve for ``xi``, then a dQ pass. Saves ``xi``, four per-row
  scalars for the key kernel and each row's ``-xi.eta`` (summed into dlambda on the host).
* ``_backward_key_kernel`` (key block x (batch, kv head)): dK and dV over the query tiles at or after
  the block, for every query head sharing the kv head (GQA) in the same program: no atomics.

Accumulation and solves are fp32. Score products use the inputs' dtype (bf16/fp16 on tensor cores,
fp32 as 3xTF32); products with the fp32 solver vectors use 3xTF32, which keeps CG's recurrences at
fp32 accuracy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyfastrl.kernels.attention_common import INTERPRETED, LN2, LOG2E, dot

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128)
# Per-row scalars the query kernel hands to the key kernel, in this order.
ROW_STATS = ("rbar", "eta_kbar", "xi_kbar", "cbar")


def _tiles(head_dim: int) -> tuple[int, int, int]:
    """(query rows per program, key columns per tile, warps). The solver keeps ~8 fp32 (rows x D)
    vectors live, so wide heads take fewer rows."""
    if INTERPRETED:
        return 16, 16, 4
    if head_dim <= 64:
        return 64, 32, 4
    return 32, 32, 8


@triton.jit
def _rows(base, offs_m, stride_t, offs_d, m_valid):
    """Load rows offs_m of a (T, D) slice as fp32 (zeros beyond T)."""
    return tl.load(base + offs_m[:, None] * stride_t + offs_d[None, :], mask=m_valid[:, None], other=0.0).to(tl.float32)


@triton.jit
def _query_block(Q, stride_qb, stride_qt, stride_qh, num_tokens, num_heads,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's query rows (grid: query block x (batch, query head)), their causal key end
    ``hi`` and the query tile (zeros past T)."""
    block = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = batch_head // num_heads
    head = batch_head % num_heads
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < num_tokens
    hi = tl.minimum((block + 1) * BLOCK_M, num_tokens)
    q = tl.load(Q + b * stride_qb + head * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=m_valid[:, None], other=0.0)
    return block, batch_head, b, head, offs_m, offs_d, m_valid, hi, q


@triton.jit
def _key_tile(base, stride_t, offs_n, offs_d, hi):
    """Rows offs_n (< hi) of a (T, D) key or value slice, in its own dtype (zeros past hi)."""
    return tl.load(base + offs_n[:, None] * stride_t + offs_d[None, :], mask=(offs_n < hi)[:, None], other=0.0)


@triton.jit
def _probs(q, k, offs_m, offs_n, lse2, scale_log2, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """Causal softmax probabilities (rows x keys) of a key tile from the rows' log2-sum-exp."""
    s = dot(q, tl.trans(k), PRECISION, INTERPRETED) * scale_log2
    return tl.where(offs_n[None, :] <= offs_m[:, None], tl.exp2(s - lse2[:, None]), 0.0)


@triton.jit
def _ridge_matvec(d, q, kbar, ridge, lse2, k_base, stride_kt, offs_m, offs_d, hi, scale_log2,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """``B_i d_i`` for every row i of the block: one sweep over the causal keys 0..hi-1."""
    acc = tl.zeros(d.shape, tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _key_tile(k_base, stride_kt, offs_n, offs_d, hi)
        p = _probs(q, k, offs_m, offs_n, lse2, scale_log2, PRECISION, INTERPRETED)
        k32 = k.to(tl.float32)
        projection = dot(d, tl.trans(k32), "tf32x3", INTERPRETED)
        acc += dot(p * projection, k32, "tf32x3", INTERPRETED)
    return acc - tl.sum(kbar * d, 1)[:, None] * kbar + ridge * d


@triton.jit
def _solve(rhs, diag, m_valid, q, kbar, ridge, lse2, k_base, stride_kt, offs_m, offs_d, hi, scale_log2,
           tol2, max_iterations,
           BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """Jacobi-preconditioned CG for ``B_i x_i = rhs_i``, all rows of the block together; a row stops
    (its step sizes become 0) once ``|r|^2 <= tol2 |rhs|^2``, the block once every row has.
    Returns the solution, each row's relative residual and the iterations run."""
    x = tl.zeros(rhs.shape, tl.float32)
    r = rhs
    z = r / diag
    d = z
    rz = tl.sum(r * z, 1)
    rhs2 = tl.sum(rhs * rhs, 1)
    res2 = rhs2
    active = m_valid & (res2 > tol2 * rhs2)
    iterations = tl.full([], 0, tl.int32)
    while (iterations < max_iterations) & (tl.sum(active.to(tl.int32), 0) > 0):
        bd = _ridge_matvec(d, q, kbar, ridge, lse2, k_base, stride_kt, offs_m, offs_d, hi, scale_log2,
                           BLOCK_N, PRECISION, INTERPRETED)
        curvature = tl.sum(d * bd, 1)
        alpha = tl.where(active & (curvature > 0.0), rz / tl.where(curvature > 0.0, curvature, 1.0), 0.0)
        x += alpha[:, None] * d
        r -= alpha[:, None] * bd
        z = r / diag
        rz_next = tl.sum(r * z, 1)
        beta = tl.where(active & (rz > 0.0), rz_next / tl.where(rz > 0.0, rz, 1.0), 0.0)
        d = z + beta[:, None] * d
        rz = rz_next
        res2 = tl.sum(r * r, 1)
        active = active & (res2 > tol2 * rhs2)
        iterations += 1
    relative = tl.where(rhs2 > 0.0, tl.sqrt(res2 / tl.where(rhs2 > 0.0, rhs2, 1.0)), 0.0)
    return x, relative, iterations


@triton.jit
def _forward_kernel(
    Q, K, V, RIDGE, O, ETA, LSE, RESIDUAL, ITERATIONS,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    num_tokens, num_heads, scale_log2, tol2, max_iterations,
    REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    block, batch_head, b, head, offs_m, offs_d, m_valid, hi, q = _query_block(
        Q, stride_qb, stride_qt, stride_qh, num_tokens, num_heads, HEAD_DIM, BLOCK_M)
    k_base = K + b * stride_kb + (head // REP) * stride_kh
    v_base = V + b * stride_vb + (head // REP) * stride_vh
    ridge = tl.load(RIDGE + head)

    # Statistics. Rows past T still see keys 0..hi-1, so their sums stay positive (never NaN).
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    sum_k = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    sum_k2 = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _key_tile(k_base, stride_kt, offs_n, offs_d, hi)
        s = dot(q, tl.trans(k), PRECISION, INTERPRETED) * scale_log2
        s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        k32 = k.to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        sum_k = sum_k * alpha[:, None] + dot(p, k32, "tf32x3", INTERPRETED)
        sum_k2 = sum_k2 * alpha[:, None] + dot(p, k32 * k32, "tf32x3", INTERPRETED)
        m_i = m_new
    lse2 = m_i + tl.log2(l_i)
    kbar = sum_k / l_i[:, None]
    # Rounding can take a variance below 0 when lambda is tiny; the preconditioner only needs > 0.
    diag = tl.maximum(sum_k2 / l_i[:, None] - kbar * kbar + ridge, ridge)
    q32 = q.to(tl.float32)

    eta, relative, iterations = _solve(
        q32 - kbar, diag, m_valid, q, kbar, ridge, lse2, k_base, stride_kt, offs_m, offs_d, hi, scale_log2,
        tol2, max_iterations, BLOCK_N, PRECISION, INTERPRETED)

    # Output: o_i = sum_j p_ij (1 + eta_i.(k_j - kbar_i)) v_j.
    eta_kbar = tl.sum(eta * kbar, 1)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _key_tile(k_base, stride_kt, offs_n, offs_d, hi)
        v = _key_tile(v_base, stride_vt, offs_n, offs_d, hi)
        p = _probs(q, k, offs_m, offs_n, lse2, scale_log2, PRECISION, INTERPRETED)
        weights = p * (1.0 + dot(eta, tl.trans(k.to(tl.float32)), "tf32x3", INTERPRETED) - eta_kbar[:, None])
        acc += dot(weights, v.to(tl.float32), "tf32x3", INTERPRETED)

    row_mask = m_valid[:, None]
    tl.store(O + b * stride_ob + head * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_mask)
    tl.store(ETA + b * stride_ob + head * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], eta,
             mask=row_mask)
    tl.store(LSE + batch_head * num_tokens + offs_m, lse2 * LN2, mask=m_valid)
    tl.store(RESIDUAL + batch_head * num_tokens + offs_m, relative, mask=m_valid)
    tl.store(ITERATIONS + batch_head * tl.num_programs(0) + block, iterations)


@triton.jit
def _backward_query_kernel(
    Q, K, V, RIDGE, DO, ETA, LSE, DQ, XI, ROWS, DRIDGE_ROWS, RESIDUAL, ITERATIONS,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    num_tokens, num_heads, scale, scale_log2, tol2, max_iterations,
    REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    block, batch_head, b, head, offs_m, offs_d, m_valid, hi, q = _query_block(
        Q, stride_qb, stride_qt, stride_qh, num_tokens, num_heads, HEAD_DIM, BLOCK_M)
    # dO, dQ, ETA and XI share one layout (contiguous (B, T, Hq, D): the op and launcher make them so).
    row_offset = b * stride_ob + head * stride_oh
    g = _rows(DO + row_offset, offs_m, stride_ot, offs_d, m_valid)
    eta = _rows(ETA + row_offset, offs_m, stride_ot, offs_d, m_valid)
    lse2 = tl.load(LSE + batch_head * num_tokens + offs_m, mask=m_valid, other=0.0) * LOG2E
    k_base = K + b * stride_kb + (head // REP) * stride_kh
    v_base = V + b * stride_vb + (head // REP) * stride_vh
    ridge = tl.load(RIDGE + head)

    # Statistics: kbar, the Jacobi diagonal, rbar = g.vbar and sum_j p_j r_j k_j (r_j = g.v_j).
    kbar = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    sum_k2 = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    sum_rk = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    rbar = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _key_tile(k_base, stride_kt, offs_n, offs_d, hi)
        v = _key_tile(v_base, stride_vt, offs_n, offs_d, hi)
        p = _probs(q, k, offs_m, offs_n, lse2, scale_log2, PRECISION, INTERPRETED)
        k32 = k.to(tl.float32)
        pr = p * dot(g, tl.trans(v.to(tl.float32)), "tf32x3", INTERPRETED)
        kbar += dot(p, k32, "tf32x3", INTERPRETED)
        sum_k2 += dot(p, k32 * k32, "tf32x3", INTERPRETED)
        sum_rk += dot(pr, k32, "tf32x3", INTERPRETED)
        rbar += tl.sum(pr, 1)
    diag = tl.maximum(sum_k2 - kbar * kbar + ridge, ridge)

    xi, relative, iterations = _solve(
        sum_rk - rbar[:, None] * kbar, diag, m_valid, q, kbar, ridge, lse2, k_base, stride_kt, offs_m, offs_d,
        hi, scale_log2, tol2, max_iterations, BLOCK_N, PRECISION, INTERPRETED)

    eta_kbar = tl.sum(eta * kbar, 1)
    xi_kbar = tl.sum(xi * kbar, 1)
    xi_eta = tl.sum(xi * eta, 1)
    cbar = ridge * xi_eta
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _key_tile(k_base, stride_kt, offs_n, offs_d, hi)
        v = _key_tile(v_base, stride_vt, offs_n, offs_d, hi)
        p = _probs(q, k, offs_m, offs_n, lse2, scale_log2, PRECISION, INTERPRETED)
        kt32 = tl.trans(k.to(tl.float32))
        a = 1.0 + dot(eta, kt32, "tf32x3", INTERPRETED) - eta_kbar[:, None]
        bcoef = (dot(g, tl.trans(v.to(tl.float32)), "tf32x3", INTERPRETED) - rbar[:, None]
                 - dot(xi, kt32, "tf32x3", INTERPRETED) + xi_kbar[:, None])
        ds = p * (a * bcoef - cbar[:, None])
        dq += dot(ds, k.to(tl.float32), "tf32x3", INTERPRETED)
    dq = dq * scale + xi

    row_mask = m_valid[:, None]
    row_ptrs = row_offset + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(DQ + row_ptrs, dq.to(DQ.dtype.element_ty), mask=row_mask)
    tl.store(XI + row_ptrs, xi, mask=row_mask)
    rows = ROWS + batch_head * num_tokens + offs_m
    rows_stride = tl.num_programs(1) * num_tokens
    tl.store(rows, rbar, mask=m_valid)
    tl.store(rows + rows_stride, eta_kbar, mask=m_valid)
    tl.store(rows + 2 * rows_stride, xi_kbar, mask=m_valid)
    tl.store(rows + 3 * rows_stride, cbar, mask=m_valid)
    tl.store(DRIDGE_ROWS + batch_head * num_tokens + offs_m, -xi_eta, mask=m_valid)
    tl.store(RESIDUAL + batch_head * num_tokens + offs_m, relative, mask=m_valid)
    tl.store(ITERATIONS + batch_head * tl.num_programs(0) + block, iterations)


@triton.jit
def _backward_key_kernel(
    Q, K, V, DO, ETA, XI, LSE, ROWS, DK, DV,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_db, stride_dt, stride_dh,
    num_tokens, num_kv_heads, scale, scale_log2,
    REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    block = tl.program_id(0)
    batch_kv = tl.program_id(1)
    b = batch_kv // num_kv_heads
    kv_head = batch_kv % num_kv_heads
    n_start = block * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid = offs_n < num_tokens
    k = tl.load(K + b * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=n_valid[:, None], other=0.0)
    k32 = k.to(tl.float32)
    v32 = _rows(V + b * stride_vb + kv_head * stride_vh, offs_n, stride_vt, offs_d, n_valid)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    rows_stride = tl.num_programs(1) * REP * num_tokens  # B * Hq * T: one plane of ROWS

    for r in range(REP):
        head = kv_head * REP + r
        batch_head = b * num_kv_heads * REP + head
        for m0 in range(n_start, num_tokens, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_valid = offs_m < num_tokens
            q = tl.load(Q + b * stride_qb + head * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                        mask=m_valid[:, None], other=0.0)
            row_offset = b * stride_ob + head * stride_oh
            g = _rows(DO + row_offset, offs_m, stride_ot, offs_d, m_valid)
            eta = _rows(ETA + row_offset, offs_m, stride_ot, offs_d, m_valid)
            xi = _rows(XI + row_offset, offs_m, stride_ot, offs_d, m_valid)
            row = batch_head * num_tokens + offs_m
            lse2 = tl.load(LSE + row, mask=m_valid, other=0.0) * LOG2E
            rbar = tl.load(ROWS + row, mask=m_valid, other=0.0)
            eta_kbar = tl.load(ROWS + rows_stride + row, mask=m_valid, other=0.0)
            xi_kbar = tl.load(ROWS + 2 * rows_stride + row, mask=m_valid, other=0.0)
            cbar = tl.load(ROWS + 3 * rows_stride + row, mask=m_valid, other=0.0)
            # Transposed tiles (keys x queries): p^T and the per-pair coefficients.
            s = dot(k, tl.trans(q), PRECISION, INTERPRETED) * scale_log2
            keep = m_valid[None, :] & (offs_m[None, :] >= offs_n[:, None])
            p = tl.where(keep, tl.exp2(s - lse2[None, :]), 0.0)
            a = 1.0 + dot(k32, tl.trans(eta), "tf32x3", INTERPRETED) - eta_kbar[None, :]
            bcoef = (dot(v32, tl.trans(g), "tf32x3", INTERPRETED) - rbar[None, :]
                     - dot(k32, tl.trans(xi), "tf32x3", INTERPRETED) + xi_kbar[None, :])
            pa = p * a
            ds = p * (a * bcoef - cbar[None, :])
            dv += dot(pa, g, "tf32x3", INTERPRETED)
            dk += (scale * dot(ds, q.to(tl.float32), "tf32x3", INTERPRETED)
                   + dot(p * bcoef, eta, "tf32x3", INTERPRETED) - dot(pa, xi, "tf32x3", INTERPRETED))

    kv_mask = n_valid[:, None]
    # dK and dV are contiguous (B, T, Hkv, D), whatever the strides of K and V.
    kv_ptrs = b * stride_db + kv_head * stride_dh + offs_n[:, None] * stride_dt + offs_d[None, :]
    tl.store(DK + kv_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()[:3]]


def _constants(q: torch.Tensor, k: torch.Tensor):
    block_m, block_n, num_warps = _tiles(q.shape[3])
    return dict(
        REP=q.shape[2] // k.shape[2], HEAD_DIM=q.shape[3], BLOCK_M=block_m, BLOCK_N=block_n,
        # input_precision matters only for fp32 operands; bf16/fp16 products are exact in fp32.
        PRECISION="tf32x3" if q.dtype == torch.float32 else None, INTERPRETED=INTERPRETED,
        num_warps=num_warps,
    )


def forward(q, k, v, ridge, scale: float, tolerance: float, max_iterations: int):
    """Launch the forward. ``q (B, T, Hq, D)`` and ``k, v (B, T, Hkv, D)`` with unit stride in D,
    ``ridge (Hq,)`` fp32. Returns ``out`` (q's dtype), ``eta (B, T, Hq, D)`` fp32, ``lse (B, Hq, T)``
    fp32, each row's final relative residual ``(B, Hq, T)`` and each query block's CG iterations
    ``(B, Hq, blocks)`` int32."""
    batch, num_tokens, num_heads, head_dim = q.shape
    const = _constants(q, k)
    blocks = triton.cdiv(num_tokens, const["BLOCK_M"])
    # out and eta are contiguous and share their strides (one row layout in the kernels).
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    eta = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, num_heads, num_tokens), dtype=torch.float32, device=q.device)
    residual = torch.empty_like(lse)
    iterations = torch.empty((batch, num_heads, blocks), dtype=torch.int32, device=q.device)
    _forward_kernel[(blocks, batch * num_heads)](
        q, k, v, ridge, out, eta, lse, residual, iterations, *_strides(q, k, v, out),
        num_tokens, num_heads, scale * LOG2E.value, tolerance**2, max_iterations, **const,
    )
    return out, eta, lse, residual, iterations


def backward(grad_out, q, k, v, ridge, eta, lse, scale: float, tolerance: float, max_iterations: int):
    """Launch the backward. ``grad_out`` is contiguous (B, T, Hq, D); ``eta`` and ``lse`` are the
    forward's. Returns ``dq, dk, dv`` (inputs' dtypes), ``dridge (Hq,)`` fp32, and the adjoint
    solve's residuals and iterations (as ``forward``)."""
    batch, num_tokens, num_heads, head_dim = q.shape
    const = _constants(q, k)
    blocks = triton.cdiv(num_tokens, const["BLOCK_M"])
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    xi = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    rows = torch.empty((len(ROW_STATS), batch, num_heads, num_tokens), dtype=torch.float32, device=q.device)
    dridge_rows = torch.empty_like(lse)
    residual = torch.empty_like(lse)
    iterations = torch.empty((batch, num_heads, blocks), dtype=torch.int32, device=q.device)
    strides = _strides(q, k, v, grad_out)
    _backward_query_kernel[(blocks, batch * num_heads)](
        q, k, v, ridge, grad_out, eta, lse, dq, xi, rows, dridge_rows, residual, iterations, *strides,
        num_tokens, num_heads, scale, scale * LOG2E.value, tolerance**2, max_iterations, **const,
    )
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _backward_key_kernel[(triton.cdiv(num_tokens, const["BLOCK_N"]), batch * k.shape[2])](
        q, k, v, grad_out, eta, xi, lse, rows, dk, dv, *strides, *dk.stride()[:3],
        num_tokens, k.shape[2], scale, scale * LOG2E.value, **const,
    )
    return dq, dk, dv, dridge_rows.sum((0, 2)), residual, iterations
