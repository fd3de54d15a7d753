"""Benchmark case ``layout``: building a ``PrefixGroupLayout`` and its kernel block tables.

    pyfastrl bench layout [--cpu]     (or python benchmarks/layout.py --cpu)

What a training step pays per batch before its first attention layer: the layout (position ids,
prefix/suffix starts, the repeated-layout index maps) plus the forward query-block table
(``query_blocks(128)``) and the dK/dV key-block table (``key_blocks(64)``). Methods:
  pyfastrl       ``PrefixGroupLayout`` (tensor arithmetic on the run's device)
  python_loops   the baseline: the same tables built by Python loops over every token and member
                 (``PythonLoopLayout`` below, the package's implementation before it used tensor ops;
                 tests/test_layout.py checks the two agree on every output)
Sizes: one prompt of 4,096 tokens with 16 completions of 512 (12,288 tokens, the spec's example) and
a batch of 32 prompts of 1,024 with 16 completions each of 16..2,048 tokens (561,152 tokens); each
input set shuffles the completion lengths. With --cpu the time is the host's (a CPU number); on a
GPU run, ``pyfastrl`` builds on the GPU. The build time is reported in the harness's fwd+bwd column
(the one its speedups use); bytes are the index tensors written, FLOPs none.
"""
from __future__ import annotations

import sys

import torch

import harness
from pyfastrl import PrefixGroupLayout

NAME = "layout"
PLOT = {"x": "tokens", "baseline": "python_loops", "ours": "pyfastrl"}
BLOCK_M, BLOCK_N = 128, 64
SINGLE_PROMPT = ([4096], [[512] * 16])
BATCH = ([1024] * 32, [[16 + (g * 16 + i) * 2032 // 511 for i in range(16)] for g in range(32)])


class PythonLoopLayout:
    """The layout's tensors and block tables built by Python loops over tokens and members, as
    ``PrefixGroupLayout`` did before it used tensor ops: the benchmark's baseline and the tests'
    reference. Takes valid Python lists (no validation); same attributes and table formats."""

    def __init__(self, prefix_lens, suffix_lens, *, device=None):
        self.device = torch.device("cpu" if device is None else device)
        prefix_starts, suffix_starts, member_group, positions = [], [], [], []
        repeated_index, repeated_cu, packed_to_repeated = [], [0], []
        self.segments, self.group_ends = [], {}
        cursor = 0
        for g, (plen, slens) in enumerate(zip(prefix_lens, suffix_lens)):
            p0 = cursor
            prefix_starts.append(p0)
            positions.extend(range(plen))
            self.segments.append((p0, p0 + plen, p0, p0, p0))
            packed_to_repeated.extend(range(repeated_cu[-1], repeated_cu[-1] + plen))
            cursor += plen
            for slen in slens:
                s0 = cursor
                suffix_starts.append(s0)
                member_group.append(g)
                positions.extend(range(plen, plen + slen))
                self.segments.append((s0, s0 + slen, s0, p0, p0 + plen))
                seq_start = repeated_cu[-1]
                repeated_index.extend(range(p0, p0 + plen))
                repeated_index.extend(range(s0, s0 + slen))
                packed_to_repeated.extend(range(seq_start + plen, seq_start + plen + slen))
                repeated_cu.append(seq_start + plen + slen)
                cursor += slen
            self.group_ends[p0] = cursor
        self.total_tokens = cursor
        self.longest_sequence = max(p + max(ss) for p, ss in zip(prefix_lens, suffix_lens))
        as_long = dict(dtype=torch.long, device=self.device)
        self.position_ids = torch.tensor(positions, **as_long)
        self.prefix_starts = torch.tensor(prefix_starts, **as_long)
        self.suffix_starts = torch.tensor(suffix_starts, **as_long)
        self.member_group = torch.tensor(member_group, **as_long)
        self.repeated_index = torch.tensor(repeated_index, **as_long)
        self.repeated_cu_seqlens = torch.tensor(repeated_cu, **as_long)
        self.packed_to_repeated = torch.tensor(packed_to_repeated, **as_long)

    def query_blocks(self, block_m):
        rows = []
        for q0, q1, c0, f0, f1 in self.segments:
            step = (q1 - q0) if block_m is None else block_m
            rows.extend((b, min(b + step, q1), c0, f0, f1) for b in range(q0, q1, step))
        rows.sort(key=lambda r: (r[4] - r[3]) + (r[1] - r[2]), reverse=True)
        return torch.tensor(rows, dtype=torch.int32, device=self.device).reshape(-1, 5)

    def key_blocks(self, block_n):
        rows = []
        for q0, q1, _, f0, f1 in self.segments:
            q_end = self.group_ends[q0] if f0 == f1 else q1
            rows.extend((b, min(b + block_n, q1), q_end) for b in range(q0, q1, block_n))
        rows.sort(key=lambda r: r[2] - r[0], reverse=True)
        return torch.tensor(rows, dtype=torch.int32, device=self.device).reshape(-1, 3)


def build(layout_class, device):
    """``step(prefix_lens, suffix_lens)``: a layout and the two block tables a training step uses."""
    def step(prefix_lens, suffix_lens):
        layout = layout_class(prefix_lens, suffix_lens, device=device)
        return layout, layout.query_blocks(BLOCK_M), layout.key_blocks(BLOCK_N)

    return step


def run(runner: harness.Runner):
    grid = [("single-prompt", SINGLE_PROMPT), ("batch", BATCH)]
    cases = []
    for index, (label, (prefix_lens, suffix_lens)) in enumerate(grid):
        harness.progress(index, len(grid), f"{label}: {len(prefix_lens)} prompt(s)")

        def make(seed):
            g = torch.Generator().manual_seed(seed)
            lengths = torch.tensor(suffix_lens)  # every group has the same size here
            shuffled = lengths.flatten()[torch.randperm(lengths.numel(), generator=g)]
            return prefix_lens, shuffled.reshape(lengths.shape).tolist()

        sets = [make(seed) for seed in range(3)]
        layout, query_table, key_table = build(PrefixGroupLayout, runner.device)(*sets[0])
        written = harness.tensor_bytes([query_table, key_table, layout.position_ids, layout.repeated_index,
                                        layout.packed_to_repeated, layout.repeated_cu_seqlens])
        case = {"params": {"case": label, "tokens": layout.total_tokens},
                "work": {"members": layout.num_members, "repeated_tokens": layout.repeated_tokens,
                         "query_blocks": query_table.shape[0], "key_blocks": key_table.shape[0],
                         "input_sets": len(sets)},
                "methods": {}, "skipped": {}}
        for name, layout_class in (("pyfastrl", PrefixGroupLayout), ("python_loops", PythonLoopLayout)):
            case["methods"][name] = {"fwd_bwd": runner.measure(build(layout_class, runner.device), sets,
                                                               flops=0.0, nbytes=written)}
        cases.append(case)
    return {"block_m": BLOCK_M, "block_n": BLOCK_N, "torch_threads": torch.get_num_threads()}, cases


if __name__ == "__main__":
    sys.exit(harness.main([NAME, *sys.argv[1:]]))
