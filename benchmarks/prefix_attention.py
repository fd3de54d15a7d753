"""Benchmark case ``prefix-attention``: prefix-grouped attention vs what a user would run instead.

    pyfastrl bench prefix-attention [--quick] [--cpu]     (or python benchmarks/prefix_attention.py)

One prompt of P tokens with G completions of S tokens, bf16, D=128, Hq=32, Hkv=8 (CUDA). Methods,
side by side on the same random inputs, forward and forward+backward:
  pyfastrl             prefix_grouped_attention on the packed batch [P | S_1 .. S_G]: Triton backend
                       (CUDA), flash backend (CPU: PyTorch's CPU flash kernel composed)
  pyfastrl_flash       (CUDA) the flash backend: vendor FlashAttention varlen calls composed
  pyfastrl_torch       (CUDA) the same op's plain PyTorch backend
  sdpa_repeated        the naive baseline: every completion with its own prompt copy, (G, H, P+S, D),
                       causal SDPA on its FlashAttention backend (on the CPU: SDPA's CPU kernel)
  sdpa_repeated_cudnn  the same batch on SDPA's cuDNN backend
  flex                 FlexAttention on the packed batch with a shared-prefix block mask (padded to
                       128; the block mask is built once per batch, outside the timing)
  prefix_grouper       the prefix-grouper package (prefix self-attention + suffix attention over
                       [prefix | suffix] keys, each through causal SDPA), when installed
Repeated and prefix_grouper inputs get K/V expanded to Hq heads beforehand (outside the timing).
Useful work, the same for every method so the baseline's repeated prefix counts as waste: FLOPs
4*D*Hq per attended pair of the grouped rule forward, 2.5x that backward; bytes: q, k, v read and
o, lse written once forward, then q, k, v, o, dO, lse read and dq, dk, dv written backward.
With --cpu: fp32, the shapes of issue 20 (groups x prompt x G completions of S/2..S tokens, ragged,
with their heads / kv heads / head dim) and small ones; the CUDA-only methods are skipped, and the
speedup column is over one causal SDPA call on the repeated-prompt batch (CPU numbers).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import harness
from pyfastrl import PrefixGroupLayout, prefix_grouped_attention

NAME = "prefix-attention"
PLOT = {"x": "P", "series": "G", "baseline": "sdpa_repeated", "ours": "pyfastrl"}
CUDA_SHAPE = dict(heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
FULL_GRID = [(p, s, g) for p in (1024, 4096) for s in (256, 1024) for g in (4, 16)] + [(4096, 512, 16)]
QUICK_GRID = [(1024, 256, 4), (4096, 512, 16)]
# (groups, P, G, S, Hq, Hkv, D): the main job's shape, issue 20's two larger ones, small ones.
CPU_GRID = [(2, 200, 8, 8, 4, 2, 16), (2, 1024, 8, 256, 8, 2, 64), (4, 512, 16, 128, 8, 2, 64),
            (1, 64, 4, 16, 4, 2, 32), (2, 128, 8, 32, 4, 2, 32)]
BACKWARD_FLOP_FACTOR = 2.5
FLEX_BLOCK = 128


def useful_flops(layout: PrefixGroupLayout, num_heads: int, head_dim: int, backward: bool) -> float:
    forward = 4.0 * head_dim * num_heads * layout.attention_pairs
    return forward * (1.0 + BACKWARD_FLOP_FACTOR) if backward else forward


def useful_bytes(layout: PrefixGroupLayout, num_heads: int, num_kv_heads: int, head_dim: int, element_size: int,
                 backward: bool) -> float:
    """Compulsory traffic on the packed layout (each tensor moved once; the LSE in fp32)."""
    t = layout.total_tokens
    q_or_o, kv = t * num_heads * head_dim * element_size, t * num_kv_heads * head_dim * element_size
    lse = t * num_heads * 4
    forward = 2 * q_or_o + 2 * kv + lse  # read q, k, v; write o, lse
    if not backward:
        return forward
    return forward + (3 * q_or_o + 2 * kv + lse) + (q_or_o + 2 * kv)  # read q, k, v, o, dO, lse; write dq, dk, dv


def shared_prefix_mask_mod(layout: PrefixGroupLayout, padded_tokens: int):
    """FlexAttention mask_mod of the shared-prefix rule on the packed layout padded to ``padded_tokens``.

    Padding rows get a group of their own, so they attend only to padding and never to real keys.
    """
    group = torch.full((padded_tokens,), -1, dtype=torch.long)
    member = torch.full((padded_tokens,), -2, dtype=torch.long)
    for g, (p0, plen) in enumerate(zip(layout.prefix_starts.tolist(), layout.prefix_lens)):
        group[p0 : p0 + plen] = g
        member[p0 : p0 + plen] = -1
    members = [s for ss in layout.suffix_lens for s in ss]
    for m, (s0, slen) in enumerate(zip(layout.suffix_starts.tolist(), members)):
        group[s0 : s0 + slen] = layout.member_group[m].item()
        member[s0 : s0 + slen] = m
    group, member = group.to(layout.device), member.to(layout.device)

    def mask_mod(b, h, q_idx, kv_idx):
        same_group = group[q_idx] == group[kv_idx]
        visible = (member[kv_idx] == -1) | (member[q_idx] == member[kv_idx])
        return same_group & visible & (kv_idx <= q_idx)

    return mask_mod


def _sdpa_on(backend_name: str | None):
    """Causal SDPA on ``(B, H, L, D)``, restricted to one SDPA backend (None: SDPA's own choice)."""
    def sdpa(q, k, v):
        if backend_name is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return sdpa


def _prefix_grouper_method(layout: PrefixGroupLayout):
    """The prefix-grouper package on the packed layout (its right-padded group-major concat), or the
    reason it cannot run."""
    try:
        from prefix_grouper import PrefixGrouper
    except ImportError as error:
        return f"not installed ({error})"
    group_info = [[p, *s] for p, s in zip(layout.prefix_lens, layout.suffix_lens)]
    grouper = PrefixGrouper(group_info, device=layout.device, padding_mode="right")
    width = grouper.padding_mask.shape[1]
    group_tokens = [sum(info) for info in group_info]
    rows = torch.cat([torch.arange(n, device=layout.device) + g * width for g, n in enumerate(group_tokens)])
    packed_rows = torch.cat([torch.arange(n, device=layout.device) + start
                             for start, n in zip(layout.prefix_starts.tolist(), group_tokens)])

    def masked_attention(q, k, v, key_valid, *_, **__):
        # Causal aligned to the last key (suffix queries see the whole prefix), valid keys only.
        i = torch.arange(q.shape[2], device=q.device)[:, None]
        j = torch.arange(k.shape[2], device=q.device)[None, :]
        mask = (j <= i + (k.shape[2] - q.shape[2])) & key_valid[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)

    def unpadded_attention(q, k, v, *_, **__):
        # No padded keys (decided once, below): SDPA's lower-right causal bias, which its flash
        # and memory-efficient kernels take, instead of a dense mask.
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(q.shape[2], k.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)

    # Its attention calls see padded keys only where prompt or completion lengths differ.
    even = len({info[0] for info in group_info}) == 1 and len({n for info in group_info for n in info[1:]}) == 1
    attention = unpadded_attention if even else masked_attention

    def prepare(t, heads):
        grouped = t.new_zeros((len(group_info) * width, heads, t.shape[2]))
        grouped[rows] = t.detach().repeat_interleave(heads // t.shape[1], dim=1)[packed_rows]
        return grouped.unflatten(0, (len(group_info), width)).transpose(1, 2).contiguous().requires_grad_(t.requires_grad)

    def to_packed(out):
        return out.flatten(0, 1).index_select(0, rows)

    return prepare, lambda q, k, v: grouper.forward(attention, q, k, v), to_packed


def build_methods(layout: PrefixGroupLayout, *, cuda: bool, flex_compiled: bool = True):
    """``({name: (prepare, fn, to_packed)}, {name: reason})``: ``prepare(t, heads)`` maps a packed
    ``(T, H, D)`` input to the method's layout (K/V expanded to ``heads`` where the method needs it),
    ``fn(q, k, v)`` is what gets timed, and ``to_packed`` maps its output back to ``(T, Hq, D)``."""
    def packed(t, heads):
        return t.detach().clone().requires_grad_(t.requires_grad)

    def ours(backend):
        return packed, lambda q, k, v: prefix_grouped_attention(q, k, v, layout, backend=backend), lambda out: out

    methods = {"pyfastrl": ours("triton" if cuda else "flash")}
    if cuda:
        methods["pyfastrl_flash"] = ours("flash")
        methods["pyfastrl_torch"] = ours("torch")
    skipped = {}

    # The naive batch: every completion with its own prompt copy, padded to the longest.
    cu = layout.repeated_cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    longest = max(lengths)
    rows = torch.cat([layout.repeated_index[a:b] for a, b in zip(cu[:-1], cu[1:])])
    pad_slot = torch.cat([torch.arange(n, device=layout.device) + i * longest for i, n in enumerate(lengths)])

    def repeated(t, heads):
        out = t.new_zeros((len(lengths) * longest, heads, t.shape[2]))
        out[pad_slot] = t.detach().repeat_interleave(heads // t.shape[1], dim=1)[rows]
        return out.unflatten(0, (len(lengths), longest)).transpose(1, 2).contiguous().requires_grad_(t.requires_grad)

    def repeated_to_packed(out):
        flat = out.transpose(1, 2).flatten(0, 1)[pad_slot]
        return flat.index_select(0, layout.packed_to_repeated)

    if cuda:
        methods["sdpa_repeated"] = (repeated, _sdpa_on("FLASH_ATTENTION"), repeated_to_packed)
        methods["sdpa_repeated_cudnn"] = (repeated, _sdpa_on("CUDNN_ATTENTION"), repeated_to_packed)
    else:
        methods["sdpa_repeated"] = (repeated, _sdpa_on(None), repeated_to_packed)  # SDPA's CPU kernel
        skipped["sdpa_repeated_cudnn"] = "cuDNN attention needs CUDA"

    if cuda or not flex_compiled:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        total = layout.total_tokens
        padded = -(-total // FLEX_BLOCK) * FLEX_BLOCK

        def packed_heads_first(t, heads):
            out = t.new_zeros((padded, t.shape[1], t.shape[2]))
            out[:total] = t.detach()
            return out.transpose(0, 1).unsqueeze(0).contiguous().requires_grad_(t.requires_grad)

        block_mask = create_block_mask(shared_prefix_mask_mod(layout, padded), None, None, padded, padded,
                                       device=layout.device)
        flex = torch.compile(flex_attention, dynamic=False) if flex_compiled else flex_attention
        methods["flex"] = (packed_heads_first,
                           lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1]),
                           lambda out: out[0, :, :total].transpose(0, 1))
    else:
        skipped["flex"] = "FlexAttention has no CPU backward"

    grouper = _prefix_grouper_method(layout)
    if isinstance(grouper, str):
        skipped["prefix_grouper"] = grouper
    else:
        methods["prefix_grouper"] = grouper
    return methods, skipped


def _cases(runner: harness.Runner):
    """``(params, layout, Hq, Hkv, D)`` per case of this run's grid."""
    if not runner.cpu:
        for prefix, suffix, group in QUICK_GRID if runner.quick else FULL_GRID:
            layout = PrefixGroupLayout([prefix], [[suffix] * group], device=runner.device)
            yield ({"P": prefix, "S": suffix, "G": group}, layout,
                   CUDA_SHAPE["heads"], CUDA_SHAPE["kv_heads"], CUDA_SHAPE["head_dim"])
        return
    for groups, prefix, group, suffix, heads, kv_heads, head_dim in CPU_GRID:
        g = torch.Generator().manual_seed(prefix + group)
        suffixes = [torch.randint(max(1, suffix // 2), suffix + 1, (group,), generator=g).tolist() for _ in range(groups)]
        layout = PrefixGroupLayout([prefix] * groups, suffixes, device=runner.device)
        yield ({"B": groups, "P": prefix, "G": group, "S": suffix, "H": f"{heads}/{kv_heads}", "D": head_dim},
               layout, heads, kv_heads, head_dim)


def measure_methods(runner: harness.Runner, methods: dict, packed_sets: list, heads: int, *, flops, nbytes) -> dict:
    """``{name: {"fwd", "fwd_bwd"}}``: each method's forward and forward + backward on its own copy
    of every packed ``(q, k, v)`` set (``prepare``d outside the timing, with a random upstream
    gradient); ``flops(backward)`` / ``nbytes(backward)`` give the useful work. A method that fails
    while preparing is recorded with its error."""
    results = {}
    for name, (prepare, fn, _) in methods.items():
        def measured():
            sets = []
            for q, k, v in packed_sets:
                inputs = (prepare(q, heads), prepare(k, heads), prepare(v, heads))
                sets.append((inputs, torch.randn_like(fn(*inputs))))
            return sets

        prepared = harness.measure_or_record_failure(lambda: {"sets": measured()})
        if "error" in prepared:
            results[name] = {"fwd_bwd": prepared}
            continue
        sets = prepared["sets"]
        result = {}
        for mode, backward in (("fwd", False), ("fwd_bwd", True)):
            step = ((lambda inputs, grad: torch.autograd.grad(fn(*inputs), inputs, grad)) if backward
                    else (lambda inputs, grad: fn(*inputs)))
            result[mode] = runner.measure(step, sets, flops=flops(backward), nbytes=nbytes(backward))
        results[name] = result
        del sets, prepared
    return results


def run(runner: harness.Runner):
    dtype = torch.float32 if runner.cpu else CUDA_SHAPE["dtype"]
    grid = list(_cases(runner))
    cases = []
    for index, (params, layout, heads, kv_heads, head_dim) in enumerate(grid):
        harness.progress(index, len(grid), " ".join(f"{k}={v}" for k, v in params.items()))

        def make(seed):
            g = torch.Generator(device=runner.device).manual_seed(seed)
            return tuple(torch.randn(layout.total_tokens, h, head_dim, device=runner.device, generator=g)
                         .to(dtype).requires_grad_() for h in (heads, kv_heads, kv_heads))

        packed_sets = runner.input_sets(make)
        methods, skipped = build_methods(layout, cuda=not runner.cpu)
        case = {"params": params,
                "work": {"tokens_grouped": layout.total_tokens, "tokens_repeated": layout.repeated_tokens,
                         "pairs": layout.attention_pairs, "input_sets": len(packed_sets)},
                "methods": {}, "skipped": skipped}
        element = torch.finfo(dtype).bits // 8
        case["methods"] = measure_methods(
            runner, methods, packed_sets, heads,
            flops=lambda backward: useful_flops(layout, heads, head_dim, backward),
            nbytes=lambda backward: useful_bytes(layout, heads, kv_heads, head_dim, element, backward))
        cases.append(case)
    return shape_config(runner, dtype), cases


def shape_config(runner: harness.Runner, dtype: torch.dtype) -> dict:
    """The report's config: the dtype and, on CUDA, the heads and head dim of CUDA_SHAPE."""
    config = {"dtype": str(dtype).removeprefix("torch.")}
    if not runner.cpu:
        config.update(Hq=CUDA_SHAPE["heads"], Hkv=CUDA_SHAPE["kv_heads"], D=CUDA_SHAPE["head_dim"])
    return config


if __name__ == "__main__":
    sys.exit(harness.main([NAME, *sys.argv[1:]]))
