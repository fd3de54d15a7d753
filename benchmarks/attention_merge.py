"""Benchmark case ``attention-merge``: the flash backend's attention-state merge (forward) and row
accumulation (backward) kernels, in GB/s against a copy of the same bytes.

    pyfastrl bench attention-merge [--quick] [--cpu]     (or python benchmarks/attention_merge.py)

The flash backend of ``prefix_grouped_attention`` on CUDA attends each completion to itself and,
in a second call, to its prompt; two memory-bound kernels then combine the halves
(``kernels/prefix_attention/flash.py``): ``merge_`` folds the cross call's output and log-sum-exp
into the completion rows of ``out (T, Hq, D)`` / ``lse (Hq, T)`` forward, ``add_rows_`` adds the
cross call's dQ into the completion rows and dK, dV into the prompt rows backward. Shapes as in
``prefix-attention``: one prompt of P tokens, G completions of S (G*S cross rows), bf16, D=128,
Hq=32, Hkv=8. Modes: ``fwd`` the merge, ``bwd`` the row accumulation, ``fwd_bwd`` both. Methods:
  pyfastrl         the CUDA extension's kernels (csrc/attention_merge: 128-bit loads), if built;
                   on the CPU the flash backend's PyTorch merge (what it runs there)
  pyfastrl_triton  (CUDA) the Triton kernels (kernels/prefix_attention/merge.py)
  torch_indexing   (CUDA) the same in PyTorch: gathers, logaddexp, scatters, index_add_
  torch_copy       the baseline and roofline: ``dst.copy_(src)`` of as many bytes as the kernels
                   move, timed in the same run, so "speedup" is the fraction of a copy's speed
Useful bytes: forward, the completion rows of out and lse read and written, the cross output and
LSE read, the row indices read; backward, the dQ rows and the prompt's dK, dV rows read and
written, the cross gradients read, both index vectors read. With --cpu: fp32, small sizes, the
CUDA-only methods skipped with their reason (CPU numbers).
"""
from __future__ import annotations

import sys
import types
from typing import NamedTuple

import torch

import harness
from prefix_attention import CUDA_SHAPE, shape_config

NAME = "attention-merge"
PLOT = {"x": "cross_rows", "series": "P", "baseline": "torch_copy", "ours": "pyfastrl", "not_peers": ("torch_copy",)}
# (P, S, G): prefix-attention's quick cases (8,192 cross rows: 200 MB merged) and a larger batch.
FULL_GRID = [(1024, 256, 4), (4096, 512, 16), (4096, 1024, 16)]
QUICK_GRID = [(1024, 256, 4), (4096, 512, 16)]
# (P, S, G, Hq, Hkv, D) on the CPU.
CPU_GRID = [(128, 32, 4, 4, 2, 64)]
INDEX_BYTES = 8  # int64 row indices


class MergeInputs(NamedTuple):
    """One input set: the forward merge's tensors, then the backward accumulation's."""

    out: torch.Tensor  # (T, Hq, D)
    lse: torch.Tensor  # (Hq, T) fp32
    cross_out: torch.Tensor  # (N, Hq, D)
    cross_lse: torch.Tensor  # (Hq, N) fp32
    cross_rows: torch.Tensor  # (N,) the completion rows
    dq: torch.Tensor  # (T, Hq, D)
    cross_dq: torch.Tensor  # (N, Hq, D)
    dk: torch.Tensor  # (T, Hkv, D)
    dv: torch.Tensor
    cross_dk: torch.Tensor  # (P, Hkv, D)
    cross_dv: torch.Tensor
    prompt_rows: torch.Tensor  # (P,)


def merge_bytes(rows: int, heads: int, head_dim: int, element_size: int) -> int:
    """Forward: out and lse rows read and written, cross_out and cross_lse read, the indices read."""
    return rows * heads * (3 * head_dim * element_size + 3 * 4) + rows * INDEX_BYTES


def add_rows_bytes(q_rows: int, heads: int, k_rows: int, kv_heads: int, head_dim: int, element_size: int) -> int:
    """Backward: dq rows (dk, dv rows) read and written and cross_dq (cross_dk, cross_dv) read, the indices read."""
    return 3 * head_dim * element_size * (q_rows * heads + 2 * k_rows * kv_heads) + (q_rows + k_rows) * INDEX_BYTES


def make_inputs(prompt: int, suffix: int, group: int, heads: int, kv_heads: int, head_dim: int, device, dtype,
                seed: int) -> MergeInputs:
    g = torch.Generator(device=device).manual_seed(seed)
    rows = suffix * group
    tokens = prompt + rows

    def rand(*shape, dtype=dtype):
        return torch.randn(*shape, device=device, generator=g).to(dtype)

    return MergeInputs(rand(tokens, heads, head_dim), rand(heads, tokens, dtype=torch.float32) + 5,
                       rand(rows, heads, head_dim), rand(heads, rows, dtype=torch.float32) + 5,
                       torch.arange(prompt, tokens, device=device), rand(tokens, heads, head_dim),
                       rand(rows, heads, head_dim), rand(tokens, kv_heads, head_dim), rand(tokens, kv_heads, head_dim),
                       rand(prompt, kv_heads, head_dim), rand(prompt, kv_heads, head_dim),
                       torch.arange(prompt, device=device))


def _torch_merge_(out, lse, cross_out, cross_lse, rows) -> None:
    from pyfastrl.kernels.prefix_attention.flash import _merged

    merged, lse[:, rows] = _merged(out[rows], lse[:, rows], cross_out, cross_lse)
    out[rows] = merged.to(out.dtype)


def _torch_add_rows_(dq, cross_dq, q_rows, dk, dv, cross_dk, cross_dv, k_rows) -> None:
    dq.index_add_(0, q_rows, cross_dq)
    dk.index_add_(0, k_rows, cross_dk)
    dv.index_add_(0, k_rows, cross_dv)


# merge_.py's and merge_cuda.py's two functions, in PyTorch.
TORCH_KERNELS = types.SimpleNamespace(merge_=_torch_merge_, add_rows_=_torch_add_rows_)


def steps(kernels) -> dict:
    """``{mode: step(*MergeInputs)}`` of a module with ``merge_`` and ``add_rows_``."""
    def forward(*t):
        kernels.merge_(t[0], t[1], t[2], t[3], t[4])

    def backward(*t):
        kernels.add_rows_(t[5], t[6], t[4], t[7], t[8], t[9], t[10], t[11])

    def both(*t):
        forward(*t)
        backward(*t)

    return {"fwd": forward, "bwd": backward, "fwd_bwd": both}


def build_methods(cuda: bool) -> tuple[dict, dict]:
    """``{name: module with merge_ / add_rows_}`` and ``{name: why skipped}``."""
    if not cuda:
        return {"pyfastrl": TORCH_KERNELS}, {
            "pyfastrl_triton": "CUDA only (Triton kernels)", "torch_indexing": "the CPU run's pyfastrl is this PyTorch code"}
    from pyfastrl.kernels import cuda_extension
    from pyfastrl.kernels.prefix_attention import merge, merge_cuda

    methods, skipped = {}, {}
    reason = cuda_extension.device_unavailable_reason(torch.device("cuda"))
    if reason is None:
        methods["pyfastrl"] = merge_cuda
    else:
        skipped["pyfastrl"] = reason
    methods.update(pyfastrl_triton=merge, torch_indexing=TORCH_KERNELS)
    return methods, skipped


def copy_steps(nbytes: dict, device) -> tuple[dict, list]:
    """``{mode: step(src, dst)}`` copying ``nbytes[mode]`` bytes (read + written, so half of them
    copied), and input-set makers for them."""
    def make(seed):
        size = nbytes["fwd_bwd"] // 2
        return torch.zeros(size, dtype=torch.uint8, device=device), torch.zeros(size, dtype=torch.uint8, device=device)

    def step(mode):
        size = nbytes[mode] // 2
        return lambda src, dst: dst[:size].copy_(src[:size])

    return {mode: step(mode) for mode in nbytes}, make


def _cases(runner: harness.Runner):
    if runner.cpu:
        yield from CPU_GRID
        return
    shape = (CUDA_SHAPE["heads"], CUDA_SHAPE["kv_heads"], CUDA_SHAPE["head_dim"])
    for prompt, suffix, group in QUICK_GRID if runner.quick else FULL_GRID:
        yield (prompt, suffix, group, *shape)


def run(runner: harness.Runner):
    dtype = torch.float32 if runner.cpu else CUDA_SHAPE["dtype"]
    element = torch.finfo(dtype).bits // 8
    grid = list(_cases(runner))
    methods, skipped = build_methods(cuda=not runner.cpu)
    cases = []
    for index, (prompt, suffix, group, heads, kv_heads, head_dim) in enumerate(grid):
        rows = suffix * group
        harness.progress(index, len(grid), f"P={prompt} S={suffix} G={group}: {rows} cross rows")
        forward = merge_bytes(rows, heads, head_dim, element)
        backward = add_rows_bytes(rows, heads, prompt, kv_heads, head_dim, element)
        nbytes = {"fwd": forward, "bwd": backward, "fwd_bwd": forward + backward}
        case = {"params": {"P": prompt, "S": suffix, "G": group, "cross_rows": rows},
                "work": {"bytes": nbytes}, "methods": {}, "skipped": dict(skipped)}
        sets = runner.input_sets(lambda seed: make_inputs(prompt, suffix, group, heads, kv_heads, head_dim,
                                                          runner.device, dtype, seed))
        case["work"]["input_sets"] = len(sets)
        for name, kernels in methods.items():
            case["methods"][name] = {mode: runner.measure(step, sets, flops=0.0, nbytes=nbytes[mode])
                                     for mode, step in steps(kernels).items()}
        del sets
        copies, make_copy = copy_steps(nbytes, runner.device)
        copy_sets = runner.input_sets(make_copy)
        case["methods"]["torch_copy"] = {mode: runner.measure(step, copy_sets, flops=0.0, nbytes=nbytes[mode])
                                         for mode, step in copies.items()}
        del copy_sets
        cases.append(case)
    return shape_config(runner, dtype), cases


if __name__ == "__main__":
    sys.exit(harness.main([NAME, *sys.argv[1:]]))
