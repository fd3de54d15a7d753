"""Prefix-grouped attention composed from FlashAttention-style kernels: the ``"flash"`` backend.

The grouped rule splits exactly into two ordinary attentions that vendor kernels run:

* every segment (each prompt, each completion) attends causally to itself;
* every completion token also attends to its whole prompt: per group, the group's completion tokens
  (one query sequence) against its prompt (one key sequence), non-causal, so a prompt's K/V are read
  once per group, not once per member.

Completion rows merge the two partial results through their log-sum-exps:
``l = log(e^l1 + e^l2)``, ``o = e^(l1-l) o1 + e^(l2-l) o2``. The backward needs no gradient through
the LSE: flash backwards recompute ``P = exp(S - LSE)`` and ``D = rowsum(dO * O)`` from what they are
given, so each part's backward gets the *merged* output and LSE, which makes its P the merged
softmax's restriction to its keys; the partial dQ of completion rows and the partial dK/dV of
prompt rows then add up (the sum over members happens inside the cross call, since a group's
completions are one query sequence).

Primitives (see ``primitive_unavailable_reason``):

* CUDA, varlen (one causal call over all segments, one cross call over all groups): FlashAttention-3
  (``flash_attn_interface``) on sm_90 when importable, else FlashAttention-2 (``flash_attn``) when
  installed, else PyTorch's built-in FlashAttention-2 (``torch.ops.aten._flash_attention_forward``).
  fp16/bf16. The merge and the gradient accumulation are one kernel each: the CUDA extension's
  (``merge_cuda.py``) when it is built, else Triton's (``merge.py``).
* CPU: PyTorch's CPU flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu`` and its
  backward), which takes ``(B, H, L, D)`` batches, not varlen: a segment or a group's cross call
  that has a batch of its own reads ``q/k/v`` in place (strided views); short segments of similar
  length are zero-padded at their end into one batch (exact under the causal mask: a real row never
  sees a later padding key, and a padding row's zero ``dO`` gives it zero gradient). Merge in torch.
  Small layouts (see ``_CPU_MASKED_GROUP``) instead run whole groups, or the whole batch, as causal
  calls with an additive mask of the grouped rule: fewer, bigger calls, no merge. fp16, bf16, fp32
  and fp64.

The schedule of calls is derived on the host from the layout's segment table
(``PrefixGroupLayout.query_blocks(None)``) once and cached by that table's identity, so a layer
call does no host work beyond launching.
"""
from __future__ import annotations

import bisect
import importlib.util
import weakref

import torch

from pyfastrl._backend import flash_merge_kernels
from pyfastrl.kernels.prefix_attention.reference import accumulation_dtype

CUDA_DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Head dims of PyTorch's built-in FlashAttention-2 and of FA2/FA3: multiples of 8 up to 256.
CUDA_MAX_HEAD_DIM = 256

# CPU batching: segments whose length is at least this fraction of their batch's longest are padded
# into one call; below it a new batch starts. Measured on a 2-core CPU (fp32, D 16-64): one padded
# call beats separate calls while the padding adds at most ~4x causal work to short rows.
_CPU_BATCH_FILL = 0.5
# Segments this short share a batch whatever their lengths: their cost is the call, not the padding.
_CPU_SHORT_SEGMENT = 16
# Small layouts: each group (prompt + its completions) as one causal call with an additive mask of
# the grouped rule (a subset of the causal rule in packed order) instead of causal + cross calls and a
# merge, when every group is at most _CPU_MASKED_GROUP tokens (the fixed cost per call dominates) or
# at most _CPU_MASKED_GROUP_MAX tokens with the masked call's causal pairs at most
# _CPU_MASKED_WASTE times the pairs the rule attends (little completion-vs-completion work thrown
# away). Measured on a 2-core CPU (fp32, D 16-64, fwd+bwd): masked per-group calls win at groups of
# 55-112 tokens and at 248 tokens with 3% waste, lose at 214 tokens with 17% waste (README).
_CPU_MASKED_GROUP = 128
_CPU_MASKED_GROUP_MAX = 512
_CPU_MASKED_WASTE = 1.1
# All masks of a layout (kept with its schedule, per dtype) hold at most this many elements (32 MiB in
# fp32); past it the layout runs causal + cross calls, so mask memory stays bounded at any batch size.
_CPU_MASKS_TOTAL = 1 << 23
# Batches of at most this many tokens are one masked call in place (no copies; a 64 KiB fp32 mask):
# measured faster than per-group calls at 112 tokens, slower at 221-240.
_CPU_MASKED_BATCH = 128
# Groups of similar length share one masked call while their masks hold at most this many elements
# (4 MiB in fp32), so the mask memory stays bounded whatever the batch size.
_CPU_MASK_ELEMENTS = 1 << 20


# -- the schedule ----------------------------------------------------------------------------------
class _Schedule:
    """Host-side description of the calls for one layout (built from its segment table).

    ``groups``: ``(prompt_start, prompt_end, group_end)`` per group; completions are the rows
    ``prompt_end..group_end-1``. ``segments``: ``(start, length)`` of every prompt and completion,
    in packed order. CPU batches and CUDA varlen offsets are derived lazily.
    """

    def __init__(self, table: torch.Tensor):
        rows = table.tolist()  # once per layout (the table is cached on it)
        ends: dict[int, list[int]] = {}
        self.segments = sorted((q0, q1 - q0) for q0, q1, _, _, _ in rows)
        for q0, q1, _, f0, f1 in rows:
            if f0 == f1:  # a prompt
                ends.setdefault(q0, [q0, q1, q1])[1] = q1
            else:
                group = ends.setdefault(f0, [f0, f1, f1])
                group[2] = max(group[2], q1)
        self.groups = sorted(tuple(g) for g in ends.values())
        self.total_tokens = sum(length for _, length in self.segments)
        self.device = table.device
        self._cpu_calls = None
        self._varlen = None

    def cpu_calls(self):
        """``(causal, cross)``: the CPU kernel calls as ``_Rows`` batches. ``causal``: segments of
        similar length (see ``_CPU_BATCH_FILL``) padded into one call, or, for small groups (see
        ``_CPU_MASKED_GROUP``), whole groups under their masks with ``cross`` empty; ``cross``:
        ``(queries, keys)`` per set of groups with equal prompt length (their completions padded)."""
        if self._cpu_calls is None and self._masked_calls_pay():
            self._cpu_calls = self._masked_group_calls(), []
        if self._cpu_calls is None:
            order = sorted(self.segments, key=lambda s: s[1], reverse=True)
            causal, current = [], []
            for segment in order:
                longest = current[0][1] if current else 0
                if current and segment[1] < _CPU_BATCH_FILL * longest and longest > _CPU_SHORT_SEGMENT:
                    causal.append(_Rows(current))
                    current = []
                current.append(segment)
            causal.append(_Rows(current))
            by_prompt: dict[int, list[tuple[int, int, int]]] = {}
            for p0, p1, end in self.groups:
                by_prompt.setdefault(p1 - p0, []).append((p0, p1, end))
            cross = [(_Rows([(p1, end - p1) for _, p1, end in groups]), _Rows([(p0, p1 - p0) for p0, p1, _ in groups]))
                     for groups in by_prompt.values()]
            self._cpu_calls = causal, cross
        return self._cpu_calls

    def _masked_calls_pay(self) -> bool:
        """Whether whole groups under masks beat causal + cross calls (see ``_CPU_MASKED_GROUP``)."""
        longest = max(end - p0 for p0, _, end in self.groups)
        if sum((end - p0) ** 2 for p0, _, end in self.groups) > _CPU_MASKS_TOTAL:
            return False
        if longest <= _CPU_MASKED_GROUP:
            return True
        if longest > _CPU_MASKED_GROUP_MAX:
            return False
        group_starts = [p0 for p0, _, _ in self.groups]
        needed = 0  # pairs the rule attends: each segment causally, each completion its prompt too
        for start, length in self.segments:
            p0, p1, _ = self.groups[bisect.bisect_right(group_starts, start) - 1]
            needed += length * (length + 1) // 2 + (length * (p1 - p0) if start >= p1 else 0)
        masked = sum((end - p0) * (end - p0 + 1) // 2 for p0, _, end in self.groups)
        return masked <= _CPU_MASKED_WASTE * needed

    def _masked_group_calls(self):
        """Whole groups as masked ``_Rows`` calls: the whole batch in place as one call when it is
        at most ``_CPU_MASKED_BATCH`` tokens, else groups of similar length (``_CPU_BATCH_FILL``)
        padded into calls whose masks hold at most ``_CPU_MASK_ELEMENTS`` elements."""
        starts = torch.tensor([start for start, _ in self.segments])
        lengths = torch.tensor([length for _, length in self.segments])
        group_lengths = torch.tensor([end - p0 for p0, _, end in self.groups])
        tokens = (torch.repeat_interleave(starts, lengths),  # per token: its segment's first row,
                  *(torch.repeat_interleave(torch.tensor(bound), group_lengths)  # its group's prompt
                    for bound in zip(*((p0, p1) for p0, p1, _ in self.groups))))
        if self.total_tokens <= _CPU_MASKED_BATCH:
            return [_Rows([(0, self.total_tokens)], allowed=_grouped_rule([(0, self.total_tokens)], *tokens))]
        order = sorted(((p0, end - p0) for p0, _, end in self.groups), key=lambda g: g[1], reverse=True)
        calls, current = [], []
        for group in order + [None]:
            longest = current[0][1] if current else 0
            if current and (group is None or (len(current) + 1) * longest ** 2 > _CPU_MASK_ELEMENTS
                            or group[1] < _CPU_BATCH_FILL * longest):
                calls.append(_Rows(current, allowed=_grouped_rule(current, *tokens)))
                current = []
            current.append(group)
        return calls

    def varlen(self):
        """CUDA offsets: ``(cu_all, max_segment, cross_rows, prompt_rows, cu_q, cu_k, max_q, max_k)``.

        The segments tile ``0..T-1`` in order, so the causal call reads q/k/v in place with
        ``cu_all``; the cross call reads the gathered completion rows (``cross_rows``, grouped) and
        prompt rows (``prompt_rows``) with ``cu_q`` / ``cu_k``."""
        if self._varlen is None:
            on = dict(device=self.device)
            starts = [start for start, _ in self.segments] + [self.total_tokens]
            cross = [torch.arange(p1, end) for _, p1, end in self.groups]
            prompts = [torch.arange(p0, p1) for p0, p1, _ in self.groups]
            cu_q = [0]
            cu_k = [0]
            for p0, p1, end in self.groups:
                cu_q.append(cu_q[-1] + end - p1)
                cu_k.append(cu_k[-1] + p1 - p0)
            self._varlen = (
                torch.tensor(starts, dtype=torch.int32, **on), max(length for _, length in self.segments),
                torch.cat(cross).to(**on), torch.cat(prompts).to(**on),
                torch.tensor(cu_q, dtype=torch.int32, **on), torch.tensor(cu_k, dtype=torch.int32, **on),
                max(end - p1 for _, p1, end in self.groups), max(p1 - p0 for p0, p1, _ in self.groups),
            )
        return self._varlen


_SCHEDULES: dict[int, tuple[weakref.ref, _Schedule]] = {}


def _schedule(table: torch.Tensor) -> _Schedule:
    """The schedule of a segment table, cached while the table lives (layouts cache their tables)."""
    entry = _SCHEDULES.get(id(table))
    if entry is not None and entry[0]() is table:
        return entry[1]
    for key in [key for key, (ref, _) in _SCHEDULES.items() if ref() is None]:
        del _SCHEDULES[key]
    schedule = _Schedule(table)
    _SCHEDULES[id(table)] = (weakref.ref(table), schedule)
    return schedule


# -- availability ----------------------------------------------------------------------------------
# Looked up once: the backend choice runs inside torch.compile'd code, which cannot trace find_spec.
_HAS_FA3 = importlib.util.find_spec("flash_attn_interface") is not None
_HAS_FA2 = importlib.util.find_spec("flash_attn") is not None


def cuda_primitive(device: torch.device) -> str:
    """The vendor kernel the CUDA composition calls: ``"fa3"``, ``"fa2"`` or ``"aten"``."""
    major, _ = torch.cuda.get_device_capability(device)
    if major == 9 and _HAS_FA3:
        return "fa3"
    if _HAS_FA2:
        return "fa2"
    return "aten"


def primitive_unavailable_reason(device: torch.device) -> str | None:
    """Why no flash primitive runs on ``device`` (None when one does)."""
    if device.type == "cpu":
        if not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
            return "this PyTorch build has no CPU flash attention kernel"
        return None
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"FlashAttention kernels need compute capability >= 8.0 (this GPU is {major}.x)"
        if cuda_primitive(device) == "aten" and not torch.backends.cuda.is_flash_attention_available():
            return "this PyTorch build has no FlashAttention kernels and flash_attn is not installed"
        return None
    return f"no flash attention primitive for device type '{device.type}'"


def unsupported_reason(dtype: torch.dtype, head_dim: int, device: torch.device) -> str | None:
    """Why the flash backend cannot take these inputs (None when it can)."""
    if device.type == "cpu":
        if dtype not in CPU_DTYPES:
            return f"on CPU it supports {CPU_DTYPES}, got {dtype}"
        return None
    if dtype not in CUDA_DTYPES:
        return f"on CUDA the FlashAttention kernels support {CUDA_DTYPES}, got {dtype}"
    if head_dim % 8 != 0 or head_dim > CUDA_MAX_HEAD_DIM:
        return f"on CUDA the FlashAttention kernels need a head dim that is a multiple of 8 up to " \
               f"{CUDA_MAX_HEAD_DIM}, got D={head_dim}"
    return None


# -- public entry points ---------------------------------------------------------------------------
def forward(q, k, v, segments, scale: float):
    """Grouped attention forward: ``q (T, Hq, D)``, ``k, v (T, Hkv, D)``, ``segments`` as
    ``PrefixGroupLayout.query_blocks(None)``. Returns ``out (T, Hq, D)`` in q's dtype and
    ``lse (Hq, T)`` (natural log; float32, or float64 for float64 inputs)."""
    schedule = _schedule(segments)
    if q.device.type == "cuda":
        return _cuda_forward(q, k, v, schedule, scale)
    return _cpu_forward(q, k, v, schedule, scale)


def backward(grad_out, q, k, v, out, lse, segments, scale: float):
    """Gradients ``(dq, dk, dv)`` of ``forward`` from its merged ``out`` and ``lse``."""
    schedule = _schedule(segments)
    if q.device.type == "cuda":
        return _cuda_backward(grad_out, q, k, v, out, lse, schedule, scale)
    return _cpu_backward(grad_out, q, k, v, out, lse, schedule, scale)


# -- CPU -------------------------------------------------------------------------------------------
class _Rows:
    """Row ranges ``[(start, length), ...]`` of the packed batch as one ``(n, H, L, D)`` kernel batch.

    A single range is read in place (a strided view, no copy); several are copied into a zero
    buffer, each padded at its end to the longest length L. ``allowed`` (``(n, L, L)`` bool, or
    None for plain causal calls) is the call's attention rule, given to the kernel as an additive
    mask of the inputs' dtype (``mask``), built once per dtype."""

    def __init__(self, ranges, allowed: torch.Tensor | None = None):
        self.allowed = allowed
        self._masks: dict[torch.dtype, torch.Tensor] = {}
        self.n = len(ranges)
        self.length = max(length for _, length in ranges)
        if self.n == 1:
            start, length = ranges[0]
            self.index = slice(start, start + length)
        else:
            self.index = torch.cat([torch.arange(start, start + length) for start, length in ranges])
            self.slots = torch.cat([torch.arange(i * self.length, i * self.length + length)
                                    for i, (_, length) in enumerate(ranges)])

    def mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive ``(n, 1, L, L)`` mask of ``allowed`` in ``dtype`` (None without one)."""
        if self.allowed is None:
            return None
        if dtype not in self._masks:
            blocked = torch.zeros(self.allowed.shape, dtype=dtype).masked_fill_(~self.allowed, float("-inf"))
            self._masks[dtype] = blocked.unsqueeze(1)
        return self._masks[dtype]

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """``x (T, H, D)`` -> ``(n, H, L, D)``."""
        if self.n == 1:
            return x[self.index].transpose(0, 1).unsqueeze(0)
        buffer = x.new_zeros((self.n * self.length,) + x.shape[1:])
        buffer[self.slots] = x[self.index]
        return buffer.unflatten(0, (self.n, self.length)).transpose(1, 2)

    def lse_batch(self, lse: torch.Tensor) -> torch.Tensor:
        """``lse (H, T)`` -> ``(n, H, L)`` (padding rows 0)."""
        if self.n == 1:
            return lse[None, :, self.index]
        buffer = lse.new_zeros((lse.shape[0], self.n * self.length))
        buffer[:, self.slots] = lse[:, self.index]
        return buffer.unflatten(1, (self.n, self.length)).transpose(0, 1)

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        """The real rows ``(N, H, D)`` of an ``(n, H, L, D)`` kernel result, in ``index`` order."""
        if self.n == 1:
            return batch[0].transpose(0, 1)
        return batch.transpose(1, 2).flatten(0, 1)[self.slots]

    def lse_rows(self, lse: torch.Tensor) -> torch.Tensor:
        """``(n, H, L)`` -> ``(H, N)``."""
        if self.n == 1:
            return lse[0]
        return lse.transpose(0, 1).flatten(1)[:, self.slots]


def _grouped_rule(ranges, segment_first, prompt_start, prompt_end) -> torch.Tensor:
    """``(n, L, L)`` bool: the grouped rule over row ranges ``[(start, length)]`` of whole groups,
    each padded at its end to the longest L, in local positions: row r sees key c <= r when c is in
    r's own segment or in its group's prompt. The other arguments are ``(T,)`` per-token rows (a
    prompt token's own prompt is its segment). Padding rows see themselves only (their outputs are
    dropped and their zero ``dO`` gives zero gradients)."""
    length = max(n for _, n in ranges)
    position = torch.arange(length)
    first = position.repeat(len(ranges), 1)
    low, high = torch.zeros_like(first), torch.zeros_like(first)
    for i, (start, n) in enumerate(ranges):  # per range, not per token
        for local, token in ((first, segment_first), (low, prompt_start), (high, prompt_end)):
            local[i, :n] = token[start:start + n] - start
    rows, keys = position[:, None], position[None, :]
    in_prompt = (keys >= low[:, :, None]) & (keys < high[:, :, None])
    return (keys <= rows) & ((keys >= first[:, :, None]) | in_prompt)


def _merged(out_rows, lse_rows, other_out, other_lse):
    """Two partial attentions of the same rows, ``(N, H, D)`` outputs and ``(H, N)`` LSEs, merged
    through their log-sum-exps (torch; the CUDA path's fused kernel is in merge.py)."""
    lse = torch.logaddexp(lse_rows, other_lse)
    weight = torch.exp(lse_rows - lse).T.unsqueeze(-1)
    other_weight = torch.exp(other_lse - lse).T.unsqueeze(-1)
    return out_rows.to(lse.dtype) * weight + other_out.to(lse.dtype) * other_weight, lse


def _cpu_forward(q, k, v, schedule: _Schedule, scale: float):
    attend = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    causal, cross = schedule.cpu_calls()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=accumulation_dtype(q.dtype), device=q.device)
    for rows in causal:
        o, l = attend(rows.batch(q), rows.batch(k), rows.batch(v), 0.0, True, attn_mask=rows.mask(q.dtype),
                      scale=scale)
        out[rows.index] = rows.rows(o)
        lse[:, rows.index] = rows.lse_rows(l)
    for queries, keys in cross:
        o, l = attend(queries.batch(q), keys.batch(k), keys.batch(v), 0.0, False, scale=scale)
        index = queries.index
        merged_out, lse[:, index] = _merged(out[index], lse[:, index], queries.rows(o), queries.lse_rows(l))
        out[index] = merged_out.to(out.dtype)
    return out, lse


def _cpu_backward(grad_out, q, k, v, out, lse, schedule: _Schedule, scale: float):
    attend_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    causal, cross = schedule.cpu_calls()
    acc = accumulation_dtype(q.dtype)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.empty(k.shape, dtype=acc, device=q.device)
    dv = torch.empty(v.shape, dtype=acc, device=q.device)
    for rows in causal:
        grads = attend_backward(*(rows.batch(t) for t in (grad_out, q, k, v, out)), rows.lse_batch(lse),
                                0.0, True, attn_mask=rows.mask(q.dtype), scale=scale)
        for total, part in zip((dq, dk, dv), grads):
            total[rows.index] = rows.rows(part).to(total.dtype)
    for queries, keys in cross:
        d_q, d_k, d_v = attend_backward(
            queries.batch(grad_out), queries.batch(q), keys.batch(k), keys.batch(v), queries.batch(out),
            queries.lse_batch(lse), 0.0, False, scale=scale)
        dq[queries.index] += queries.rows(d_q)
        dk[keys.index] += keys.rows(d_k)
        dv[keys.index] += keys.rows(d_v)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# -- CUDA ------------------------------------------------------------------------------------------
def _merge_kernels():
    """The merge / gradient-accumulation kernels of the CUDA path, as ``pyfastrl._backend``'s
    ``flash_merge_kernels()`` chooses: the CUDA extension's (``merge_cuda``, an error saying why
    when it cannot run) or Triton's (``merge``); both modules have the same functions."""
    if flash_merge_kernels() == "cuda":
        from pyfastrl.kernels.prefix_attention import merge_cuda

        reason = merge_cuda.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"prefix_grouped_attention: the CUDA extension's merge was asked for but {reason}")
        return merge_cuda
    # Imported on first CUDA use: importing Triton is slow, and TRITON_INTERPRET must be set first.
    from pyfastrl.kernels.prefix_attention import merge

    return merge


def _cuda_forward(q, k, v, schedule: _Schedule, scale: float):
    cu_all, max_segment, cross_rows, prompt_rows, cu_q, cu_k, max_q, max_k = schedule.varlen()
    name = cuda_primitive(q.device)
    vendor = _VENDORS[name]
    out, lse = vendor.forward(q, k, v, cu_all, cu_all, max_segment, max_segment, True, scale)
    cross_out, cross_lse = vendor.forward(q[cross_rows], k[prompt_rows], v[prompt_rows], cu_q, cu_k, max_q, max_k,
                                          False, scale)
    for got, rows in ((lse, q.shape[0]), (cross_lse, cross_rows.numel())):
        if tuple(got.shape) != (q.shape[1], rows):  # the packed varlen LSE layout every step relies on
            raise RuntimeError(f"prefix_grouped_attention: backend 'flash' ({name}) returned a log-sum-exp of shape "
                               f"{tuple(got.shape)}, expected (heads, tokens) = {(q.shape[1], rows)}: this version "
                               "of the kernel is not supported; use backend='triton'")
    _merge_kernels().merge_(out, lse, cross_out, cross_lse, cross_rows)
    return out, lse


def _cuda_backward(grad_out, q, k, v, out, lse, schedule: _Schedule, scale: float):
    cu_all, max_segment, cross_rows, prompt_rows, cu_q, cu_k, max_q, max_k = schedule.varlen()
    vendor = _VENDORS[cuda_primitive(q.device)]
    dq, dk, dv = vendor.backward(grad_out, q, k, v, out, lse, cu_all, cu_all, max_segment, max_segment, True, scale)
    cross_lse = lse[:, cross_rows].contiguous()
    cross_dq, cross_dk, cross_dv = vendor.backward(
        grad_out[cross_rows], q[cross_rows], k[prompt_rows], v[prompt_rows], out[cross_rows], cross_lse,
        cu_q, cu_k, max_q, max_k, False, scale)
    _merge_kernels().add_rows_(dq, cross_dq, cross_rows, dk, dv, cross_dk, cross_dv, prompt_rows)
    return dq, dk, dv


class _AtenFlash:
    """PyTorch's built-in FlashAttention-2 (varlen through cum_seq_q / cum_seq_k)."""

    @staticmethod
    def forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        out, lse, _, _, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale)
        return out, lse

    @staticmethod
    def backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        # Without dropout the RNG state is never read; the op still takes the two tensors.
        unused = torch.empty(2, dtype=torch.int64, device=q.device)
        return torch.ops.aten._flash_attention_backward(
            grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, unused, unused, scale=scale)


class _FlashAttn2:
    """The ``flash_attn`` package's varlen forward/backward (FlashAttention-2)."""

    @staticmethod
    def forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        from flash_attn import flash_attn_interface as fa

        result = fa._flash_attn_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0,
                                               softmax_scale=scale, causal=causal)
        return result[0], result[1]

    @staticmethod
    def backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        from flash_attn import flash_attn_interface as fa

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        fa._flash_attn_varlen_backward(grad_out, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k,
                                       dropout_p=0.0, softmax_scale=scale, causal=causal)
        return dq, dk, dv


class _FlashAttn3:
    """FlashAttention-3 (``flash_attn_interface``, Hopper) varlen forward/backward."""

    @staticmethod
    def forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        import flash_attn_interface as fa3

        result = fa3._flash_attn_forward(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                         max_seqlen_k=max_k, softmax_scale=scale, causal=causal)
        return result[0], result[1]

    @staticmethod
    def backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        import flash_attn_interface as fa3

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        fa3._flash_attn_backward(grad_out, q, k, v, out, lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                 max_seqlen_q=max_q, max_seqlen_k=max_k, dq=dq, dk=dk, dv=dv,
                                 softmax_scale=scale, causal=causal)
        return dq, dk, dv


_VENDORS = {"aten": _AtenFlash, "fa2": _FlashAttn2, "fa3": _FlashAttn3}
