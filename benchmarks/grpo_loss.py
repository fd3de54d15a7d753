"""Benchmark case ``grpo-loss``: the fused LM-head GRPO loss vs the paths a user would otherwise take.

    pyfastrl bench grpo-loss [--quick] [--cpu]     (or python benchmarks/grpo_loss.py)

Tokens in {4096, 16384, 65536} (rows of 1024 completion tokens, every token valid so that all
methods do the same FLOPs), H = 4096, V = 151,936 (Qwen), bf16, token-level dapo loss with old
log-probs (both clip sides active). Forward + backward (gradients for hidden and weight):
  pyfastrl            fused_linear_grpo_loss, Triton backend (chunked; logits never all alive)
  pyfastrl_torch      the same op's plain PyTorch backend (chunked)
  torch_unfused       the baseline: materialised logits (bf16 matmul), fp32 log_softmax, TRL's
                      formulas, autograd
  liger_fused_linear  Liger-Kernel LigerFusedLinearGRPOLoss (chunked, torch.compile), if importable
  liger_triton        Liger-Kernel triton_grpo_loss on materialised logits, if importable (CUDA)
  matmul_floor        the three tokens x H x V matmuls alone (logits, dh, dW): the physical floor
Useful work, the same for every method: the floor's 6*N*H*V FLOPs; bytes: hidden and weight read,
their gradients written, targets, old log-probs and advantages read, once each.
With --cpu: H=64, V=2048, fp32, tokens {256, 1024}, the torch backends only.
"""
from __future__ import annotations

import sys

import torch

import harness
from pyfastrl import fused_linear_grpo_loss
from pyfastrl.kernels.grpo_loss.reference import naive_grpo_loss, naive_token_logprobs

NAME = "grpo-loss"
PLOT = {"x": "tokens", "series": None, "baseline": "torch_unfused", "ours": "pyfastrl",
        "not_peers": ("matmul_floor",)}
CUDA_SHAPE = dict(hidden=4096, vocab=151_936, row_length=1024, dtype=torch.bfloat16)
CPU_SHAPE = dict(hidden=64, vocab=2048, row_length=128, dtype=torch.float32)
FULL_TOKENS = (4096, 16384, 65536)
QUICK_TOKENS = (4096, 16384)
CPU_TOKENS = (256, 1024)
LOSS = dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28)


def floor_flops(tokens: int, hidden: int, vocab: int) -> float:
    """FLOPs of the three tokens x H x V matmuls every method needs (logits, dh, dW)."""
    return 3 * 2.0 * tokens * hidden * vocab


def useful_bytes(tokens: int, hidden: int, vocab: int, element_size: int, rows: int) -> float:
    """Compulsory traffic: hidden and weight read and their gradients written, targets (int64), old
    log-probs (fp32) and the mask read per token, advantages (fp32) per row."""
    return 2 * element_size * (tokens * hidden + vocab * hidden) + tokens * (8 + 4 + 1) + rows * 4


def make_inputs(tokens: int, hidden: int, vocab: int, device, dtype=torch.bfloat16, row_length: int = 1024,
                seed: int = 0):
    """Random inputs: hidden ``(B, L, H)`` and weight ``(V, H)`` at LM-head scale (both requiring
    grad), targets, mask, advantages of both signs and old log-probs 0.3 (in log space) away from
    the current ones."""
    rows = max(1, tokens // row_length)
    length = tokens // rows
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(rows, length, hidden, device=device, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, generator=g) * hidden**-0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows, length), device=device, generator=g)
    mask = torch.ones(rows, length, dtype=torch.bool, device=device)
    adv = torch.randn(rows, device=device, generator=g)
    with torch.no_grad():
        logp, _ = naive_token_logprobs(h, w, targets)
    old = logp + 0.3 * torch.randn(logp.shape, device=device, generator=g)
    return h, w, targets, mask, adv, old


class _MatmulFloor(torch.autograd.Function):
    """The three matmuls alone: logits forward, then dh = logits @ W and dW = logits^T @ h."""

    @staticmethod
    def forward(ctx, hidden, weight):
        ctx.save_for_backward(hidden, weight)
        ctx.logits = hidden @ weight.t()
        return ctx.logits.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        hidden, weight = ctx.saved_tensors
        return ctx.logits @ weight, ctx.logits.t() @ hidden


def build_methods(*, cuda: bool) -> tuple[dict, dict]:
    """``({name: fn(h, w, targets, mask, adv, old) -> loss}, {name: reason})``."""
    methods, skipped = {}, {}

    def ours(backend):
        def loss(h, w, targets, mask, adv, old):
            return fused_linear_grpo_loss(h, w, targets, mask, advantages=adv, old_per_token_logps=old, backend=backend,
                                          **LOSS)[0]
        return loss

    def unfused(h, w, targets, mask, adv, old):
        logp, _ = naive_token_logprobs(h, w, targets)
        return naive_grpo_loss(logp, mask, adv, old, **LOSS)[0]

    methods["pyfastrl"] = ours("triton" if cuda else "torch")
    if cuda:
        methods["pyfastrl_torch"] = ours("torch")
    methods["torch_unfused"] = unfused
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo", epsilon_low=0.2,
                                         epsilon_high=0.28)
        methods["liger_fused_linear"] = lambda h, w, targets, mask, adv, old: liger(
            h, w, targets, mask.long(), adv, old_per_token_logps=old)[0]
    except Exception as error:  # not installed, or an API this file does not know
        skipped["liger_fused_linear"] = f"{type(error).__name__}: {error}"[:200]
    if not cuda:
        skipped["liger_triton"] = "a Triton kernel: CUDA only"
    else:
        try:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss

            def liger_triton(h, w, targets, mask, adv, old):
                # It wants logits (B, L+1, V) whose last position is dropped: materialise them.
                logits = torch.cat([h, h[:, -1:]], 1) @ w.t()
                return triton_grpo_loss(logits, old, None, targets, adv, mask.long(), temperature=1.0, beta=0.0,
                                        eps_low=0.2, eps_high=0.28, loss_type="dapo", reduce=True)[0]

            methods["liger_triton"] = liger_triton
        except Exception as error:
            skipped["liger_triton"] = f"{type(error).__name__}: {error}"[:200]
    methods["matmul_floor"] = lambda h, w, *_: _MatmulFloor.apply(h.flatten(0, 1), w)
    return methods, skipped


def run(runner: harness.Runner):
    shape = CPU_SHAPE if runner.cpu else CUDA_SHAPE
    hidden, vocab, row_length, dtype = shape["hidden"], shape["vocab"], shape["row_length"], shape["dtype"]
    grid = CPU_TOKENS if runner.cpu else (QUICK_TOKENS if runner.quick else FULL_TOKENS)
    methods, skipped = build_methods(cuda=not runner.cpu)
    cases = []
    for index, tokens in enumerate(grid):
        harness.progress(index, len(grid), f"tokens={tokens} H={hidden} V={vocab}")
        sets = runner.input_sets(lambda seed: make_inputs(tokens, hidden, vocab, runner.device, dtype, row_length, seed))
        rows = sets[0][0].shape[0]
        flops = floor_flops(tokens, hidden, vocab)
        nbytes = useful_bytes(tokens, hidden, vocab, torch.finfo(dtype).bits // 8, rows)
        case = {"params": {"tokens": tokens}, "work": {"rows": rows, "floor_tflop": flops / 1e12,
                                                       "input_sets": len(sets)},
                "methods": {}, "skipped": dict(skipped)}
        for name, fn in methods.items():
            def step(h, w, *rest):
                return torch.autograd.grad(fn(h, w, *rest), (h, w))

            case["methods"][name] = {"fwd_bwd": runner.measure(step, sets, flops=flops, nbytes=nbytes)}
        del sets
        cases.append(case)
    config = {"dtype": str(dtype).removeprefix("torch."), "H": hidden, "V": vocab, "row_length": row_length, **LOSS}
    return config, cases


if __name__ == "__main__":
    sys.exit(harness.main([NAME, *sys.argv[1:]]))
