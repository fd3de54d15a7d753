"""Plain-PyTorch prefix-grouped attention: the ``"torch"`` backend and the spec's naive reference.

* ``forward`` / ``backward``: the torch backend. Segment by segment (a prefix, or one member's
  suffix), in query chunks, so no T x T mask is ever built; float64-capable; any head dim. With a
  sliding window a chunk reads only the key rows inside its rows' windows. The backward adds every member's contribution to its group's prefix dK/dV in place (the sum over
  members of the repeated layout), from the forward's saved log-sum-exp.
* ``repeated_prefix_attention``: F_naive of the spec. It index-selects each member's
  ``[prefix; suffix]``, runs ordinary causal attention per sequence and collapses. Differentiable by
  autograd, which sums the prefix gradients over members through ``index_select``. Tests use it as
  the independent ground truth for both backends.
"""
from __future__ import annotations

import math

import torch

# Score elements (heads x queries x keys) one query chunk may hold: bounds the torch backend's memory.
_CHUNK_SCORE_ELEMENTS = 1 << 24


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every prefix-attention backend accumulates in and returns its LSE in: float64 for
    float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(num_heads: int, keys: int, window: int) -> int:
    """Query rows per chunk so that heads x rows x keys-seen stays within the budget. A segment's
    rows see at most ``keys`` keys; with a window, a chunk of s rows sees at most s + window - 1."""
    budget = _CHUNK_SCORE_ELEMENTS // num_heads
    rows = budget // keys
    if window:
        # The largest s with s * (s + window - 1) <= budget (the integer square root is at most 1 short).
        span = window - 1
        s = (math.isqrt(span * span + 4 * budget) - span) // 2
        rows = max(rows, s + 1 if (s + 1) * (s + 1 + span) <= budget else s)
    return max(1, rows)


def _chunks(segments: torch.Tensor, num_heads: int, window: int):
    """Yield ``(q0, q1, causal_start, full_start, full_end)`` query chunks of every segment."""
    for q0, q1, c0, f0, f1 in segments.tolist():
        step = _chunk_rows(num_heads, (f1 - f0) + (q1 - c0), window)
        for a in range(q0, q1, step):
            yield a, min(a + step, q1), c0, f0, f1


def _key_ranges(a, c0, f0, f1, window):
    """First full-range and first causal key that query rows a.. can see: keys before them lie
    outside the window of every row of the chunk and are skipped, not masked."""
    if not window:
        return f0, c0
    # Path positions: full key f0+j is at j, causal key c0+t at (f1-f0)+t, query row a at (f1-f0)+(a-c0).
    first = (f1 - f0) + (a - c0) - window + 1
    return f0 + min(max(first, 0), f1 - f0), c0 + max(first - (f1 - f0), 0)


def chunk_scores(rows, keys, query_pos, key_pos, scale, softcap, window):
    """Scores ``(Hkv, rep, L, N)`` of query ``rows (L, Hkv, rep, D)`` against ``keys (N, Hkv, D)``,
    capped to ``c tanh(s / c)`` when ``softcap`` is set, pairs a query cannot see (by the path
    positions ``query_pos (L, 1)`` and ``key_pos (1, N)``: later keys, and keys ``window`` or more
    back) set to -inf; and ``tanh(s / softcap)`` for the gradient (None without soft-capping).
    Shared by the segment (here) and tree (``tree.py``) backends, which differ only in which keys a
    chunk reads."""
    scores = torch.einsum("lhrd,nhd->hrln", rows, keys) * scale
    tanh = None
    if softcap:
        tanh = torch.tanh(scores / softcap)
        scores = tanh * softcap
    hidden = key_pos > query_pos
    if window:
        hidden |= query_pos - key_pos >= window
    return scores.masked_fill(hidden, float("-inf")), tanh


def chunk_output(scores, values):
    """A chunk's attention output ``(L, Hq, D)`` (accumulation dtype) and LSE ``(Hq, L)``."""
    chunk_lse = torch.logsumexp(scores, dim=-1)  # (Hkv, rep, L)
    probs = torch.exp(scores - chunk_lse[..., None])
    return torch.einsum("hrln,nhd->lhrd", probs, values).flatten(1, 2), chunk_lse.flatten(0, 1)


def chunk_gradients(scores, tanh, rows, keys, values, lse, grad_out, out, scale):
    """Gradients of a chunk from the forward's ``lse (Hq, L)``, ``out`` and upstream ``grad_out``
    (``(L, Hq, D)``): ``dq (L, Hq, D)`` and ``dk, dv (N, Hkv, D)`` of the chunk's keys."""
    num_kv = keys.shape[1]
    acc = rows.dtype
    probs = torch.exp(scores - lse.unflatten(0, (num_kv, -1))[..., None])
    d_out = grad_out.to(acc).unflatten(1, (num_kv, -1))  # (L, Hkv, rep, D)
    delta = (d_out * out.to(acc).unflatten(1, (num_kv, -1))).sum(-1).permute(1, 2, 0)
    d_values = torch.einsum("hrln,lhrd->nhd", probs, d_out)
    d_scores = probs * (torch.einsum("lhrd,nhd->hrln", d_out, values) - delta[..., None])
    if tanh is not None:
        d_scores = d_scores * (1 - tanh * tanh)  # d/ds of c tanh(s / c)
    dq = torch.einsum("hrln,nhd->lhrd", d_scores, keys).flatten(1, 2) * scale
    return dq, torch.einsum("hrln,lhrd->nhd", d_scores, rows) * scale, d_values


def _scores(q, k, v, a, b, c0, f0, f1, scale, softcap, window, acc):
    """``chunk_scores`` of query rows a..b-1 against the keys they can see (full-range rows
    f0'..f1-1, then causal rows c0'..b-1), with the query rows, keys and values."""
    full_lo, causal_lo = _key_ranges(a, c0, f0, f1, window)
    num_kv = k.shape[1]
    rows = q[a:b].to(acc).unflatten(1, (num_kv, -1))  # (L, Hkv, rep, D)
    keys = torch.cat([k[full_lo:f1], k[causal_lo:b]]).to(acc)  # (N, Hkv, D)
    values = torch.cat([v[full_lo:f1], v[causal_lo:b]]).to(acc)
    prefix_len = f1 - f0
    arange = lambda lo, hi: torch.arange(lo, hi, device=q.device)  # noqa: E731
    query_pos = prefix_len + arange(a - c0, b - c0)[:, None]
    key_pos = torch.cat([arange(full_lo - f0, prefix_len), prefix_len + arange(causal_lo - c0, b - c0)])[None, :]
    scores, tanh = chunk_scores(rows, keys, query_pos, key_pos, scale, softcap, window)
    return scores, tanh, rows, keys, values


def forward(q, k, v, segments, scale: float, softcap: float, window: int):
    """Grouped attention forward. ``q (T, Hq, D)``, ``k, v (T, Hkv, D)``, ``segments`` as
    ``PrefixGroupLayout.query_blocks(None)``; ``softcap`` > 0 caps scores to ``c tanh(s / c)``
    (0: off), ``window`` >= 1 limits each query to the keys less than ``window`` path positions
    back (0: off). Returns ``out (T, Hq, D)`` in q's dtype and ``lse (Hq, T)``, the natural-log
    log-sum-exp of the (capped) scaled scores (float32, or float64)."""
    acc = accumulation_dtype(q.dtype)
    num_tokens, num_heads, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((num_heads, num_tokens), dtype=acc, device=q.device)
    for a, b, c0, f0, f1 in _chunks(segments, num_heads, window):
        scores, _, _, _, values = _scores(q, k, v, a, b, c0, f0, f1, scale, softcap, window, acc)
        chunk_out, lse[:, a:b] = chunk_output(scores, values)
        out[a:b] = chunk_out.to(q.dtype)
    return out, lse


def backward(grad_out, q, k, v, out, lse, segments, scale: float, softcap: float, window: int):
    """Gradients ``(dq, dk, dv)`` of ``forward`` for upstream ``grad_out (T, Hq, D)``."""
    acc = accumulation_dtype(q.dtype)
    num_heads = q.shape[1]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for a, b, c0, f0, f1 in _chunks(segments, num_heads, window):
        scores, tanh, rows, keys, values = _scores(q, k, v, a, b, c0, f0, f1, scale, softcap, window, acc)
        dq[a:b], d_keys, d_values = chunk_gradients(scores, tanh, rows, keys, values, lse[:, a:b], grad_out[a:b],
                                                    out[a:b], scale)
        full_lo, causal_lo = _key_ranges(a, c0, f0, f1, window)
        num_full = f1 - full_lo
        # Several members' chunks add into the same prefix rows: the sum over members.
        dk[full_lo:f1] += d_keys[:num_full]
        dv[full_lo:f1] += d_values[:num_full]
        dk[causal_lo:b] += d_keys[num_full:]
        dv[causal_lo:b] += d_values[num_full:]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def causal_attention(q, k, v, scale: float, softcap: float | None = None, sliding_window: int | None = None):
    """Ordinary causal softmax attention of one sequence: ``q (L, Hq, D)``, ``k, v (L, Hkv, D)``,
    scores ``s`` capped to ``softcap * tanh(s / softcap)`` and query i seeing keys j with
    ``i - j < sliding_window`` when those are given."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    length = q.shape[0]
    visible = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    if sliding_window is not None:
        visible = visible.triu(1 - sliding_window)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def repeated_prefix_attention(q, k, v, layout, scale: float, *, softcap: float | None = None,
                              sliding_window: int | None = None):
    """F_naive of the spec: every member's ``[prefix; suffix]`` as its own causal sequence (with
    ``causal_attention``'s options), collapsed back to the packed layout. Shapes as ``forward``;
    differentiable by autograd."""
    q_rep, k_rep, v_rep = (t.index_select(0, layout.repeated_index) for t in (q, k, v))
    bounds = layout.repeated_cu_seqlens.tolist()
    outs = [causal_attention(q_rep[s:e], k_rep[s:e], v_rep[s:e], scale, softcap, sliding_window)
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs).index_select(0, layout.packed_to_repeated)
