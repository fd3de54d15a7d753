"""Benchmark case ``grpo-loss-rows``: the GRPO loss of given per-token log-probs (no LM head), the
memory-bound row kernels of each backend.

    pyfastrl bench grpo-loss-rows [--quick] [--cpu]     (or python benchmarks/grpo_loss_rows.py)

Packed log-probs ``(N,)`` bf16 with old and reference log-probs (fp32), a mask and per-row
advantages; token-level dapo loss with a k3 KL term (beta 0.04) and both clip sides active; rows of
``row_length`` tokens, and one batch of a few very long rows where one program per row leaves most
of the GPU idle. Forward + backward (dL/dlogp). Methods:
  pyfastrl         grpo_loss, backend "triton" (one program per row); on the CPU, backend "torch"
  pyfastrl_cuda    grpo_loss, backend "cuda" (csrc/grpo_loss: chunked over the tokens), if built
  pyfastrl_torch   grpo_loss, backend "torch" (CUDA runs)
  torch_unfused    the baseline: TRL's formulas on the (rows, row_length) batch, autograd
  row_kernels_cuda, row_kernels_triton   (CUDA) the backends' row kernels alone, forward partials
                   then dL/dlogp, on per-token advantages prepared outside the timing: what the
                   kernels themselves reach, without the op's PyTorch around them. They move
                   ``ROW_KERNEL_BYTES`` per token (logp, old, ref, mask, advantage read twice, dL/dlogp
                   written), more than the op's useful bytes the GB/s column counts: their fraction
                   of the copy roofline is that column's times ROW_KERNEL_BYTES / useful bytes per token
Useful bytes, the same for every method: log-probs read twice (forward and backward) and dL/dlogp
written (bf16), old and reference log-probs (fp32) read twice, the mask (1 byte) read twice, the
per-row advantages once. The issue's target: the CUDA kernels at >= 80% of the copy roofline at 1M
tokens. With --cpu: fp32, small sizes, the torch paths only (CPU numbers).
"""
from __future__ import annotations

import sys

import torch

import harness
from pyfastrl import grpo_loss

NAME = "grpo-loss-rows"
PLOT = {"x": "tokens", "series": "row_length", "baseline": "torch_unfused", "ours": "pyfastrl",
        "not_peers": ("row_kernels_cuda", "row_kernels_triton")}
# (tokens, row length): 1M tokens in rows of 1,024 and in 8 rows of 131,072; 4M in rows of 4,096.
CUDA_GRID = [(1 << 20, 1024), (1 << 20, 1 << 17), (1 << 22, 4096)]
QUICK_GRID = [(1 << 20, 1024), (1 << 20, 1 << 17)]
CPU_GRID = [(1 << 14, 512)]
LOSS = dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.04)
ROW_KERNEL_BYTES = 2 * (2 + 4 + 4 + 1 + 4) + 2  # bf16 logp, fp32 old/ref/advantage, mask, twice; bf16 dL/dlogp


def useful_bytes(tokens: int, rows: int, element_size: int) -> float:
    return tokens * (3 * element_size + 2 * 2 * 4 + 2 * 1) + rows * 4


def make_inputs(tokens: int, row_length: int, device, dtype, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    rows = tokens // row_length
    logp = (-torch.rand(tokens, device=device, generator=g) * 3).to(dtype).requires_grad_()
    old = logp.detach().float() + 0.3 * torch.randn(tokens, device=device, generator=g)
    ref = logp.detach().float() + 0.2 * torch.randn(tokens, device=device, generator=g)
    mask = torch.rand(tokens, device=device, generator=g) < 0.9
    cu = torch.arange(0, tokens + 1, row_length, device=device)
    advantages = torch.randn(rows, device=device, generator=g)
    return logp, old, ref, mask, cu, advantages


def row_kernels(backend: str):
    """The backend's row kernels alone (forward partials, then dL/dlogp with row weights 1/N): returns
    ``(partials, dlogp)``."""
    from pyfastrl.kernels.grpo_loss.reference import LossOptions
    from pyfastrl.ops._grpo_common import implementation

    # LOSS as the backends see it (token level, k3 KL with the ratio factor: grpo_loss's defaults).
    opts = LossOptions(LOSS["loss_type"], False, LOSS["epsilon"], LOSS["epsilon_high"], None, LOSS["beta"], "k3", True,
                       1.0, 1.05)
    per_token = {}  # per input set, prepared once: the op's setup is not what is timed here

    def call(logp, old, ref, mask, cu, advantages):
        key = id(advantages)
        if key not in per_token:
            row_grad = torch.full_like(advantages, 1.0 / logp.numel())
            per_token[key] = (advantages.repeat_interleave(logp.numel() // advantages.numel()), row_grad)
        adv, row_grad = per_token[key]
        impl = implementation(backend)
        partials = impl.loss_forward(logp, old, ref, None, mask, cu, adv, opts)
        return partials, impl.loss_backward(row_grad, logp, old, ref, None, mask, cu, adv, opts)
    return call


def build_methods(cuda: bool):
    from pyfastrl.kernels import cuda_extension
    from pyfastrl.kernels.grpo_loss.reference import naive_grpo_loss

    def ours(backend):
        def call(logp, old, ref, mask, cu, advantages):
            loss, _ = grpo_loss(logp, mask, advantages=advantages, old_per_token_logps=old, ref_per_token_logps=ref,
                                cu_seqlens=cu, backend=backend, **LOSS)
            return torch.autograd.grad(loss, logp)
        return call

    def unfused(logp, old, ref, mask, cu, advantages):
        shape = (advantages.numel(), -1)
        loss, _ = naive_grpo_loss(logp.view(shape), mask.view(shape), advantages.to(old.dtype), old.view(shape),
                                  ref.view(shape), **LOSS)
        return torch.autograd.grad(loss, logp)

    methods, skipped = {"pyfastrl": ours("triton" if cuda else "torch")}, {}
    if not cuda:
        skipped.update(pyfastrl_cuda="CUDA only", pyfastrl_torch="the CPU run's pyfastrl is the torch backend")
    else:
        reason = cuda_extension.device_unavailable_reason(torch.device("cuda"))
        if reason is None:
            methods["pyfastrl_cuda"] = ours("cuda")
            methods["row_kernels_cuda"] = row_kernels("cuda")
        else:
            skipped["pyfastrl_cuda"] = skipped["row_kernels_cuda"] = reason
        methods["pyfastrl_torch"] = ours("torch")
        methods["row_kernels_triton"] = row_kernels("triton")
    methods["torch_unfused"] = unfused
    return methods, skipped


def run(runner: harness.Runner):
    dtype = torch.float32 if runner.cpu else torch.bfloat16
    grid = CPU_GRID if runner.cpu else (QUICK_GRID if runner.quick else CUDA_GRID)
    methods, skipped = build_methods(cuda=not runner.cpu)
    cases = []
    for index, (tokens, row_length) in enumerate(grid):
        harness.progress(index, len(grid), f"tokens={tokens} rows of {row_length}")
        sets = runner.input_sets(lambda seed: make_inputs(tokens, row_length, runner.device, dtype, seed))
        nbytes = useful_bytes(tokens, tokens // row_length, torch.finfo(dtype).bits // 8)
        case = {"params": {"tokens": tokens, "row_length": row_length},
                "work": {"rows": tokens // row_length, "input_sets": len(sets),
                         "row_kernel_bytes": tokens * ROW_KERNEL_BYTES},
                "methods": {}, "skipped": dict(skipped)}
        for name, fn in methods.items():
            case["methods"][name] = {"fwd_bwd": runner.measure(fn, sets, flops=0.0, nbytes=nbytes)}
        del sets
        cases.append(case)
    return {"dtype": str(dtype).removeprefix("torch."), **LOSS}, cases


if __name__ == "__main__":
    sys.exit(harness.main([NAME, *sys.argv[1:]]))
