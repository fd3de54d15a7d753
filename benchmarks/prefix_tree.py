"""Benchmark case ``prefix-tree``: attention over multi-turn rollouts packed as a prefix tree, against
the one-level grouped batch and the repeated batch.

    pyfastrl bench prefix-tree [--quick] [--cpu]     (or python benchmarks/prefix_tree.py)

A synthetic multi-turn batch: per conversation a prompt, then per turn ``samples`` sampled replies
to the whole context so far; the first reply is kept, a user message follows it, and the next turn
samples again (``multi_turn_batch``). Every (context, reply) is one sequence. Methods, forward and
forward + backward, on the same random q, k, v (given per tree token and copied into each layout):
  pyfastrl_tree     prefix_grouped_attention on ``PrefixTreeLayout.from_sequences``: every token once;
                    backend "auto", as the grouped row: Triton on CUDA, torch on CPU (flash, the
                    grouped row's CPU backend, does not take trees)
  pyfastrl_tree_torch  (CUDA) the same on the torch backend (segment by segment in PyTorch)
  pyfastrl_grouped  prefix_grouped_attention on the one-level grouped batch (each turn's context
                    once per turn, its replies after it): Triton on CUDA, flash on CPU
  sdpa_repeated     the baseline: every sequence with its own context, padded, causal SDPA
Useful work, the same for every method: the tree's attention pairs (the prefix-attention case's
FLOP formula) and its tokens' compulsory bytes. CUDA: bf16, Hq 32, Hkv 8, D 128, 8 conversations x
4 turns x 4 samples, prompt 200, user 50, reply 100 tokens (15,600 tree tokens, 26,400 grouped,
67,200 repeated). With --cpu: fp32, Hq 4, Hkv 2, D 32, a smaller batch (CPU numbers).
"""
from __future__ import annotations

import random
import sys

import torch

import harness
import prefix_attention
from pyfastrl import PrefixGroupLayout, PrefixTreeLayout, prefix_grouped_attention

NAME = "prefix-tree"
PLOT = {"x": "turns", "series": "samples", "baseline": "sdpa_repeated", "ours": "pyfastrl_tree"}
CUDA_SHAPE = dict(heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
CPU_SHAPE = dict(heads=4, kv_heads=2, head_dim=32, dtype=torch.float32)
# (conversations, turns, samples, prompt, user, reply)
CUDA_GRID = [(8, 4, 4, 200, 50, 100), (4, 6, 8, 512, 64, 256)]
QUICK_GRID = [(8, 4, 4, 200, 50, 100)]
CPU_GRID = [(2, 3, 2, 48, 8, 16)]


def multi_turn_batch(conversations, turns, samples, prompt, user, reply, seed=0):
    """``(sequences, groups)``: token-id sequences (context + reply, one per sample per turn, turn by
    turn) and the one-level groups ``(context length, [reply lengths])`` in the same order."""
    rng = random.Random(seed)

    def tokens(n):
        return [rng.randrange(1, 32000) for _ in range(n)]

    sequences, groups = [], []
    for _ in range(conversations):
        context = tokens(prompt)
        for _ in range(turns):
            replies = [tokens(reply) for _ in range(samples)]
            sequences += [context + r for r in replies]
            groups.append((len(context), [len(r) for r in replies]))
            context = context + replies[0] + tokens(user)
    return sequences, groups


def layouts(sequences, groups, device):
    """The tree layout, the grouped layout, and the tree token of each grouped and repeated row."""
    tree, token_index = PrefixTreeLayout.from_sequences(sequences, device=device)
    grouped = PrefixGroupLayout([p for p, _ in groups], [s for _, s in groups], device=device)
    rows, first = [], 0
    for context, replies in groups:  # grouped order: the context once, then each reply
        members = token_index[first:first + len(replies)]
        rows += [members[0][:context]] + [m[context:] for m in members]
        first += len(replies)
    return tree, grouped, torch.cat(rows), token_index


def build_methods(sequences, groups, device, *, cuda: bool):
    """``({name: (prepare, fn, to_tree)}, {name: reason}, tree)``: ``prepare(t, heads)`` maps a
    tree-packed ``(T, H, D)`` input to the method's layout, ``fn(q, k, v)`` is timed, ``to_tree`` maps
    its output back to tree tokens (for the tests)."""
    tree, grouped, grouped_rows, token_index = layouts(sequences, groups, device)
    # A grouped row of each tree token, to map outputs back (every copy of a token has its output).
    back = torch.empty(tree.total_tokens, dtype=torch.long, device=device)
    back[grouped_rows] = torch.arange(grouped_rows.numel(), device=device)
    lengths = [len(s) for s in sequences]
    longest = max(lengths)
    pad_slot = torch.cat([torch.arange(n, device=device) + i * longest for i, n in enumerate(lengths)])
    repeated_rows = torch.cat(token_index)
    repeated_back = torch.empty(tree.total_tokens, dtype=torch.long, device=device)
    repeated_back[repeated_rows] = pad_slot

    def packed(t, heads):
        return t.detach().clone().requires_grad_(t.requires_grad)

    def to_grouped(t, heads):
        return t.detach()[grouped_rows].requires_grad_(t.requires_grad)

    def to_repeated(t, heads):
        out = t.new_zeros((len(lengths) * longest, heads, t.shape[2]))
        out[pad_slot] = t.detach().repeat_interleave(heads // t.shape[1], dim=1)[repeated_rows]
        return out.unflatten(0, (len(lengths), longest)).transpose(1, 2).contiguous().requires_grad_(t.requires_grad)

    sdpa = prefix_attention._sdpa_on("FLASH_ATTENTION" if cuda else None)
    methods = {
        "pyfastrl_tree": (packed, lambda q, k, v: prefix_grouped_attention(q, k, v, tree), lambda out: out),
        **({"pyfastrl_tree_torch": (packed, lambda q, k, v: prefix_grouped_attention(q, k, v, tree, backend="torch"),
                                    lambda out: out)} if cuda else {}),
        "pyfastrl_grouped": (to_grouped, lambda q, k, v: prefix_grouped_attention(q, k, v, grouped),
                             lambda out: out[back]),
        "sdpa_repeated": (to_repeated, sdpa, lambda out: out.transpose(1, 2).flatten(0, 1)[repeated_back]),
    }
    return methods, {}, tree


def run(runner: harness.Runner):
    shape = CPU_SHAPE if runner.cpu else CUDA_SHAPE
    heads, kv_heads, head_dim, dtype = shape["heads"], shape["kv_heads"], shape["head_dim"], shape["dtype"]
    grid = CPU_GRID if runner.cpu else (QUICK_GRID if runner.quick else CUDA_GRID)
    element = torch.finfo(dtype).bits // 8
    cases = []
    for index, (conversations, turns, samples, prompt, user, reply) in enumerate(grid):
        harness.progress(index, len(grid), f"{conversations} conversations x {turns} turns x {samples} samples")
        sequences, groups = multi_turn_batch(conversations, turns, samples, prompt, user, reply)
        methods, skipped, tree = build_methods(sequences, groups, runner.device, cuda=not runner.cpu)

        def make(seed):
            g = torch.Generator(device=runner.device).manual_seed(seed)
            return tuple(torch.randn(tree.total_tokens, h, head_dim, device=runner.device, generator=g)
                         .to(dtype).requires_grad_() for h in (heads, kv_heads, kv_heads))

        tree_sets = runner.input_sets(make)
        case = {"params": {"conversations": conversations, "turns": turns, "samples": samples,
                           "prompt": prompt, "user": user, "reply": reply},
                "work": {"tokens_tree": tree.total_tokens,
                         "tokens_grouped": sum(p + sum(s) for p, s in groups),
                         "tokens_repeated": sum(len(s) for s in sequences),
                         "pairs": tree.attention_pairs, "input_sets": len(tree_sets)},
                "methods": {}, "skipped": skipped}
        case["methods"] = prefix_attention.measure_methods(
            runner, methods, tree_sets, heads,
            flops=lambda backward: prefix_attention.useful_flops(tree, heads, head_dim, backward),
            nbytes=lambda backward: prefix_attention.useful_bytes(tree, heads, kv_heads, head_dim, element, backward))
        cases.append(case)
    return {"dtype": str(dtype).removeprefix("torch."), "Hq": heads, "Hkv": kv_heads, "D": head_dim}, cases


if __name__ == "__main__":
    sys.exit(harness.main([NAME, *sys.argv[1:]]))
