"""Microbenchmark: prefix-grouped attention vs the peers a user would pick instead.

    python benchmarks/prefix_attention.py [--quick] [--out DIR]

Methods, side by side in one run, on the same random bf16 data (D=128, Hq=32, Hkv=8):
  pyfastrl       prefix_grouped_attention, Triton backend, on the packed batch [P | S_1 .. S_G]
  sdpa_repeated  the naive baseline: every completion with its own prompt copy, (G, H, P+S, D),
                 causal SDPA restricted to the flash backend (K/V expanded to Hq heads beforehand,
                 outside the timed region, since the flash path takes equal head counts)
  flex           FlexAttention on the packed batch with a shared-prefix block mask (padded to 128;
                 the block-mask build is timed separately, it is done once per batch)
Forward and forward+backward, median ms (triton.testing.do_bench), TFLOP/s of *useful* attention
FLOPs (4*D*Hq*pairs of the grouped rule forward, 2.5x that backward; the same count for every
method, so the baseline's repeated prefix work counts as waste), and peak memory.

Needs a CUDA GPU: on a CPU-only machine it says so and exits 0.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from common import measure_or_record_failure, parse_args_or_skip, write_report
from pyfastrl import PrefixGroupLayout, prefix_grouped_attention

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
FULL_GRID = [(p, s, g) for p in (1024, 4096) for s in (256, 1024) for g in (4, 16)] + [(4096, 512, 16)]
QUICK_GRID = [(1024, 256, 4), (4096, 512, 16)]
BACKWARD_FLOP_FACTOR = 2.5
FLEX_BLOCK = 128


def useful_flops(layout: PrefixGroupLayout, num_heads: int, head_dim: int, backward: bool) -> float:
    forward = 4.0 * head_dim * num_heads * layout.attention_pairs
    return forward * (1.0 + BACKWARD_FLOP_FACTOR) if backward else forward


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


def build_methods(layout: PrefixGroupLayout, q, k, v, *, flex_compiled: bool = True):
    """Each method as ``(inputs, fn, to_packed)``: ``fn(*inputs)`` is what gets timed and
    ``to_packed`` maps its output back to the packed ``(T, Hq, D)`` layout (for checking)."""
    rep = q.shape[1] // k.shape[1]
    methods = {
        "pyfastrl": (
            (q, k, v),
            lambda q, k, v: prefix_grouped_attention(q, k, v, layout),
            lambda out: out,
        )
    }

    # Naive: all members share one suffix length in the benchmark grid; ragged ones are padded.
    cu = layout.repeated_cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    longest = max(lengths)
    rows = torch.cat([layout.repeated_index[a:b] for a, b in zip(cu[:-1], cu[1:])])
    pad_slot = torch.cat([torch.arange(n, device=q.device) + i * longest for i, n in enumerate(lengths)])

    def repeated(t, heads):
        out = t.new_zeros((len(lengths) * longest, heads, t.shape[2]))
        out[pad_slot] = t.repeat_interleave(heads // t.shape[1], dim=1)[rows]
        return out.unflatten(0, (len(lengths), longest)).transpose(1, 2).contiguous().requires_grad_(t.requires_grad)

    def sdpa(q, k, v):
        if q.is_cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def repeated_to_packed(out):
        flat = out.transpose(1, 2).flatten(0, 1)[pad_slot]
        return flat.index_select(0, layout.packed_to_repeated)

    heads = q.shape[1]
    methods["sdpa_repeated"] = ((repeated(q, heads), repeated(k, heads), repeated(v, heads)), sdpa, repeated_to_packed)

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    total = layout.total_tokens
    padded = -(-total // FLEX_BLOCK) * FLEX_BLOCK

    def packed_heads_first(t):
        out = t.new_zeros((padded, t.shape[1], t.shape[2]))
        out[:total] = t.detach()
        return out.transpose(0, 1).unsqueeze(0).contiguous().requires_grad_(t.requires_grad)

    block_mask = create_block_mask(
        shared_prefix_mask_mod(layout, padded), None, None, padded, padded, device=q.device
    )
    flex = torch.compile(flex_attention, dynamic=False) if flex_compiled else flex_attention
    methods["flex"] = (
        tuple(packed_heads_first(t) for t in (q, k, v)),
        lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=rep > 1),
        lambda out: out[0, :, :total].transpose(0, 1),
    )
    return methods


def _time_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def run_case(prefix: int, suffix: int, group: int, device: torch.device) -> dict:
    layout = PrefixGroupLayout([prefix], [[suffix] * group], device=device)
    shape_q = (layout.total_tokens, HEADS, HEAD_DIM)
    shape_kv = (layout.total_tokens, KV_HEADS, HEAD_DIM)
    q, k, v = (torch.randn(s, device=device, dtype=torch.bfloat16, requires_grad=True)
               for s in (shape_q, shape_kv, shape_kv))
    case = {"P": prefix, "S": suffix, "G": group, "tokens_grouped": layout.total_tokens,
            "tokens_repeated": layout.repeated_tokens, "pairs": layout.attention_pairs, "methods": {}}
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    methods = build_methods(layout, q, k, v)
    end.record()
    torch.cuda.synchronize()
    case["setup_ms_all_methods"] = start.elapsed_time(end)
    for name, (inputs, fn, _) in methods.items():
        def measure():
            result = {}
            grad = torch.randn_like(fn(*inputs))
            torch.cuda.synchronize()
            result["fwd_ms"] = _time_ms(lambda: fn(*inputs))
            result["fwd_bwd_ms"] = _time_ms(lambda: torch.autograd.grad(fn(*inputs), inputs, grad))
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            torch.autograd.grad(fn(*inputs), inputs, grad)
            torch.cuda.synchronize()
            result["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            result["input_mib"] = sum(t.numel() * t.element_size() for t in inputs) / 2**20
            result["fwd_tflops"] = useful_flops(layout, HEADS, HEAD_DIM, False) / result["fwd_ms"] / 1e9
            result["fwd_bwd_tflops"] = useful_flops(layout, HEADS, HEAD_DIM, True) / result["fwd_bwd_ms"] / 1e9
            return result

        case["methods"][name] = measure_or_record_failure(measure)
    return case


def _print_table(cases: list[dict]) -> None:
    print(f"\n{'P':>5} {'S':>5} {'G':>3} | {'method':<14}| {'fwd ms':>8} {'TFLOP/s':>8} | "
          f"{'f+b ms':>8} {'TFLOP/s':>8} | {'peak MiB':>9} | {'f+b speedup of pyfastrl':>24}")
    for case in cases:
        ours = case["methods"]["pyfastrl"].get("fwd_bwd_ms")
        for name, r in case["methods"].items():
            head = f"{case['P']:>5} {case['S']:>5} {case['G']:>3} | {name:<14}|"
            if "error" in r:
                print(f"{head} {r['error']}")
                continue
            speedup = f"{r['fwd_bwd_ms'] / ours:.2f}x" if ours and name != "pyfastrl" else ""
            print(f"{head} {r['fwd_ms']:>8.3f} {r['fwd_tflops']:>8.1f} | {r['fwd_bwd_ms']:>8.3f} "
                  f"{r['fwd_bwd_tflops']:>8.1f} | {r['peak_extra_mib']:>9.0f} | {speedup:>24}")


def main(argv=None) -> int:
    args = parse_args_or_skip(argv, __doc__, "prefix_attention.py", "two cases only: P/S/G = 1024/256/4 and 4096/512/16")
    if args is None:
        return 0
    device = torch.device("cuda")
    grid = QUICK_GRID if args.quick else FULL_GRID
    cases = []
    for i, (p, s, g) in enumerate(grid):
        print(f"[{i + 1}/{len(grid)}] P={p} S={s} G={g} ...", flush=True)
        cases.append(run_case(p, s, g, device))
    _print_table(cases)
    write_report(args.out, "prefix_attention", {"dtype": "bfloat16", "Hq": HEADS, "Hkv": KV_HEADS, "D": HEAD_DIM}, cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
