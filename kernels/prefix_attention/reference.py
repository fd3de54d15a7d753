"""Plain-PyTorch prefix-grouped attention: the ``"torch"`` backend and the spec's naive reference.

* ``forward`` / ``backward``: the torch backend. Segment by segment (a prefix, or one member's
  suffix), in query chunks, so no T x T mask is ever built; float64-capable; any head dim. The
  backward adds every member's contribution to its group's prefix dK/dV in place (the sum over
  members of the repeated layout), from the forward's saved log-sum-exp.
* ``repeated_prefix_attention``: F_naive of the spec. It index-selects each member's
  ``[prefix; suffix]``, runs ordinary causal attention per sequence and collapses. Differentiable by
  autograd, which sums the prefix gradients over members through ``index_select``. Tests use it as
  the independent ground truth for both backends.
"""
from __future__ import annotations

import torch

# Score elements (heads x queries x keys) one query chunk may hold: bounds the torch backend's memory.
_CHUNK_SCORE_ELEMENTS = 1 << 24


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(segments: torch.Tensor, num_heads: int):
    """Yield ``(q0, q1, causal_start, full_start, full_end)`` query chunks of every segment."""
    for q0, q1, c0, f0, f1 in segments.tolist():
        keys = (f1 - f0) + (q1 - c0)
        step = max(1, _CHUNK_SCORE_ELEMENTS // (num_heads * keys))
        for a in range(q0, q1, step):
            yield a, min(a + step, q1), c0, f0, f1


def _scores(q, k, a, b, c0, f0, f1, scale, acc):
    """Scores ``(Hkv, rep, L, N)`` of query rows a..b-1 against their keys, plus the key rows.

    Keys are the full range f0..f1-1 followed by the causal range c0..b-1; masked pairs are -inf.
    """
    num_kv = k.shape[1]
    rows = q[a:b].to(acc).unflatten(1, (num_kv, -1))  # (L, Hkv, rep, D)
    keys = torch.cat([k[f0:f1], k[c0:b]]).to(acc)  # (N, Hkv, D)
    scores = torch.einsum("lhrd,nhd->hrln", rows, keys) * scale
    query_pos = torch.arange(a, b, device=q.device)[:, None]
    key_pos = torch.cat([torch.full((f1 - f0,), -1, device=q.device), torch.arange(c0, b, device=q.device)])
    scores = scores.masked_fill(key_pos[None, :] > query_pos, float("-inf"))
    return scores, rows, keys


def forward(q, k, v, segments, scale: float):
    """Grouped attention forward. ``q (T, Hq, D)``, ``k, v (T, Hkv, D)``, ``segments`` as
    ``PrefixGroupLayout.query_blocks(None)``. Returns ``out (T, Hq, D)`` in q's dtype and
    ``lse (Hq, T)``, the natural-log log-sum-exp of the scaled scores (float32, or float64)."""
    acc = _accumulation_dtype(q.dtype)
    num_tokens, num_heads, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((num_heads, num_tokens), dtype=acc, device=q.device)
    for a, b, c0, f0, f1 in _chunks(segments, num_heads):
        scores, _, _ = _scores(q, k, a, b, c0, f0, f1, scale, acc)
        chunk_lse = torch.logsumexp(scores, dim=-1)  # (Hkv, rep, L)
        probs = torch.exp(scores - chunk_lse[..., None])
        values = torch.cat([v[f0:f1], v[c0:b]]).to(acc)
        out[a:b] = torch.einsum("hrln,nhd->lhrd", probs, values).flatten(1, 2).to(q.dtype)
        lse[:, a:b] = chunk_lse.flatten(0, 1)
    return out, lse


def backward(grad_out, q, k, v, out, lse, segments, scale: float):
    """Gradients ``(dq, dk, dv)`` of ``forward`` for upstream ``grad_out (T, Hq, D)``."""
    acc = _accumulation_dtype(q.dtype)
    num_heads = q.shape[1]
    num_kv = k.shape[1]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for a, b, c0, f0, f1 in _chunks(segments, num_heads):
        scores, rows, keys = _scores(q, k, a, b, c0, f0, f1, scale, acc)
        probs = torch.exp(scores - lse[:, a:b].unflatten(0, (num_kv, -1))[..., None])
        values = torch.cat([v[f0:f1], v[c0:b]]).to(acc)
        d_out = grad_out[a:b].to(acc).unflatten(1, (num_kv, -1))  # (L, Hkv, rep, D)
        delta = (d_out * out[a:b].to(acc).unflatten(1, (num_kv, -1))).sum(-1).permute(1, 2, 0)
        d_values = torch.einsum("hrln,lhrd->nhd", probs, d_out)
        d_scores = probs * (torch.einsum("lhrd,nhd->hrln", d_out, values) - delta[..., None])
        dq[a:b] = torch.einsum("hrln,nhd->lhrd", d_scores, keys).flatten(1, 2) * scale
        d_keys = torch.einsum("hrln,lhrd->nhd", d_scores, rows) * scale
        num_full = f1 - f0
        # Several members' chunks add into the same prefix rows: the sum over members.
        dk[f0:f1] += d_keys[:num_full]
        dv[f0:f1] += d_values[:num_full]
        dk[c0:b] += d_keys[num_full:]
        dv[c0:b] += d_values[num_full:]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def causal_attention(q, k, v, scale: float):
    """Ordinary causal softmax attention of one sequence: ``q (L, Hq, D)``, ``k, v (L, Hkv, D)``."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    length = q.shape[0]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def repeated_prefix_attention(q, k, v, layout, scale: float):
    """F_naive of the spec: every member's ``[prefix; suffix]`` as its own causal sequence, collapsed
    back to the packed layout. Shapes as ``forward``; differentiable by autograd."""
    q_rep, k_rep, v_rep = (t.index_select(0, layout.repeated_index) for t in (q, k, v))
    bounds = layout.repeated_cu_seqlens.tolist()
    outs = [causal_attention(q_rep[s:e], k_rep[s:e], v_rep[s:e], scale) for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs).index_select(0, layout.packed_to_repeated)
