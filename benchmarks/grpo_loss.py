"""Microbenchmark: fused LM-head GRPO loss vs the paths a user would otherwise take.

    python benchmarks/grpo_loss.py [--quick] [--out DIR]

Tokens in {4096, 16384, 65536} (rows of 1024 completion tokens, every token valid so that all
methods do the same FLOPs), H = 4096, V = 151,936 (Qwen), bf16, token-level dapo loss with
old log-probs (both clip sides active). Forward + backward (gradients for hidden and weight):
  pyfastrl            fused_linear_grpo_loss, Triton backend (chunked; logits never all alive)
  torch_unfused       materialised logits (bf16 matmul), fp32 log_softmax, TRL's formulas, autograd
  liger_fused_linear  Liger-Kernel LigerFusedLinearGRPOLoss (chunked, torch.compile), if importable
  liger_triton        Liger-Kernel triton_grpo_loss on materialised logits, if importable
  matmul_floor        the three tokens x H x V matmuls alone (logits, dh, dW): the physical floor
Median ms (triton.testing.do_bench), TFLOP/s of the floor's 6*N*H*V FLOPs, time relative to the
floor, and peak memory beyond the inputs. A method that runs out of memory or fails is recorded as
such and the run goes on.

Needs a CUDA GPU: on a CPU-only machine it says so and exits 0.
"""
from __future__ import annotations

import sys

import torch

from common import measure_or_record_failure, parse_args_or_skip, write_report
from pyfastrl import fused_linear_grpo_loss
from pyfastrl.kernels.grpo_loss.reference import naive_grpo_loss, naive_token_logprobs

HIDDEN, VOCAB, ROW_LENGTH = 4096, 151_936, 1024
FULL_TOKENS = (4096, 16384, 65536)
QUICK_TOKENS = (4096, 16384)
LOSS = dict(loss_type="dapo", eps_low=0.2, eps_high=0.28)


def floor_flops(tokens: int, hidden: int, vocab: int) -> float:
    """FLOPs of the three tokens x H x V matmuls every method needs (logits, dh, dW)."""
    return 3 * 2.0 * tokens * hidden * vocab


def make_inputs(tokens: int, hidden: int, vocab: int, device, dtype=torch.bfloat16, row_length: int = ROW_LENGTH):
    """Random inputs: hidden ``(B, L, H)``, weight ``(V, H)`` at LM-head scale, targets, mask,
    advantages of both signs and old log-probs 0.3 (in log space) away from the current ones."""
    rows = max(1, tokens // row_length)
    length = tokens // rows
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(rows, length, hidden, device=device, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, device=device, generator=g) * hidden**-0.5).to(dtype)
    targets = torch.randint(0, vocab, (rows, length), device=device, generator=g)
    mask = torch.ones(rows, length, dtype=torch.bool, device=device)
    adv = torch.randn(rows, device=device, generator=g)
    with torch.no_grad():
        logp, _ = naive_token_logprobs(h, w, targets)
    old = logp + 0.3 * torch.randn(logp.shape, device=device, generator=g)
    return h, w, targets, mask, adv, old


def build_methods(h, w, targets, mask, adv, old, backend: str = "triton") -> dict:
    """Each method as ``fn(hidden, weight) -> loss`` (None for the floor, which has no loss), plus
    ``{name: reason}`` for the peers that could not be set up."""
    methods, skipped = {}, {}

    def ours(hidden, weight):
        return fused_linear_grpo_loss(hidden, weight, targets, mask, advantages=adv, old_logprobs=old,
                                      backend=backend, **LOSS)[0]

    def unfused(hidden, weight):
        logp, _ = naive_token_logprobs(hidden, weight, targets)
        return naive_grpo_loss(logp, mask, adv, old, **LOSS)[0]

    class _Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight):
            ctx.save_for_backward(hidden, weight)
            ctx.logits = hidden @ weight.t()
            return ctx.logits.new_zeros(())

        @staticmethod
        def backward(ctx, grad):
            hidden, weight = ctx.saved_tensors
            logits = ctx.logits
            return logits @ weight, logits.t() @ hidden

    methods["pyfastrl"] = ours
    methods["torch_unfused"] = unfused
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=0.0, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28)

        def liger_fused(hidden, weight):
            return liger(hidden, weight, targets, mask.long(), adv, old_per_token_logps=old)[0]

        methods["liger_fused_linear"] = liger_fused
    except Exception as error:  # not installed, or an API this script does not know
        skipped["liger_fused_linear"] = f"{type(error).__name__}: {error}"[:200]
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        def liger_triton(hidden, weight):
            # It wants logits (B, L+1, V) whose last position is dropped: materialise them.
            logits = torch.cat([hidden, hidden[:, -1:]], 1) @ weight.t()
            return triton_grpo_loss(logits, old, None, targets, adv, mask.long(), temperature=1.0, beta=0.0,
                                    eps_low=0.2, eps_high=0.28, loss_type="dapo")[0]

        methods["liger_triton"] = liger_triton
    except Exception as error:
        skipped["liger_triton"] = f"{type(error).__name__}: {error}"[:200]
    methods["matmul_floor"] = lambda hidden, weight: _Floor.apply(hidden.flatten(0, 1), weight)
    return methods, skipped


def _time_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=50, return_mode="median")


def run_case(tokens: int, device) -> dict:
    h, w, targets, mask, adv, old = make_inputs(tokens, HIDDEN, VOCAB, device)
    methods, skipped = build_methods(h, w, targets, mask, adv, old)
    flops = floor_flops(tokens, HIDDEN, VOCAB)
    case = {"tokens": tokens, "rows": h.shape[0], "floor_tflop": flops / 1e12, "methods": {},
            "skipped": skipped}
    hidden, weight = h.clone().requires_grad_(), w.clone().requires_grad_()
    for name, fn in methods.items():
        def measure():
            def step():
                return torch.autograd.grad(fn(hidden, weight), (hidden, weight))

            step()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            result = {"peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20,
                      "fwd_bwd_ms": _time_ms(step)}
            result["tflops"] = flops / result["fwd_bwd_ms"] / 1e9
            return result

        case["methods"][name] = measure_or_record_failure(measure)
    floor = case["methods"]["matmul_floor"].get("fwd_bwd_ms")
    for result in case["methods"].values():
        if floor and "fwd_bwd_ms" in result:
            result["x_floor"] = result["fwd_bwd_ms"] / floor
    return case


def _print_table(cases: list[dict]) -> None:
    print(f"\n{'tokens':>7} | {'method':<19}| {'f+b ms':>9} {'TFLOP/s':>8} {'x floor':>8} | {'peak MiB':>9}")
    for case in cases:
        for name, r in case["methods"].items():
            head = f"{case['tokens']:>7} | {name:<19}|"
            if "error" in r:
                print(f"{head} {r['error']}")
                continue
            print(f"{head} {r['fwd_bwd_ms']:>9.2f} {r['tflops']:>8.1f} {r.get('x_floor', 0):>8.2f} | "
                  f"{r['peak_extra_mib']:>9.0f}")
        for name, reason in case["skipped"].items():
            print(f"{case['tokens']:>7} | {name:<19}| skipped: {reason}")


def main(argv=None) -> int:
    args = parse_args_or_skip(argv, __doc__, "grpo_loss.py", "tokens 4096 and 16384 only")
    if args is None:
        return 0
    device = torch.device("cuda")
    grid = QUICK_TOKENS if args.quick else FULL_TOKENS
    cases = []
    for i, tokens in enumerate(grid):
        print(f"[{i + 1}/{len(grid)}] tokens={tokens} H={HIDDEN} V={VOCAB} ...", flush=True)
        cases.append(run_case(tokens, device))
    _print_table(cases)
    write_report(args.out, "grpo_loss", {"dtype": "bfloat16", "H": HIDDEN, "V": VOCAB, "row_length": ROW_LENGTH, **LOSS}, cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
