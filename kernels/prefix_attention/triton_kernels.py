"""The Triton programs of prefix-grouped attention; launched by ``kernel.py`` (which documents them).

Conventions shared by every program:

* Grids are 1-D with the query head as the fast index (``pid = head + num_heads * row``), so the
  rows of a block table, ordered most work first, start most work first across all heads.
* Scores are kept in the log2 domain: ``s2 = log2(e) * s`` where ``s = scale * q.k`` or, with
  soft-capping, ``s = c * tanh(scale * q.k / c)``; the forward saves the natural-log LSE.
* One loop per program walks the key tiles of both key ranges (the group's prefix, then the own
  segment); a uniform per-tile branch applies the visibility mask only to the tiles that need it:
  window-edge tiles, the last prefix tile, the diagonal tiles. (Separate loops per run made the
  compiler keep one copy of the loop-invariant dot operands per loop: 255 registers and spills.)
* Path positions (the position a token has in its member's ``[prefix; suffix]`` sequence) of query
  row ``t`` and key ``j`` differ by ``t - j - shift`` with ``shift = suffix start - prefix end`` for a
  suffix row against its group's prefix keys and ``shift = 0`` within a segment; a key is in the
  window when that difference is below ``window``.
* Prefix trees (``TREE``): a query tile's keys are its ancestors' segments, runs that are not
  contiguous, each with its own ``shift``; the forward and dQ then take their key tiles, with
  ``shift`` and the mask kind, from a host-built list (``PrefixTreeLayout.query_tiles``) inside the
  same single loop. dK/dV needs no tree mode: a segment's keys are read by exactly the queries of
  its subtree, a contiguous range in preorder, causally in packed index (``POS`` for the window).
"""
from __future__ import annotations

import triton
import triton.language as tl

from pyfastrl.kernels.attention_common import LN2, LOG2E, dot


@triton.jit
def _tanh(x):
    # 1 - 2 / (1 + e^{2x}); saturates to +-1 without NaN (exp2 overflow gives 1, underflow -1).
    return 1.0 - 2.0 / (1.0 + tl.exp2(x * (2.0 * LOG2E)))


@triton.jit
def _scores(a, b, score_in, score_out, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Log2-domain scores of ``dot(a, b)`` and, with soft-capping, their tanh (for the gradient)."""
    ab = dot(a, b, PRECISION, UPCAST)
    if SOFTCAP:
        t = _tanh(ab * score_in)
        return t * score_out, t
    return ab * score_in, ab


@triton.jit
def _load(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """``tl.load`` with only the masks that can be false (``row_ok``/``col_ok`` broadcast to ptrs)."""
    if MASK_ROWS:
        if MASK_COLS:
            return tl.load(ptrs, mask=row_ok & col_ok, other=0.0)
        return tl.load(ptrs, mask=row_ok, other=0.0)
    if MASK_COLS:
        return tl.load(ptrs, mask=col_ok, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _pid_head_row(NUM_HEADS: tl.constexpr):
    pid = tl.program_id(0)
    return pid % NUM_HEADS, pid // NUM_HEADS


@triton.jit
def _query_tile(BLOCKS, Q, stride_qt, stride_qh, head, SPLIT: tl.constexpr, NUM_HEADS: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's rows of its query-block row (``PrefixGroupLayout.query_blocks``): a table
    block is split into ``SPLIT`` tiles of ``BLOCK_M`` rows, each its own program."""
    _, pid_row = _pid_head_row(NUM_HEADS)
    row = BLOCKS + (pid_row // SPLIT) * 5
    q_start = tl.load(row) + (pid_row % SPLIT) * BLOCK_M
    q_end = tl.minimum(tl.load(row + 1), q_start + BLOCK_M)
    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_end
    d_valid = offs_d < HEAD_DIM
    q = _load(Q + offs_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :], m_valid[:, None],
              d_valid[None, :], True, HEAD_DIM != BLOCK_D)
    return (q_start, q_end, tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
            offs_m, offs_d, m_valid, d_valid, q)


@triton.jit
def _key_runs(PHASE: tl.constexpr, q_start, q_end, causal_start, full_start, full_end, window,
              WINDOWED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles of one phase for query rows ``q_start..q_end-1`` (phase 0: the group's prefix, for
    suffix rows; phase 1: the own segment, causal). Returns ``lo, hi, shift`` and the tile indices
    ``first_full, last_full, num_tiles``: tiles ``[0, first_full)`` and ``[last_full, num_tiles)``
    need the mask, tile ``i`` covers keys ``lo + i * BLOCK_N ...``."""
    if PHASE == 0:
        lo = full_start
        hi = full_end
        shift = causal_start - full_end
        unmasked_end = hi
    else:
        lo = causal_start
        hi = q_end
        shift = causal_start * 0
        unmasked_end = q_start + 1  # keys up to the block's first row are seen by every row
    first_full = lo * 0
    if WINDOWED:
        lo = tl.maximum(lo, q_start - shift - window + 1)
        # Keys below the last row's first visible key are out of some row's window: edge tiles.
        edge = q_end - shift - window
        first_full = tl.maximum(edge - lo + BLOCK_N - 1, 0) // BLOCK_N
    num_tiles = (tl.maximum(hi - lo, 0) + BLOCK_N - 1) // BLOCK_N
    first_full = tl.minimum(first_full, num_tiles)
    last_full = tl.maximum(first_full, tl.maximum(unmasked_end - lo, 0) // BLOCK_N)
    return lo, hi, shift, first_full, last_full, num_tiles


@triton.jit
def _key_tile(i, q_start, q_end, causal_start, full_start, full_end, window, KEY_TILES,
              TREE: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Loop step ``i``: the tile's keys, its run's ``hi`` and ``shift``, whether the rows see the
    keys causally (``own``) and whether the tile needs the visibility mask. Groups: phase 0 then
    phase 1 of ``_key_runs``. Trees: row ``full_start + i`` of ``KEY_TILES`` (``PrefixTreeLayout.
    query_tiles``: ``[key_start, key_end, shift, mask]``, mask 0 none, 1 range/window, 2 also causal)."""
    if TREE:
        tile = KEY_TILES + (full_start + i) * 4
        mask = tl.load(tile + 3)
        return tl.load(tile) + tl.arange(0, BLOCK_N), tl.load(tile + 1), tl.load(tile + 2), mask == 2, mask != 0
    lo0, hi0, shift0, first0, last0, tiles0 = _key_runs(0, q_start, q_end, causal_start, full_start, full_end,
                                                        window, WINDOWED, BLOCK_N)
    lo1, hi1, shift1, first1, last1, _ = _key_runs(1, q_start, q_end, causal_start, full_start, full_end,
                                                   window, WINDOWED, BLOCK_N)
    own = i >= tiles0
    j = tl.where(own, i - tiles0, i)
    masked = (j < tl.where(own, first1, first0)) | (j >= tl.where(own, last1, last0))
    offs_n = tl.where(own, lo1, lo0) + j * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_n, tl.where(own, hi1, hi0), tl.where(own, shift1, shift0), own, masked


@triton.jit
def _num_key_tiles(q_start, q_end, causal_start, full_start, full_end, window,
                   TREE: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_N: tl.constexpr):
    if TREE:  # the row's key tiles are KEY_TILES[full_start:full_end]
        return full_end - full_start
    _, _, _, _, _, tiles0 = _key_runs(0, q_start, q_end, causal_start, full_start, full_end, window, WINDOWED, BLOCK_N)
    _, _, _, _, _, tiles1 = _key_runs(1, q_start, q_end, causal_start, full_start, full_end, window, WINDOWED, BLOCK_N)
    return tiles0 + tiles1


@triton.jit
def _visible(own, offs_m, offs_n, hi, shift, window, WINDOWED: tl.constexpr):
    """(rows x keys) visibility inside a masked tile: in range, causal in the own segment, in the window."""
    keep = (offs_n < hi)[None, :] & ((offs_n[None, :] <= offs_m[:, None]) | (own == 0))
    if WINDOWED:
        keep = keep & (offs_m[:, None] - offs_n[None, :] - shift < window)
    return keep


@triton.jit
def forward_kernel(
    Q, K, V, O, LSE, BLOCKS, KEY_TILES,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    num_tokens, score_in, score_out, window,
    NUM_HEADS: tl.constexpr, REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr,
    WINDOWED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, TREE: tl.constexpr,
):
    head, _ = _pid_head_row(NUM_HEADS)
    q_start, q_end, causal_start, full_start, full_end, offs_m, offs_d, m_valid, d_valid, q = _query_tile(
        BLOCKS, Q, stride_qt, stride_qh, head, SPLIT, NUM_HEADS, HEAD_DIM, BLOCK_D, BLOCK_M)
    if q_start < q_end:  # the table block may be shorter than SPLIT tiles
        MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
        kv_head = head // REP
        k_base = K + kv_head * stride_kh + offs_d[:, None]
        v_base = V + kv_head * stride_vh + offs_d[None, :]
        # A finite start keeps exp2(m_old - m_new) at 0, never NaN, for rows whose first tile is masked.
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        num_tiles = _num_key_tiles(q_start, q_end, causal_start, full_start, full_end, window, TREE, WINDOWED,
                                   BLOCK_N)
        for i in range(num_tiles):
            offs_n, hi, shift, own, masked = _key_tile(i, q_start, q_end, causal_start, full_start, full_end,
                                                       window, KEY_TILES, TREE, WINDOWED, BLOCK_N)
            n_valid = offs_n < hi
            kt = _load(k_base + offs_n[None, :] * stride_kt, d_valid[:, None], n_valid[None, :], MASK_D, True)
            s = _scores(q, kt, score_in, score_out, SOFTCAP, PRECISION, UPCAST)[0]
            if masked:
                s = tl.where(_visible(own, offs_m, offs_n, hi, shift, window, WINDOWED), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load(v_base + offs_n[:, None] * stride_vt, n_valid[:, None], d_valid[None, :], True, MASK_D)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
            m_i = m_new
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(O + offs_m[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
        tl.store(LSE + head * num_tokens + offs_m, (m_i + tl.log2(l_safe)) * LN2, mask=m_valid)


@triton.jit
def delta_kernel(
    O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, num_tokens,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``delta = rowsum(dO * O)`` per (head, token), fp32."""
    head, row = _pid_head_row(NUM_HEADS)
    offs_m = row * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < num_tokens)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + offs_m[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * num_tokens + offs_m, delta, mask=offs_m < num_tokens)


@triton.jit
def dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, BLOCKS, KEY_TILES,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    num_tokens, scale, score_in, score_out, window,
    NUM_HEADS: tl.constexpr, REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr,
    WINDOWED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, TREE: tl.constexpr,
):
    head, _ = _pid_head_row(NUM_HEADS)
    q_start, q_end, causal_start, full_start, full_end, offs_m, offs_d, m_valid, d_valid, q = _query_tile(
        BLOCKS, Q, stride_qt, stride_qh, head, SPLIT, NUM_HEADS, HEAD_DIM, BLOCK_D, BLOCK_M)
    if q_start < q_end:
        kv_head = head // REP
        qd_mask = m_valid[:, None] & d_valid[None, :]
        do = _load(DO + offs_m[:, None] * stride_dot + head * stride_doh + offs_d[None, :], m_valid[:, None],
                   d_valid[None, :], True, HEAD_DIM != BLOCK_D)
        lse2 = tl.load(LSE + head * num_tokens + offs_m, mask=m_valid, other=0.0) * LOG2E
        delta = tl.load(DELTA + head * num_tokens + offs_m, mask=m_valid, other=0.0)
        k_base = K + kv_head * stride_kh + offs_d[:, None]
        v_base = V + kv_head * stride_vh + offs_d[:, None]
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
        num_tiles = _num_key_tiles(q_start, q_end, causal_start, full_start, full_end, window, TREE, WINDOWED,
                                   BLOCK_N)
        for i in range(num_tiles):
            offs_n, hi, shift, own, masked = _key_tile(i, q_start, q_end, causal_start, full_start, full_end,
                                                       window, KEY_TILES, TREE, WINDOWED, BLOCK_N)
            n_valid = offs_n[None, :] < hi
            kt = _load(k_base + offs_n[None, :] * stride_kt, d_valid[:, None], n_valid, MASK_D, True)
            vt = _load(v_base + offs_n[None, :] * stride_vt, d_valid[:, None], n_valid, MASK_D, True)
            s, t = _scores(q, kt, score_in, score_out, SOFTCAP, PRECISION, UPCAST)
            p = tl.exp2(s - lse2[:, None])
            if masked:
                p = tl.where(_visible(own, offs_m, offs_n, hi, shift, window, WINDOWED), p, 0.0)
            ds = p * (dot(do, vt, PRECISION, UPCAST) - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq += dot(ds.to(kt.dtype), tl.trans(kt), PRECISION, UPCAST)
        tl.store(DQ + offs_m[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, POS, PART_DK, PART_DV, CHUNKS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    num_tokens, score_in, score_out, window,
    NUM_HEADS: tl.constexpr, REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr,
    WINDOWED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (query head, chunk row) program: chunk row ``[k_start, k_end, m_lo, m_hi]`` holds the
    partial dK/dV of keys ``k_start..k_end-1`` from queries ``m_lo..m_hi-1``, written unscaled in
    fp32 to ``PART_*[row, head]``; ``dkdv_reduce_kernel`` sums them in a fixed order."""
    head, pid_row = _pid_head_row(NUM_HEADS)
    row = CHUNKS + pid_row * 4
    k_start = tl.load(row)
    k_end = tl.load(row + 1)
    m_lo = tl.load(row + 2)
    m_hi = tl.load(row + 3)
    kv_head = head // REP
    offs_n = k_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < k_end
    d_valid = offs_d < HEAD_DIM
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    k = _load(K + offs_n[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], n_valid[:, None],
              d_valid[None, :], True, MASK_D)
    v = _load(V + offs_n[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], n_valid[:, None],
              d_valid[None, :], True, MASK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    num_tiles = (m_hi - m_lo + BLOCK_M - 1) // BLOCK_M
    # Without a window, query tiles starting before the key tile's last key hold the diagonal;
    # after them every tile but a partial last one sees the whole key tile.
    first_full = tl.minimum(tl.maximum(k_end - 1 - m_lo + BLOCK_M - 1, 0) // BLOCK_M, num_tiles)
    last_full = tl.maximum(first_full, (m_hi - m_lo) // BLOCK_M)
    if WINDOWED:
        # Path positions decide visibility (members' suffixes follow each other in the query range).
        pos_k = tl.load(POS + offs_n, mask=n_valid, other=0)
    # Tiles are transposed (keys x queries) so that every dot has the key tile's rows as its M.
    for i in range(num_tiles):
        offs_m = m_lo + i * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = offs_m < m_hi
        qt = _load(Q + offs_m[None, :] * stride_qt + head * stride_qh + offs_d[:, None], m_valid[None, :],
                   d_valid[:, None], True, MASK_D)
        do = _load(DO + offs_m[:, None] * stride_dot + head * stride_doh + offs_d[None, :], m_valid[:, None],
                   d_valid[None, :], True, MASK_D)
        lse2 = tl.load(LSE + head * num_tokens + offs_m, mask=m_valid, other=0.0) * LOG2E
        delta = tl.load(DELTA + head * num_tokens + offs_m, mask=m_valid, other=0.0)
        if WINDOWED:
            pos_q = tl.load(POS + offs_m, mask=m_valid, other=-1)  # -1: before every key, never visible
            dist = pos_q[None, :] - pos_k[:, None]
            keep = (dist >= 0) & (dist < window)
            todo = tl.max(tl.max(keep.to(tl.int32), 1), 0) > 0
        else:
            todo = True
        if todo:  # with a window, the compute of query tiles outside it is skipped
            st, t = _scores(k, qt, score_in, score_out, SOFTCAP, PRECISION, UPCAST)
            pt = tl.exp2(st - lse2[None, :])
            if WINDOWED:
                pt = tl.where(keep, pt, 0.0)
            elif (i < first_full) | (i >= last_full):
                pt = tl.where(m_valid[None, :] & (offs_m[None, :] >= offs_n[:, None]), pt, 0.0)
            dv += dot(pt.to(do.dtype), do, PRECISION, UPCAST)
            dst = pt * (dot(v, tl.trans(do), PRECISION, UPCAST) - delta[None, :])
            if SOFTCAP:
                dst = dst * (1.0 - t * t)
            dk += dot(dst.to(qt.dtype), tl.trans(qt), PRECISION, UPCAST)
    part = (pid_row * NUM_HEADS + head) * (BLOCK_N * BLOCK_D) + tl.arange(0, BLOCK_N)[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(PART_DK + part, dk)
    tl.store(PART_DV + part, dv)


@triton.jit
def dkdv_reduce_kernel(
    PART, OUT, REDUCE, stride_t, stride_h, scale,
    NUM_KV_HEADS: tl.constexpr, REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    """``OUT[keys, kv_head] = scale * sum over the key block's chunk rows and the kv head's query
    heads`` of the partials, in that fixed order (deterministic). Reduce row:
    ``[k_start, k_end, first chunk row, number of chunk rows]``."""
    kv_head, pid_row = _pid_head_row(NUM_KV_HEADS)
    row = REDUCE + pid_row * 4
    k_start = tl.load(row)
    k_end = tl.load(row + 1)
    first = tl.load(row + 2)
    count = tl.load(row + 3)
    offs_d = tl.arange(0, BLOCK_D)
    for r0 in tl.static_range(0, BLOCK_N, ROWS):
        offs_r = r0 + tl.arange(0, ROWS)
        acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
        for c in range(first, first + count):
            for r in range(REP):
                base = (c * (NUM_KV_HEADS * REP) + kv_head * REP + r) * (BLOCK_N * BLOCK_D)
                acc += tl.load(PART + base + offs_r[:, None] * BLOCK_D + offs_d[None, :])
        keys = k_start + offs_r
        tl.store(OUT + keys[:, None] * stride_t + kv_head * stride_h + offs_d[None, :],
                 (acc * scale).to(OUT.dtype.element_ty),
                 mask=(keys < k_end)[:, None] & (offs_d < HEAD_DIM)[None, :])
