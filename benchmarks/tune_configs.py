"""Time candidate launch configurations per (op, head dim, dtype, GPU architecture) on a CUDA GPU and
write the winners as JSON, to be committed as (or merged into) the kernels' config tables.

    python benchmarks/tune_configs.py [--out DIR] [--quick]      (CUDA only; on CPU: says so, exits 0)

Candidates: a kernel module may expose ``TUNING_CANDIDATES = {kernel name: [overrides, ...]}``;
otherwise ``DEFAULT_CANDIDATES`` below is used. An override changes only launch options
(``num_warps``, ``num_stages``) and constexprs the kernel loops over internally (an inner tile),
never a tile that sets the grid or a layout table, so every candidate computes the same result; each
is still checked against the default configuration's output (``torch.testing.assert_close``) before
it may win. The search is per kernel (the others at their default), timing the op's forward and
backward with ``triton.testing.do_bench``. A winner should also pass ``compile_check.py`` before it
goes into a table.

Output: ``DIR/tuned_configs_<arch>.json`` (default DIR ``benchmarks/results``): the GPU, versions,
and per op and shape the default time, every candidate's time and the winner's overrides.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys

import torch

# Per kernel (module short name . function): the overrides tried. Inner tiles only (see above).
DEFAULT_CANDIDATES = {
    "prefix_attention.forward_kernel": [
        {"BLOCK_N": n, "num_warps": w, "num_stages": s} for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)],
    "prefix_attention.dkdv_kernel": [
        {"BLOCK_M": m, "num_warps": w, "num_stages": s} for m in (32, 64, 128) for w in (4, 8) for s in (1, 2, 3)],
    "prefix_attention.dq_kernel": [
        {"BLOCK_N": n, "num_warps": w, "num_stages": s} for n in (32, 64, 128) for w in (4, 8) for s in (1, 2, 3)],
    "local_linear_attention._forward_kernel": [
        {"BLOCK_N": n, "num_warps": w, "num_stages": s} for n in (16, 32, 64) for w in (4, 8) for s in (1, 2)],
    "local_linear_attention._backward_query_kernel": [
        {"BLOCK_N": n, "num_warps": w, "num_stages": s} for n in (16, 32, 64) for w in (4, 8) for s in (1, 2)],
    "local_linear_attention._backward_key_kernel": [
        {"BLOCK_M": m, "num_warps": w, "num_stages": s} for m in (16, 32, 64) for w in (4, 8) for s in (1, 2)],
    "grpo_loss._logits_kernel": [{"BLOCK_V": v, "num_warps": w} for v in (1024, 2048, 4096, 8192) for w in (4, 8, 16)],
}
KERNEL_PACKAGE = "pyfastrl.kernels."


def candidates(kernel: str) -> list[dict]:
    """The kernel module's ``TUNING_CANDIDATES`` entry if it has one, else ``DEFAULT_CANDIDATES``."""
    module_name, function = kernel.split(".")
    module = importlib.import_module(f"{KERNEL_PACKAGE}{module_name}.kernel")
    return getattr(module, "TUNING_CANDIDATES", {}).get(function, DEFAULT_CANDIDATES.get(kernel, []))


@contextlib.contextmanager
def overriding(kernel: str, overrides: dict, applied: list):
    """Launches of ``kernel`` inside the block take ``overrides`` in place of the wrapper's keyword
    arguments of the same names (``applied`` collects the names that were there to override)."""
    from triton.runtime.jit import JITFunction

    module_name, function = kernel.split(".")
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        # The programs live in the op's kernel package (kernel.py or triton_kernels.py).
        if self.fn.__name__ == function and self.fn.__module__.startswith(f"{KERNEL_PACKAGE}{module_name}."):
            for name, value in overrides.items():
                if name in kwargs or name.startswith("num_"):
                    kwargs[name] = value
                    applied.append(name)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original


def _leaf(*shape, dtype):
    return (torch.randn(*shape, device="cuda") * 0.5).to(dtype).requires_grad_()


def _prefix_case(head_dim, dtype, quick):
    import pyfastrl

    layout = pyfastrl.PrefixGroupLayout([2048] * (1 if quick else 2), [[512] * 8] * (1 if quick else 2), device="cuda")
    q = _leaf(layout.total_tokens, 16, head_dim, dtype=dtype)
    k, v = (_leaf(layout.total_tokens, 4, head_dim, dtype=dtype) for _ in range(2))
    return lambda: pyfastrl.prefix_grouped_attention(q, k, v, layout, backend="triton"), (q, k, v)


def _lla_case(head_dim, dtype, quick):
    import pyfastrl

    q = _leaf(1, 1024 if quick else 4096, 16, head_dim, dtype=dtype)
    k, v = (_leaf(1, q.shape[1], 4, head_dim, dtype=dtype) for _ in range(2))
    return lambda: pyfastrl.local_linear_attention(q, k, v, ridge_lambda=1.0, backend="triton"), (q, k, v)


def _fused_loss_case(hidden_size, dtype, quick):
    import pyfastrl

    tokens = 2048 if quick else 8192
    hidden = _leaf(tokens, hidden_size, dtype=dtype)
    weight = _leaf(151_936, hidden_size, dtype=dtype)
    targets = torch.randint(0, 151_936, (tokens,), device="cuda")
    cu = torch.arange(0, tokens + 1, 512, device="cuda", dtype=torch.int32)
    advantages = torch.randn(cu.numel() - 1, device="cuda")

    def call():
        return pyfastrl.fused_linear_grpo_loss(hidden, weight, targets, None, cu_seqlens=cu, advantages=advantages,
                                               backend="triton")[0]
    return call, (hidden, weight)


# op -> (case builder, sizes (head dim or hidden size), kernels tuned)
OPS = {
    "prefix_grouped_attention": (_prefix_case, (64, 128, 256), ("prefix_attention.forward_kernel",
                                 "prefix_attention.dkdv_kernel", "prefix_attention.dq_kernel")),
    "local_linear_attention": (_lla_case, (64, 128), ("local_linear_attention._forward_kernel",
                               "local_linear_attention._backward_query_kernel",
                               "local_linear_attention._backward_key_kernel")),
    "fused_linear_grpo_loss": (_fused_loss_case, (2048,), ("grpo_loss._logits_kernel",)),
}


def _step(call, inputs):
    """Forward and backward; returns the output and the input gradients."""
    for t in inputs:
        t.grad = None
    out = call()
    out.float().sum().backward()
    return [out.detach().float()] + [t.grad.float() for t in inputs]


def tune_case(call, inputs, kernels) -> dict:
    from triton.testing import do_bench

    reference = _step(call, inputs)
    default_ms = do_bench(lambda: _step(call, inputs))
    result = {"default_ms": default_ms, "kernels": {}}
    for kernel in kernels:
        timings = []
        for overrides in candidates(kernel):
            applied = []
            try:
                with overriding(kernel, overrides, applied):
                    got = _step(call, inputs)
                    if not applied:  # a stale kernel name: every "candidate" would time the default
                        raise LookupError(f"{kernel} was not launched by this op: nothing to override")
                    for want, have in zip(reference, got):
                        torch.testing.assert_close(have, want, rtol=2e-2, atol=2e-2)
                    ms = do_bench(lambda: _step(call, inputs))
            except Exception as error:  # noqa: BLE001 - a failing candidate is recorded, never chosen
                timings.append({"overrides": overrides, "error": f"{type(error).__name__}: {error}"[:300]})
                continue
            timings.append({"overrides": {k: v for k, v in overrides.items() if k in applied}, "ms": ms})
        valid = [t for t in timings if "ms" in t]
        winner = min(valid, key=lambda t: t["ms"]) if valid else None
        result["kernels"][kernel] = {"winner": winner, "candidates": timings}
        print(f"  {kernel}: " + (f"{winner['overrides']} {winner['ms']:.3f} ms (default {default_ms:.3f} ms)"
                                 if winner else "no valid candidate"), flush=True)
    return result


def _selection(only) -> set | None:
    """``--only`` as a set of (op, size or None); None when every op is tuned."""
    if only is None:
        return None
    selected = set()
    for item in only:
        op, _, size = item.partition("=")
        if op not in OPS:
            raise SystemExit(f"tune_configs: --only {item!r}: unknown op {op!r} (known: {', '.join(OPS)})")
        if size and int(size) not in OPS[op][1]:
            raise SystemExit(f"tune_configs: --only {item!r}: {op} is tuned at {OPS[op][1]}")
        selected.add((op, int(size) if size else None))
    return selected


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="smaller problems, bf16 only")
    parser.add_argument("--only", nargs="+", metavar="OP[=SIZE]", default=None,
                        help=f"tune only these ops (of {', '.join(OPS)}), optionally at one head dim / hidden size")
    args = parser.parse_args(argv)
    selected = _selection(args.only)
    if not torch.cuda.is_available():
        print("tune_configs: timing launch configurations needs a CUDA GPU and none is visible; nothing timed.")
        return 0
    import triton

    major, minor = torch.cuda.get_device_capability()
    arch = "sm90" if major >= 9 else "sm80"
    report = {"gpu": torch.cuda.get_device_name(), "capability": f"{major}.{minor}", "arch": arch,
              "torch": torch.__version__, "triton": triton.__version__, "ops": {}}
    dtypes = {"bf16": torch.bfloat16} if args.quick else {"bf16": torch.bfloat16, "fp16": torch.float16}
    for op, (build, sizes, kernels) in OPS.items():
        for size in sizes:
            if selected is not None and not ({(op, None), (op, size)} & selected):
                continue
            for dtype_name, dtype in dtypes.items():
                name = f"{dtype_name} {'H' if op == 'fused_linear_grpo_loss' else 'D'}={size}"
                print(f"{op} {name} on {report['gpu']}:", flush=True)
                call, inputs = build(size, dtype, args.quick)
                report["ops"].setdefault(op, {})[name] = tune_case(call, inputs, kernels)
                del call, inputs
                torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"tuned_configs_{arch}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"winners written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
