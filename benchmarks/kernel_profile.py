"""Where the GPU time of one op goes: per-kernel CUDA time of a forward + backward, by torch.profiler.

    python benchmarks/kernel_profile.py [--out DIR]      (CUDA only; on CPU: says so, exits 0)

Cases: the prefix-attention benchmark's largest quick case (P=4096, S=512, G=16; bf16, D=128,
Hq=32, Hkv=8) on the triton and flash backends, local linear attention (T=4096, D=64, bf16) and the
fused GRPO loss (16k tokens, H=4096, V=151936, bf16). Each is warmed up, then 5 steps are
profiled; the table lists each kernel's total and per-step time, most expensive first, and the
whole table goes to DIR/kernel_profile.txt. Benchmarks time; this says which kernel to work on.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

STEPS = 5


def _leaf(*shape, dtype=torch.bfloat16):
    return (torch.randn(*shape, device="cuda") * 0.5).to(dtype).requires_grad_()


def _prefix_case(backend):
    import pyfastrl

    layout = pyfastrl.PrefixGroupLayout([4096], [[512] * 16], device="cuda")
    q = _leaf(layout.total_tokens, 32, 128)
    k, v = (_leaf(layout.total_tokens, 8, 128) for _ in range(2))
    return lambda: pyfastrl.prefix_grouped_attention(q, k, v, layout, backend=backend), (q, k, v)


def _lla_case():
    import pyfastrl

    q = _leaf(1, 4096, 16, 64)
    k, v = (_leaf(1, 4096, 4, 64) for _ in range(2))
    return lambda: pyfastrl.local_linear_attention(q, k, v, ridge_lambda=1.0, backend="triton"), (q, k, v)


def _grpo_case():
    import pyfastrl

    tokens, vocab = 16384, 151_936
    hidden, weight = _leaf(tokens, 4096), _leaf(vocab, 4096)
    targets = torch.randint(0, vocab, (tokens,), device="cuda")
    cu = torch.arange(0, tokens + 1, 512, device="cuda", dtype=torch.int32)
    advantages = torch.randn(cu.numel() - 1, device="cuda")
    return (lambda: pyfastrl.fused_linear_grpo_loss(hidden, weight, targets, None, cu_seqlens=cu,
                                                    advantages=advantages, backend="triton")[0]), (hidden, weight)


CASES = {
    "prefix-attention triton P=4096 S=512 G=16": lambda: _prefix_case("triton"),
    "prefix-attention flash P=4096 S=512 G=16": lambda: _prefix_case("flash"),
    "lla triton T=4096 D=64": _lla_case,
    "grpo fused-linear 16k tokens": _grpo_case,
}


def profile(call, inputs) -> list[tuple[str, float]]:
    """[(kernel name, CUDA ms per step)], most expensive first."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    def step():
        for t in inputs:
            t.grad = None
        call().float().sum().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    rows = [(e.key, e.self_device_time_total / 1e3 / STEPS) for e in prof.key_averages()
            if e.self_device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"), help="output folder")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_profile: needs a CUDA GPU and none is visible; nothing profiled.")
        return 0
    lines = [f"# kernel profile on {torch.cuda.get_device_name()}, torch {torch.__version__}"]
    for name, build in CASES.items():
        call, inputs = build()
        rows = profile(call, inputs)
        total = sum(ms for _, ms in rows)
        lines.append(f"\n## {name}: {total:.3f} ms of kernels per forward + backward")
        lines += [f"{ms:9.3f} ms {100 * ms / total:5.1f}%  {kernel[:110]}" for kernel, ms in rows[:12]]
        del call, inputs
        torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_profile.txt"), "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
