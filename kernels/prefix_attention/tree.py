"""Plain-PyTorch attention over a prefix tree (``PrefixTreeLayout``): the ``"torch"`` backend.

Segment by segment, in query chunks (no T x T mask): a segment's queries read the keys of its
ancestors (gathered through ``ancestor_index``, in path order) and, causally, its own segment.
Every (query, key) pair shared by several paths is computed once; the backward adds each segment's
contribution to its ancestors' dK/dV, which is the sum over the paths through them.
"""
from __future__ import annotations

import torch

from pyfastrl.kernels.prefix_attention.reference import (
    _chunk_rows,
    accumulation_dtype,
    chunk_gradients,
    chunk_output,
    chunk_scores,
)


def _chunks(segment_table: torch.Tensor, num_heads: int, window: int):
    """Yield ``(a, b, start, ancestor_offset, ancestor_tokens)``: query rows a..b-1 of the segment
    that begins at packed row ``start``. ``segment_table`` is the layout's host table."""
    for start, end, offset, count in segment_table.tolist():
        step = _chunk_rows(num_heads, count + (end - start), window)
        for a in range(start, end, step):
            yield a, min(a + step, end), start, offset, count


def _key_ranges(a: int, start: int, count: int, window: int) -> tuple[int, int]:
    """First ancestor key (by path position) and first own-segment key row that query rows a.. can
    see: keys before them lie outside the window of every row of the chunk and are skipped."""
    if not window:
        return 0, start
    first = count + (a - start) - window + 1  # path position of the oldest key row a still sees
    return min(max(first, 0), count), start + max(first - count, 0)


def _scores(q, k, v, ancestor_index, a, b, start, offset, count, scale, softcap, window, acc):
    """``reference.chunk_scores`` of query rows a..b-1 against the keys they can see (ancestor keys
    then own-segment keys), with the query rows, keys, values and the packed indices of the
    ancestor keys."""
    first_ancestor, first_own = _key_ranges(a, start, count, window)
    index = ancestor_index[offset + first_ancestor:offset + count]
    num_kv = k.shape[1]
    rows = q[a:b].to(acc).unflatten(1, (num_kv, -1))  # (L, Hkv, rep, D)
    keys = torch.cat([k.index_select(0, index), k[first_own:b]]).to(acc)  # (N, Hkv, D)
    values = torch.cat([v.index_select(0, index), v[first_own:b]]).to(acc)
    arange = lambda lo, hi: torch.arange(lo, hi, device=q.device)  # noqa: E731
    query_pos = count + arange(a - start, b - start)[:, None]
    key_pos = torch.cat([arange(first_ancestor, count), count + arange(first_own - start, b - start)])[None, :]
    scores, tanh = chunk_scores(rows, keys, query_pos, key_pos, scale, softcap, window)
    return scores, tanh, rows, keys, values, index


def forward(q, k, v, segment_table, ancestor_index, scale: float, softcap: float, window: int):
    """Tree attention forward.

    Args:
        q: ``(T, Hq, D)``; k, v: ``(T, Hkv, D)``, Hq a multiple of Hkv.
        segment_table: ``PrefixTreeLayout.segment_table``, ``(N, 4)`` int64 on the CPU.
        ancestor_index: ``PrefixTreeLayout.ancestor_index``, int64 on q's device.
        scale: score scale; softcap: > 0 caps scores to ``c tanh(s / c)`` (0: off); window: >= 1
            limits each query to keys less than ``window`` path positions back (0: off).

    Returns:
        ``out (T, Hq, D)`` in q's dtype and ``lse (Hq, T)``, the log-sum-exp of the (capped) scaled
        scores (float32, or float64 for float64 inputs).
    """
    acc = accumulation_dtype(q.dtype)
    num_tokens, num_heads, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((num_heads, num_tokens), dtype=acc, device=q.device)
    for a, b, start, offset, count in _chunks(segment_table, num_heads, window):
        scores, _, _, _, values, _ = _scores(q, k, v, ancestor_index, a, b, start, offset, count,
                                             scale, softcap, window, acc)
        chunk_out, lse[:, a:b] = chunk_output(scores, values)
        out[a:b] = chunk_out.to(q.dtype)
    return out, lse


def backward(grad_out, q, k, v, out, lse, segment_table, ancestor_index, scale: float, softcap: float,
             window: int):
    """Gradients ``(dq, dk, dv)`` of ``forward`` for upstream ``grad_out (T, Hq, D)``; an ancestor's
    dK/dV sum the contributions of every segment below it."""
    acc = accumulation_dtype(q.dtype)
    num_heads = q.shape[1]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for a, b, start, offset, count in _chunks(segment_table, num_heads, window):
        scores, tanh, rows, keys, values, index = _scores(q, k, v, ancestor_index, a, b, start, offset, count,
                                                          scale, softcap, window, acc)
        dq[a:b], d_keys, d_values = chunk_gradients(scores, tanh, rows, keys, values, lse[:, a:b], grad_out[a:b],
                                                    out[a:b], scale)
        num_ancestors = index.shape[0]
        # The index has no repeats, so each ancestor row receives one addition per chunk.
        dk.index_add_(0, index, d_keys[:num_ancestors])
        dv.index_add_(0, index, d_values[:num_ancestors])
        first_own = b - (d_keys.shape[0] - num_ancestors)
        dk[first_own:b] += d_keys[num_ancestors:]
        dv[first_own:b] += d_values[num_ancestors:]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
