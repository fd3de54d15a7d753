"""The Triton programs of local linear attention; launched by ``kernel.py`` (which documents them).

Accumulation and solves are fp32, and every product runs on 16-bit tensor cores for bf16/fp16 inputs:
scores from the inputs directly (exact products); a product of an fp32 quantity (CG direction, eta,
xi, probability-weighted coefficients) with keys or values splits the fp32 side into hi + lo in the
input dtype (keys and values are exact in it; fp16 rows are first scaled to their largest magnitude,
its range being narrow), and the two fp32 x fp32 products of dK take three 16-bit products. Only the
Jacobi diagonal (a preconditioner) uses rounded k^2. fp32 inputs take 3xTF32 products; the op
routes them to the torch backend on a GPU, where those spill registers.

Centred keys: every regression sum (kbar, the covariance products, the projections eta.k, xi.k)
is over ``k - c``, c the mean key of the (sequence, kv head) (``kernel.key_centres``): raw moments of
keys with a large common component cancel, and what fp32 (or the 16-bit hi + lo split of an fp32
operand) loses there scales with |k|, not with the keys' spread. The scores keep the raw keys (the
softmax is shift-invariant only per row, and the saved lse is of the raw scores). fp32 keys are
centred in the tile (``_centred_tile``); 16-bit keys stay exact in their dtype for the tensor cores
and each product instead subtracts the centre's product *with the same split* of its fp32 operand
(``_split_dot_centred``, ``_split_centre``), so the split's rounding multiplies ``k - c`` only.

Registers: CG keeps only the key sweep's operands in registers; each block's x, r, d, kbar and
diagonal live in its own rows of fp32 scratch between sweeps (see ``_solve``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from pyfastrl.kernels.attention_common import LN2, LOG2E


@triton.jit
def _mma(a, b, acc, INTERPRETED: tl.constexpr):
    """``acc + a @ b`` for two tiles of one dtype: 16-bit on tensor cores (exact products, fp32
    accumulation), fp32 as 3xTF32; upcast IEEE fp32 under the interpreter."""
    if INTERPRETED:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    return tl.dot(a, b, acc)


@triton.jit
def _split(x, DT: tl.constexpr):
    """An fp32 tile as ``hi + lo`` in the 16-bit input dtype (2 x 8 bits for bf16, 2 x 11 for fp16),
    so its products with input-dtype tiles run on 16-bit tensor cores; fp32 stays whole."""
    if DT == tl.float32:
        return x, x
    hi = x.to(DT)
    return hi, (x - hi.to(tl.float32)).to(DT)


@triton.jit
def _row_scale(x, DT: tl.constexpr):
    """``(x / s, s)`` with ``s`` each row's largest magnitude when DT is fp16 (its range is narrow: a
    scaled row splits without overflow), ``(x, 1)`` otherwise."""
    if DT == tl.float16:
        s = tl.maximum(tl.max(tl.abs(x), 1), 1.0e-30)
        return x / s[:, None], s
    return x, tl.full([x.shape[0]], 1.0, tl.float32)


@triton.jit
def _split_dot(a_hi, a_lo, b, acc, INTERPRETED: tl.constexpr):
    """``acc + (a_hi + a_lo) @ b`` for a ``_split`` left operand."""
    if a_hi.dtype == tl.float32:
        return _mma(a_hi, b, acc, INTERPRETED)
    return _mma(a_lo, b, _mma(a_hi, b, acc, INTERPRETED), INTERPRETED)


@triton.jit
def _dot_split(a, b_hi, b_lo, acc, INTERPRETED: tl.constexpr):
    """``acc + a @ (b_hi + b_lo)`` for a ``_split`` right operand."""
    if b_hi.dtype == tl.float32:
        return _mma(a, b_hi, acc, INTERPRETED)
    return _mma(a, b_lo, _mma(a, b_hi, acc, INTERPRETED), INTERPRETED)


@triton.jit
def _fp32_dot(x, b, acc, INTERPRETED: tl.constexpr):
    """``acc + x @ b`` for an fp32 tile x and a tile b in the input dtype."""
    if b.dtype == tl.float16:
        x, s = _row_scale(x, tl.float16)
        x_hi, x_lo = _split(x, tl.float16)
        return acc + s[:, None] * _split_dot(x_hi, x_lo, b, tl.zeros(acc.shape, tl.float32), INTERPRETED)
    x_hi, x_lo = _split(x, b.dtype)
    return _split_dot(x_hi, x_lo, b, acc, INTERPRETED)


@triton.jit
def _fp32_dot_split(x, b_hi, b_lo, acc, INTERPRETED: tl.constexpr):
    """``acc + x @ (b_hi + b_lo)``, both fp32: three 16-bit products (hi hi, lo hi, hi lo: the
    dropped lo lo term is below fp32 rounding for fp16 and ~2^-16 relative for bf16); 3xTF32 in fp32."""
    if b_hi.dtype == tl.float32:
        return _mma(x, b_hi, acc, INTERPRETED)
    if b_hi.dtype == tl.float16:
        x, s = _row_scale(x, tl.float16)
        x_hi, x_lo = _split(x, tl.float16)
        part = _split_dot(x_hi, x_lo, b_hi, tl.zeros(acc.shape, tl.float32), INTERPRETED)
        return acc + s[:, None] * _mma(x_hi, b_lo, part, INTERPRETED)
    x_hi, x_lo = _split(x, b_hi.dtype)
    return _mma(x_hi, b_lo, _split_dot(x_hi, x_lo, b_hi, acc, INTERPRETED), INTERPRETED)


@triton.jit
def _load_centre(CENTRE, batch_kv, offs_d, DT: tl.constexpr):
    """The (sequence, kv head)'s key centre c (fp32), and the part of it the products subtract by
    rows: none for fp32 keys (centred in the tile), all of it for 16-bit keys (kept exact)."""
    centre = tl.load(CENTRE + batch_kv * offs_d.shape[0] + offs_d)
    if DT == tl.float32:
        return centre, centre * 0.0
    return centre, centre


@triton.jit
def _centred_tile(k, centre):
    """The key tile the regression products take: ``k - c`` for fp32 keys, 16-bit keys as they are."""
    if k.dtype == tl.float32:
        return k - centre[None, :]
    return k


@triton.jit
def _split_value(x_hi, x_lo):
    """The fp32 tile a ``_split`` pair stands for, with the split's own rounding (fp32: hi alone)."""
    if x_hi.dtype == tl.float32:
        return x_hi
    return x_hi.to(tl.float32) + x_lo.to(tl.float32)


@triton.jit
def _split_centre(x_hi, x_lo, x_scale, row_centre):
    """``x . c`` per row for a split row-scaled block x, with the split's own rounding: subtracted from
    ``_project``'s ``x . k`` it leaves ``x . (k - c)`` up to fp32 accumulation."""
    return tl.sum(_split_value(x_hi, x_lo) * row_centre[None, :], 1) * x_scale


@triton.jit
def _split_dot_centred(w_hi, w_lo, k, row_centre, acc, INTERPRETED: tl.constexpr):
    """``acc + (w_hi + w_lo) @ (k - c)`` for a ``_split`` weight tile (rows x keys), c subtracted by
    rows with the split's own row sums."""
    row_sums = tl.sum(_split_value(w_hi, w_lo), 1)
    return _split_dot(w_hi, w_lo, k, acc - row_sums[:, None] * row_centre[None, :], INTERPRETED)


@triton.jit
def _centred_dot(w, k, row_centre, acc, INTERPRETED: tl.constexpr):
    """``acc + w @ (k - c)`` for an fp32 weight tile w (rows x keys) and a ``_centred_tile``."""
    if k.dtype == tl.float16:
        w, s = _row_scale(w, tl.float16)
        w_hi, w_lo = _split(w, tl.float16)
        zero = tl.zeros(acc.shape, tl.float32)
        return acc + s[:, None] * _split_dot_centred(w_hi, w_lo, k, row_centre, zero, INTERPRETED)
    w_hi, w_lo = _split(w, k.dtype)
    return _split_dot_centred(w_hi, w_lo, k, row_centre, acc, INTERPRETED)


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
def _probs(q, k, offs_m, offs_n, lse2, scale_log2, INTERPRETED: tl.constexpr):
    """Causal softmax probabilities (rows x keys) of a key tile from the rows' log2-sum-exp."""
    s = _mma(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], tl.float32), INTERPRETED) * scale_log2
    return tl.where(offs_n[None, :] <= offs_m[:, None], tl.exp2(s - lse2[:, None]), 0.0)


@triton.jit
def _squares(k, row_centre):
    """(k - c)^2 in k's dtype for a ``_centred_tile``, for the Jacobi diagonal only (a preconditioner
    need not be exact; capped below fp16's overflow)."""
    x = k.to(tl.float32) - row_centre[None, :]
    return tl.minimum(x * x, 6.0e4).to(k.dtype)


@triton.jit
def _project(x_hi, x_lo, x_scale, k, INTERPRETED: tl.constexpr):
    """``x_i . k_j`` (rows x keys) for a split row-scaled fp32 block x and a key tile."""
    zero = tl.zeros([x_hi.shape[0], k.shape[0]], tl.float32)
    return _split_dot(x_hi, x_lo, tl.trans(k), zero, INTERPRETED) * x_scale[:, None]


@triton.jit
def _covariance_sweep(d, q, lse2, k_base, stride_kt, offs_m, offs_d, hi, scale_log2, centre, row_centre,
                      BLOCK_N: tl.constexpr, INTERPRETED: tl.constexpr):
    """``sum_j p_ij ((k_j - c).d_i) (k_j - c)`` for every row i of the block: one sweep over the
    causal keys 0..hi-1 with d split once (row-scaled for fp16)."""
    d_scaled, d_scale = _row_scale(d, q.dtype)
    d_hi, d_lo = _split(d_scaled, q.dtype)
    unit = tl.full([d.shape[0]], 1.0, tl.float32)
    d_centre = _split_centre(d_hi, d_lo, unit, row_centre)
    acc = tl.zeros(d.shape, tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _key_tile(k_base, stride_kt, offs_n, offs_d, hi)
        p = _probs(q, k, offs_m, offs_n, lse2, scale_log2, INTERPRETED)
        k = _centred_tile(k, centre)
        projection = _project(d_hi, d_lo, unit, k, INTERPRETED) - d_centre[:, None]
        acc = _centred_dot(p * projection, k, row_centre, acc, INTERPRETED)
    return acc * d_scale[:, None]


@triton.jit
def _load_rows(base, row0, stride_t, num_tokens, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, other=0.0):
    """Rows row0..row0+BLOCK_M-1 of an fp32 (T, D) slice (``other`` past T)."""
    offs_m = row0 + tl.arange(0, BLOCK_M)
    ptrs = base + offs_m[:, None] * stride_t + tl.arange(0, HEAD_DIM)[None, :]
    return tl.load(ptrs, mask=(offs_m < num_tokens)[:, None], other=other)


@triton.jit
def _store_rows(base, row0, stride_t, num_tokens, value):
    offs_m = row0 + tl.arange(0, value.shape[0])
    ptrs = base + offs_m[:, None] * stride_t + tl.arange(0, value.shape[1])[None, :]
    tl.store(ptrs, value, mask=(offs_m < num_tokens)[:, None])


@triton.jit
def _solve(rhs, kbar, diag, m_valid, q, ridge, lse2, k_base, stride_kt, offs_m, offs_d, hi, scale_log2,
           centre, row_centre, tol2, max_iterations, X, SCRATCH, scratch_plane, num_tokens, stride_t, row0,
           BLOCK_N: tl.constexpr, INTERPRETED: tl.constexpr):
    """Jacobi-preconditioned CG for ``B_i x_i = rhs_i`` (``B d = sum_j p_j (x_j.d) x_j - (xbar.d) xbar
    + lambda d`` with ``x = k - c``, ``kbar`` the centred mean xbar), all rows of the block together; a
    row stops (its step sizes become 0) once ``|r|^2 <= tol2 |rhs|^2``, the block once every row has.

    Registers hold only the key sweep's operands: the solution x is updated in place in the (T, D)
    slice ``X``, and kbar, the diagonal, the residual r and the direction d live in four scratch
    planes (``SCRATCH + i * scratch_plane``, same layout), read and written once per iteration around
    the sweep (this program's own rows: L2-resident). Returns each row's relative residual and the
    iterations run; x is in X."""
    BLOCK_M: tl.constexpr = rhs.shape[0]
    HEAD_DIM: tl.constexpr = rhs.shape[1]
    KBAR = SCRATCH
    DIAG = SCRATCH + scratch_plane
    R = SCRATCH + 2 * scratch_plane
    D = SCRATCH + 3 * scratch_plane
    d = rhs / diag
    rz = tl.sum(rhs * d, 1)
    rhs2 = tl.sum(rhs * rhs, 1)
    _store_rows(KBAR, row0, stride_t, num_tokens, kbar)
    _store_rows(DIAG, row0, stride_t, num_tokens, diag)
    _store_rows(R, row0, stride_t, num_tokens, rhs)
    _store_rows(D, row0, stride_t, num_tokens, d)
    _store_rows(X, row0, stride_t, num_tokens, tl.zeros(rhs.shape, tl.float32))
    res2 = rhs2
    active = m_valid & (res2 > tol2 * rhs2)
    iterations = tl.full([], 0, tl.int32)
    tl.debug_barrier()  # the rows are read back in other threads' layouts
    while (iterations < max_iterations) & (tl.sum(active.to(tl.int32), 0) > 0):
        bd = _covariance_sweep(_load_rows(D, row0, stride_t, num_tokens, BLOCK_M, HEAD_DIM), q, lse2, k_base,
                               stride_kt, offs_m, offs_d, hi, scale_log2, centre, row_centre, BLOCK_N, INTERPRETED)
        tl.debug_barrier()  # keeps the reloads below from being merged with the load before the sweep
        d = _load_rows(D, row0, stride_t, num_tokens, BLOCK_M, HEAD_DIM)
        kbar = _load_rows(KBAR, row0, stride_t, num_tokens, BLOCK_M, HEAD_DIM)
        bd = bd - tl.sum(kbar * d, 1)[:, None] * kbar + ridge * d
        curvature = tl.sum(d * bd, 1)
        alpha = tl.where(active & (curvature > 0.0), rz / tl.where(curvature > 0.0, curvature, 1.0), 0.0)
        # The barriers between the updates keep the compiler from issuing every row load at once
        # (five (rows x D) vectors and their addresses live together would spill).
        tl.debug_barrier()
        x = _load_rows(X, row0, stride_t, num_tokens, BLOCK_M, HEAD_DIM) + alpha[:, None] * d
        _store_rows(X, row0, stride_t, num_tokens, x)
        tl.debug_barrier()
        r = _load_rows(R, row0, stride_t, num_tokens, BLOCK_M, HEAD_DIM) - alpha[:, None] * bd
        _store_rows(R, row0, stride_t, num_tokens, r)
        tl.debug_barrier()
        z = r / _load_rows(DIAG, row0, stride_t, num_tokens, BLOCK_M, HEAD_DIM, 1.0)
        rz_next = tl.sum(r * z, 1)
        beta = tl.where(active & (rz > 0.0), rz_next / tl.where(rz > 0.0, rz, 1.0), 0.0)
        _store_rows(D, row0, stride_t, num_tokens, z + beta[:, None] * d)
        rz = rz_next
        res2 = tl.sum(r * r, 1)
        active = active & (res2 > tol2 * rhs2)
        iterations += 1
        # row0 < T always; re-deriving it each iteration keeps the compiler from hoisting the
        # (rows x D) address tensors above out of the loop, where they would occupy registers.
        row0 = tl.minimum(row0, num_tokens)
        tl.debug_barrier()
    # A zero rhs has res2 = 0; a NaN row stays NaN here (reported as a failed solve, never as 0).
    relative = tl.sqrt(res2 / tl.where(rhs2 > 0.0, rhs2, 1.0))
    return relative, iterations


@triton.jit
def _forward_kernel(
    Q, K, V, CENTRE, RIDGE, O, ETA, LSE, RESIDUAL, ITERATIONS, SCRATCH,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    num_tokens, num_heads, scale_log2, tol2, max_iterations, scratch_plane,
    REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    block, batch_head, b, head, offs_m, offs_d, m_valid, hi, q = _query_block(
        Q, stride_qb, stride_qt, stride_qh, num_tokens, num_heads, HEAD_DIM, BLOCK_M)
    k_base = K + b * stride_kb + (head // REP) * stride_kh
    v_base = V + b * stride_vb + (head // REP) * stride_vh
    ridge = tl.load(RIDGE + head)
    centre, row_centre = _load_centre(CENTRE, b * (num_heads // REP) + head // REP, offs_d, q.dtype)

    # Statistics (kbar centred: sum_j p_j (k_j - c)). Rows past T still see keys 0..hi-1, so their
    # sums stay positive (never NaN).
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    sum_k = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    sum_k2 = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _key_tile(k_base, stride_kt, offs_n, offs_d, hi)
        s = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), INTERPRETED) * scale_log2
        s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p_hi, p_lo = _split(p, k.dtype)  # p <= 1: no row scale needed
        k = _centred_tile(k, centre)
        sum_k = _split_dot_centred(p_hi, p_lo, k, row_centre, sum_k * alpha[:, None], INTERPRETED)
        sum_k2 = _mma(p_hi, _squares(k, row_centre), sum_k2 * alpha[:, None], INTERPRETED)
        m_i = m_new
    lse2 = m_i + tl.log2(l_i)
    kbar = sum_k / l_i[:, None]
    # Rounding can take a variance below 0 when lambda is tiny; the preconditioner only needs > 0.
    diag = tl.maximum(sum_k2 / l_i[:, None] - kbar * kbar + ridge, ridge)

    row_offset = b * stride_ob + head * stride_oh
    relative, iterations = _solve(
        q.to(tl.float32) - centre[None, :] - kbar, kbar, diag, m_valid, q, ridge, lse2, k_base, stride_kt, offs_m,
        offs_d, hi, scale_log2, centre, row_centre, tol2, max_iterations, ETA + row_offset, SCRATCH + row_offset,
        scratch_plane, num_tokens, stride_ot, block * BLOCK_M, BLOCK_N, INTERPRETED)
    row_ptrs = row_offset + offs_m[:, None] * stride_ot + offs_d[None, :]

    # Output: o_i = sum_j p_ij (1 + eta_i.(k_j - c) - eta_i.(kbar_i - c)) v_j.
    eta = tl.load(ETA + row_ptrs, mask=m_valid[:, None], other=0.0)
    eta_kbar = tl.sum(eta * tl.load(SCRATCH + row_ptrs, mask=m_valid[:, None], other=0.0), 1)
    eta_scaled, eta_scale = _row_scale(eta, q.dtype)
    eta_hi, eta_lo = _split(eta_scaled, q.dtype)
    eta_kbar += _split_centre(eta_hi, eta_lo, eta_scale, row_centre)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _key_tile(k_base, stride_kt, offs_n, offs_d, hi)
        v = _key_tile(v_base, stride_vt, offs_n, offs_d, hi)
        p = _probs(q, k, offs_m, offs_n, lse2, scale_log2, INTERPRETED)
        projection = _project(eta_hi, eta_lo, eta_scale, _centred_tile(k, centre), INTERPRETED)
        weights = p * (1.0 + projection - eta_kbar[:, None])
        acc = _fp32_dot(weights, v, acc, INTERPRETED)

    tl.store(O + row_ptrs, acc.to(O.dtype.element_ty), mask=m_valid[:, None])
    tl.store(LSE + batch_head * num_tokens + offs_m, lse2 * LN2, mask=m_valid)
    tl.store(RESIDUAL + batch_head * num_tokens + offs_m, relative, mask=m_valid)
    tl.store(ITERATIONS + batch_head * tl.num_programs(0) + block, iterations)


@triton.jit
def _backward_query_kernel(
    Q, K, V, CENTRE, RIDGE, DO, ETA, LSE, DQ, XI, ROWS, DRIDGE_ROWS, RESIDUAL, ITERATIONS, SCRATCH,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    num_tokens, num_heads, scale, scale_log2, tol2, max_iterations, scratch_plane,
    REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    block, batch_head, b, head, offs_m, offs_d, m_valid, hi, q = _query_block(
        Q, stride_qb, stride_qt, stride_qh, num_tokens, num_heads, HEAD_DIM, BLOCK_M)
    # dO, dQ, ETA and XI share one layout (contiguous (B, T, Hq, D): the op and launcher make them so).
    row_offset = b * stride_ob + head * stride_oh
    row_ptrs = row_offset + offs_m[:, None] * stride_ot + offs_d[None, :]
    g = tl.load(DO + row_ptrs, mask=m_valid[:, None], other=0.0)
    lse2 = tl.load(LSE + batch_head * num_tokens + offs_m, mask=m_valid, other=0.0) * LOG2E
    k_base = K + b * stride_kb + (head // REP) * stride_kh
    v_base = V + b * stride_vb + (head // REP) * stride_vh
    ridge = tl.load(RIDGE + head)
    centre, row_centre = _load_centre(CENTRE, b * (num_heads // REP) + head // REP, offs_d, q.dtype)

    # Statistics: kbar, the Jacobi diagonal, rbar = g.vbar and sum_j p_j r_j k_j (r_j = g.v_j), all
    # of keys centred at c.
    kbar = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    sum_k2 = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    sum_rk = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    rbar = tl.zeros([BLOCK_M], tl.float32)
    zero = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _key_tile(k_base, stride_kt, offs_n, offs_d, hi)
        v = _key_tile(v_base, stride_vt, offs_n, offs_d, hi)
        p = _probs(q, k, offs_m, offs_n, lse2, scale_log2, INTERPRETED)
        pr = p * _mma(g, tl.trans(v), zero, INTERPRETED)
        p_hi, p_lo = _split(p, k.dtype)
        k = _centred_tile(k, centre)
        kbar = _split_dot_centred(p_hi, p_lo, k, row_centre, kbar, INTERPRETED)
        sum_k2 = _mma(p_hi, _squares(k, row_centre), sum_k2, INTERPRETED)
        sum_rk = _centred_dot(pr, k, row_centre, sum_rk, INTERPRETED)
        rbar += tl.sum(pr, 1)
    diag = tl.maximum(sum_k2 - kbar * kbar + ridge, ridge)

    relative, iterations = _solve(
        sum_rk - rbar[:, None] * kbar, kbar, diag, m_valid, q, ridge, lse2, k_base, stride_kt, offs_m, offs_d,
        hi, scale_log2, centre, row_centre, tol2, max_iterations, XI + row_offset, SCRATCH + row_offset,
        scratch_plane, num_tokens, stride_ot, block * BLOCK_M, BLOCK_N, INTERPRETED)
    xi = _rows(XI + row_offset, offs_m, stride_ot, offs_d, m_valid)
    kbar = _rows(SCRATCH + row_offset, offs_m, stride_ot, offs_d, m_valid)

    # dQ pass: ds_ij = p_ij (a_ij b_ij - cbar_i), a = 1 + eta.(k_j - kbar), b = r_j - rbar - xi.(k_j - kbar).
    # a_ij = eta_i.k_j + a0_i and b_ij = r_j - xi_i.k_j - b0_i (k_j the centred tile, the rows' part of
    # c folded into a0 and b0 with the key kernel's own splits of eta and xi): two per-row offsets.
    eta = _rows(ETA + row_offset, offs_m, stride_ot, offs_d, m_valid)
    xi_eta = tl.sum(xi * eta, 1)
    cbar = ridge * xi_eta
    eta_scaled, eta_scale = _row_scale(eta, q.dtype)
    eta_hi, eta_lo = _split(eta_scaled, q.dtype)
    xi_scaled, xi_scale = _row_scale(xi, q.dtype)
    xi_hi, xi_lo = _split(xi_scaled, q.dtype)
    a0 = 1.0 - tl.sum(eta * kbar, 1) - _split_centre(eta_hi, eta_lo, eta_scale, row_centre)
    b0 = rbar - tl.sum(xi * kbar, 1) - _split_centre(xi_hi, xi_lo, xi_scale, row_centre)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _key_tile(k_base, stride_kt, offs_n, offs_d, hi)
        v = _key_tile(v_base, stride_vt, offs_n, offs_d, hi)
        p = _probs(q, k, offs_m, offs_n, lse2, scale_log2, INTERPRETED)
        k = _centred_tile(k, centre)
        a = _project(eta_hi, eta_lo, eta_scale, k, INTERPRETED) + a0[:, None]
        bcoef = (_mma(g, tl.trans(v), zero, INTERPRETED) - _project(xi_hi, xi_lo, xi_scale, k, INTERPRETED)
                 - b0[:, None])
        # sum_j ds_ij = 0 exactly: sum_j ds_ij (k_j - c) is dq's sum without the cancellation of c.
        dq = _centred_dot(p * (a * bcoef - cbar[:, None]), k, row_centre, dq, INTERPRETED)
    dq = dq * scale + _rows(XI + row_offset, offs_m, stride_ot, offs_d, m_valid)
    tl.store(DQ + row_ptrs, dq.to(DQ.dtype.element_ty), mask=m_valid[:, None])
    rows = ROWS + batch_head * num_tokens + offs_m
    rows_stride = tl.num_programs(1) * num_tokens
    tl.store(rows, a0, mask=m_valid)
    tl.store(rows + rows_stride, b0, mask=m_valid)
    tl.store(rows + 2 * rows_stride, cbar, mask=m_valid)
    tl.store(DRIDGE_ROWS + batch_head * num_tokens + offs_m, -xi_eta, mask=m_valid)
    tl.store(RESIDUAL + batch_head * num_tokens + offs_m, relative, mask=m_valid)
    tl.store(ITERATIONS + batch_head * tl.num_programs(0) + block, iterations)


@triton.jit
def _backward_key_kernel(
    Q, K, V, CENTRE, DO, ETA, XI, LSE, ROWS, DK, DV,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_db, stride_dt, stride_dh,
    num_tokens, num_kv_heads, scale, scale_log2,
    REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    block = tl.program_id(0)
    batch_kv = tl.program_id(1)
    b = batch_kv // num_kv_heads
    kv_head = batch_kv % num_kv_heads
    n_start = block * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid = offs_n < num_tokens
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    centre, _ = _load_centre(CENTRE, batch_kv, offs_d, K.dtype.element_ty)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    zero = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    rows_stride = tl.num_programs(1) * REP * num_tokens  # B * Hq * T: one plane of ROWS

    for r in range(REP):
        head = kv_head * REP + r
        batch_head = b * num_kv_heads * REP + head
        for m0 in range(n_start, num_tokens, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_valid = offs_m < num_tokens
            # The key block is re-read (L1/L2) every query tile: held across the loop, k and v (each
            # replicated in every warp as the mma's left operand) would spill. min(n_start, m0) is
            # n_start, but the compiler cannot hoist a load whose address depends on m0.
            k = _key_tile(k_base, stride_kt, tl.minimum(n_start, m0) + tl.arange(0, BLOCK_N), offs_d, num_tokens)
            v = _key_tile(v_base, stride_vt, tl.minimum(n_start, m0) + tl.arange(0, BLOCK_N), offs_d, num_tokens)
            q = tl.load(Q + b * stride_qb + head * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                        mask=m_valid[:, None], other=0.0)
            row_ptrs = b * stride_ob + head * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
            g = tl.load(DO + row_ptrs, mask=m_valid[:, None], other=0.0)
            eta_scaled, eta_scale = _row_scale(tl.load(ETA + row_ptrs, mask=m_valid[:, None], other=0.0), k.dtype)
            eta_hi, eta_lo = _split(eta_scaled, k.dtype)
            xi_scaled, xi_scale = _row_scale(tl.load(XI + row_ptrs, mask=m_valid[:, None], other=0.0), k.dtype)
            xi_hi, xi_lo = _split(xi_scaled, k.dtype)
            row = batch_head * num_tokens + offs_m
            lse2 = tl.load(LSE + row, mask=m_valid, other=0.0) * LOG2E
            a0 = tl.load(ROWS + row, mask=m_valid, other=0.0)
            b0 = tl.load(ROWS + rows_stride + row, mask=m_valid, other=0.0)
            cbar = tl.load(ROWS + 2 * rows_stride + row, mask=m_valid, other=0.0)
            # Transposed tiles (keys x queries): p^T and the per-pair coefficients.
            s = _mma(k, tl.trans(q), zero, INTERPRETED) * scale_log2
            keep = m_valid[None, :] & (offs_m[None, :] >= offs_n[:, None])
            p = tl.where(keep, tl.exp2(s - lse2[None, :]), 0.0)
            # a and b of the centred keys (16-bit keys: c is in a0 and b0).
            x = _centred_tile(k, centre)
            a = (_dot_split(x, tl.trans(eta_hi), tl.trans(eta_lo), zero, INTERPRETED) * eta_scale[None, :]
                 + a0[None, :])
            bcoef = (_mma(v, tl.trans(g), zero, INTERPRETED)
                     - _dot_split(x, tl.trans(xi_hi), tl.trans(xi_lo), zero, INTERPRETED) * xi_scale[None, :]
                     - b0[None, :])
            pa = p * a
            dv = _fp32_dot(pa, g, dv, INTERPRETED)
            dk = _fp32_dot(scale * p * (a * bcoef - cbar[None, :]), q, dk, INTERPRETED)
            # dk += (p b) @ eta - (p a) @ xi; the rows' scales fold into the key-side factors.
            dk = _fp32_dot_split(p * bcoef * eta_scale[None, :], eta_hi, eta_lo, dk, INTERPRETED)
            dk = _fp32_dot_split(-pa * xi_scale[None, :], xi_hi, xi_lo, dk, INTERPRETED)

    kv_mask = n_valid[:, None]
    # dK and dV are contiguous (B, T, Hkv, D), whatever the strides of K and V.
    kv_ptrs = b * stride_db + kv_head * stride_dh + offs_n[:, None] * stride_dt + offs_d[None, :]
    tl.store(DK + kv_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)
