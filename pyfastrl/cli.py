"""The ``pyfastrl`` command line.

    pyfastrl demo   grouped attention on a built-in ragged GRPO-like batch, checked against the
                    repeated-prompt computation (forward and gradients); exits 1 beyond tolerance
    pyfastrl verify grouped vs repeated batch on a transformers model (built-in tiny config or a local
                    directory): completion log-probs and every parameter gradient; exits 1 beyond tolerance.
                    --tree: the same for prefix trees (multi-turn conversations vs one row per sequence)
    pyfastrl train  GRPO training: the built-in default (tiny model, bundled tokenizer, synthetic task),
                    or a local model directory and a JSONL dataset
    pyfastrl bench  kernel microbenchmarks beside their peers (benchmarks/harness.py; CUDA, or --cpu)
    pyfastrl info   versions, device, and which backend of each op can run here (and why not)
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import sys
import time

import torch

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Max |grouped - repeated| / max |repeated| allowed against the float64 repeated-prompt computation.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _demo(args) -> int:
    from pyfastrl import PrefixGroupLayout, prefix_grouped_attention
    from pyfastrl._backend import resolve_backend
    from pyfastrl.kernels.prefix_attention.reference import repeated_prefix_attention

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    backend = resolve_backend("pyfastrl demo", args.backend, device)
    generator = torch.Generator().manual_seed(args.seed)
    low = max(1, args.suffix_len // 4)
    suffix_lens = [
        torch.randint(low, args.suffix_len + 1, (args.group_size,), generator=generator).tolist()
        for _ in args.prefix_lens
    ]
    layout = PrefixGroupLayout(args.prefix_lens, suffix_lens, device=device)
    print(f"batch: {layout.num_groups} prompts of {args.prefix_lens} tokens, {args.group_size} completions "
          f"each, completion lengths {low}..{args.suffix_len}")
    print(f"tokens through the model: repeated {layout.repeated_tokens:,} -> grouped {layout.total_tokens:,} "
          f"({layout.repeated_tokens / layout.total_tokens:.2f}x fewer)")
    print(f"attention score pairs:    repeated {layout.repeated_attention_pairs:,} -> grouped "
          f"{layout.attention_pairs:,} ({layout.repeated_attention_pairs / layout.attention_pairs:.2f}x fewer)")

    def randn(heads):
        shape = (layout.total_tokens, heads, args.head_dim)
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype).requires_grad_()

    q, k, v = randn(args.heads), randn(args.kv_heads), randn(args.kv_heads)
    grad_out = torch.randn(q.shape, generator=generator).to(device=device, dtype=dtype)
    scale = args.head_dim**-0.5

    print(f"running prefix_grouped_attention (backend={backend}, {args.dtype}, Hq={args.heads}, "
          f"Hkv={args.kv_heads}, D={args.head_dim}) forward + backward ...", flush=True)
    start = time.perf_counter()
    out = prefix_grouped_attention(q, k, v, layout, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    grouped_s = time.perf_counter() - start

    print("running the repeated-prompt reference in float64 (every completion with its own prompt copy) ...",
          flush=True)
    start = time.perf_counter()
    inputs64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = repeated_prefix_attention(*inputs64, layout, scale)
    ref_grads = torch.autograd.grad(ref, inputs64, grad_out.double())
    repeated_s = time.perf_counter() - start

    tolerance = TOLERANCE[dtype]
    failed = False
    print(f"\n{'tensor':<8}{'max |grouped - repeated|':>26}{'relative to max':>17}{'tolerance':>11}")
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        diff = (got.double() - want).abs().max().item()
        relative = diff / max(want.abs().max().item(), 1e-30)
        failed |= not relative <= tolerance
        print(f"{name:<8}{diff:>26.3e}{relative:>17.3e}{tolerance:>11.0e}")
    print(f"\nwall time on {device.type} (not a kernel benchmark; see benchmarks/): grouped {grouped_s:.2f} s, "
          f"float64 repeated reference {repeated_s:.2f} s")
    print("FAIL: grouped attention differs from the repeated-prompt computation" if failed else
          "OK: grouped attention equals the repeated-prompt computation, forward and gradients")
    return 1 if failed else 0


# Defaults of `pyfastrl verify` (one-level groups) and `pyfastrl verify --tree` (multi-turn trees).
VERIFY_DEFAULTS = {"group_size": 4, "num_prompts": 2, "prompt_len": 64, "completion_len": 32}
VERIFY_TREE_DEFAULTS = {"group_size": 2, "num_prompts": 2, "prompt_len": 32, "completion_len": 16, "turns": 3}


def _verify(args) -> int:
    defaults = VERIFY_TREE_DEFAULTS if args.tree else VERIFY_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.tree:
        return _verify_tree(args)
    from pyfastrl.integrations.transformers import verify_equivalence

    print(f"verifying {args.model}: {args.num_prompts} prompts x {args.group_size} completions, prompts up to "
          f"{args.prompt_len} tokens, completions up to {args.completion_len}, {args.dtype} ...", flush=True)
    report = verify_equivalence(
        args.model, group_size=args.group_size, num_prompts=args.num_prompts, prompt_len=args.prompt_len,
        completion_len=args.completion_len, dtype=DTYPES[args.dtype], device=args.device, seed=args.seed,
        padding_side=args.padding_side, gradient_checkpointing=args.gradient_checkpointing,
        tolerance=args.tolerance,
    )
    print(report.summary())
    return 0 if report.passed else 1


def _verify_tree(args) -> int:
    from pyfastrl.integrations.transformers_tree import verify_tree_equivalence

    trajectories = args.num_prompts * args.group_size ** args.turns
    print(f"verifying {args.model} on prefix trees: {args.num_prompts} conversations, {args.turns} turns, "
          f"{args.group_size} sampled replies per turn ({trajectories} trajectories + {args.num_prompts} first "
          f"replies), system prompts up to {args.prompt_len} tokens, user turns and replies up to "
          f"{args.completion_len}, {args.dtype} ...", flush=True)
    report = verify_tree_equivalence(
        args.model, num_conversations=args.num_prompts, turns=args.turns, samples_per_turn=args.group_size,
        prompt_len=args.prompt_len, turn_len=args.completion_len, dtype=DTYPES[args.dtype], device=args.device,
        seed=args.seed, padding_side=args.padding_side, gradient_checkpointing=args.gradient_checkpointing,
        tolerance=args.tolerance,
    )
    print(report.summary())
    return 0 if report.passed else 1


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


_OPS = (
    "prefix_grouped_attention", "grpo_loss", "fused_linear_grpo_loss", "selective_logprobs", "local_linear_attention",
    "local_linear_attention_decode",
)


def _info(args) -> int:
    from pyfastrl import __version__
    from pyfastrl._backend import (BACKEND_ENV, FLASH_MERGE_ENV, flash_unavailable_reason, resolve_backend,
                                   triton_unavailable_reason)

    print(f"pyfastrl      {__version__}")
    print(f"python        {platform.python_version()}")
    for package in ("torch", "triton", "transformers"):
        print(f"{package:<14}{_version(package)}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print(f"device        {torch.cuda.get_device_name() if cuda else 'cpu (no CUDA device visible)'}")
    reason = triton_unavailable_reason(device)
    # Every op has the same two backends and the same availability rule.
    print(f"\nbackends of {', '.join(_OPS)}:")
    print("  torch   available")
    print(f"  triton  {'available' if reason is None else 'unavailable: ' + reason}")
    print(f"  auto    -> {'triton' if cuda and reason is None else 'torch'} here "
          f"(override with {BACKEND_ENV}=torch|triton)")
    flash_reason = flash_unavailable_reason(device)
    if flash_reason is None:
        from pyfastrl.kernels.prefix_attention import flash

        kernel = flash.cuda_primitive(device) if cuda else "PyTorch's CPU flash kernel"
        where = "fp16/bf16, head dim multiple of 8 up to 256" if cuda else "fp16/bf16/fp32/fp64"
    print("\nprefix_grouped_attention also has:")
    print(f"  flash   {'available (' + kernel + '; ' + where + ')' if flash_reason is None else 'unavailable: ' + flash_reason}")
    try:
        chosen = resolve_backend("prefix_grouped_attention", "auto", device,
                                 dtype=torch.bfloat16 if cuda else torch.float32, head_dim=128)
    except (ValueError, RuntimeError) as error:
        chosen = f"error: {error}"
    print(f"  auto    -> {chosen} here for {'bf16' if cuda else 'fp32'}, D=128 without soft-capping or a sliding "
          f"window (override with {BACKEND_ENV}=flash)")
    from pyfastrl.kernels import cuda_extension

    cuda_reason = cuda_extension.unavailable_reason()
    print(f"\nCUDA extension (pyfastrl._cuda: grpo_loss(backend='cuda'); the flash backend's merge with "
          f"{FLASH_MERGE_ENV}=cuda):")
    print(f"  cuda    {'available' if cuda_reason is None else 'unavailable: ' + cuda_reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyfastrl", description="Custom-kernel ops for GRPO post-training.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="check grouped attention against the repeated-prompt computation on a built-in batch",
        description="Builds a ragged GRPO-like batch (each prompt with several completions), runs "
        "prefix_grouped_attention forward and backward and compares output and dq/dk/dv with the "
        "float64 repeated-prompt computation. Exits 1 if a difference exceeds the dtype's tolerance.",
    )
    demo.add_argument("--prefix-lens", type=_positive_ints, default=[384, 256],
                      help="comma-separated prompt lengths, one group each (default 384,256)")
    demo.add_argument("--group-size", type=int, default=8, help="completions per prompt (default 8)")
    demo.add_argument("--suffix-len", type=int, default=64,
                      help="longest completion; lengths are drawn from suffix_len/4..suffix_len (default 64)")
    demo.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    demo.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default 2)")
    demo.add_argument("--head-dim", type=int, default=64, help="head dim (default 64)")
    demo.add_argument("--dtype", choices=list(DTYPES), default="float32", help="input dtype (default float32)")
    demo.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto",
                      help="op backend (default auto: triton on CUDA, torch otherwise)")
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                      help="device (default cuda if available, else cpu)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(run=_demo)

    verify = commands.add_parser(
        "verify",
        help="check that prefix grouping leaves a transformers model's log-probs and gradients unchanged",
        description="Runs the repeated-prompt batch (transformers SDPA attention; the model's eager attention "
        "where attention logits are soft-capped, which SDPA ignores) and the grouped batch "
        "(pyfastrl_prefix attention) on the same random rollout, forward and backward through a GRPO-like "
        "loss, and reports the max differences of completion log-probs and of every parameter gradient "
        "(worst parameters named), token counts and wall times. With --tree: random multi-turn conversations "
        "(a system prompt, then per turn a user message and several sampled replies) packed as one prefix tree "
        "against one padded row per sequence, comparing the log-probs of every reply token. Exits 1 beyond "
        "tolerance.",
    )
    from pyfastrl.integrations.transformers import TINY_CONFIGS

    verify.add_argument("--model", default="tiny-llama",
                        help=f"local HF model directory, or a built-in tiny config: {', '.join(TINY_CONFIGS)} "
                        "(default tiny-llama)")
    verify.add_argument("--group-size", type=int, default=None,
                        help="completions per prompt (default 4); with --tree sampled replies per turn (default 2)")
    verify.add_argument("--num-prompts", type=int, default=None,
                        help="prompts (default 2); with --tree conversations (default 2)")
    verify.add_argument("--prompt-len", type=int, default=None,
                        help="longest prompt, lengths drawn from len/2..len (default 64; with --tree the "
                        "system prompt, default 32)")
    verify.add_argument("--completion-len", type=int, default=None,
                        help="longest completion (default 32; with --tree user turns and replies, default 16)")
    verify.add_argument("--tree", action="store_true",
                        help="check prefix trees instead: random multi-turn conversations sharing prefixes at "
                        "several depths, packed as one tree (build_tree_batch) vs one padded row per sequence")
    verify.add_argument("--turns", type=int, default=None, help="with --tree: turns per conversation (default 3)")
    verify.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model dtype (default float32)")
    verify.add_argument("--device", default=None, help="device (default cuda if available, else cpu)")
    verify.add_argument("--padding-side", choices=["left", "right"], default="left",
                        help="padding of the repeated batch (default left)")
    verify.add_argument("--gradient-checkpointing", action="store_true", help="enable gradient checkpointing")
    verify.add_argument("--tolerance", type=float, default=None,
                        help="relative tolerance (default per dtype: float64 1e-5, float32 1e-3, bfloat16 5e-2, "
                        "float16 1e-2)")
    verify.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    verify.set_defaults(run=_verify)

    from pyfastrl.trainer.command import add_parser as add_train_parser

    add_train_parser(commands)

    harness = _bench_harness()
    bench = commands.add_parser(
        "bench", help="kernel microbenchmarks beside their peers (CUDA; --cpu: torch backends, small sizes)",
        description=harness.DESCRIPTION if harness else "Kernel microbenchmarks (needs the repository's benchmarks/).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    if harness is None:
        bench.add_argument("arguments", nargs=argparse.REMAINDER)
        bench.set_defaults(run=_no_benchmarks)
    else:
        harness.add_arguments(bench)
        bench.set_defaults(run=harness.run)

    info = commands.add_parser("info", help="versions, device and available backends")
    info.set_defaults(run=_info)
    return parser


BENCHMARKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _bench_harness():
    """The benchmark harness (``benchmarks/harness.py`` of the checkout this package runs from), or
    None where there is none (an installed wheel carries no benchmarks/).

    Loaded by path, under the name its case files import it by, without putting benchmarks/ on
    sys.path: every command builds this parser, and the case files' module names (``grpo_loss``,
    ``lla``, ...) must not shadow a user's modules (``pyfastrl train --reward module:function``).
    The harness adds its folder itself when it runs the case files."""
    path = os.path.join(BENCHMARKS_DIR, "harness.py")
    if not os.path.isfile(path):
        return None
    loaded = sys.modules.get("harness")
    if loaded is None or getattr(loaded, "__file__", None) != path:
        spec = importlib.util.spec_from_file_location("harness", path)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules["harness"] = loaded
        spec.loader.exec_module(loaded)
    return loaded


def _no_benchmarks(args) -> int:
    print(f"pyfastrl bench runs the case files in the repository's benchmarks/ folder, and this installation "
          f"has none ({BENCHMARKS_DIR}): install from a checkout with pip install -e .", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        for name in ("group_size", "suffix_len", "heads", "kv_heads", "head_dim"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.command == "verify" and args.turns is not None and not args.tree:
        parser.error("--turns applies to --tree only")
    try:
        return args.run(args)
    except (ValueError, TypeError, RuntimeError, NotImplementedError, FileExistsError) as error:
        print(f"pyfastrl {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
