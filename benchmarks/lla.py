"""Benchmark: local linear attention (LLA) speed against softmax attention, and its regression quality.

    python benchmarks/lla.py [--quick] [--out DIR]

1. In-context regression quality (any machine, float64, torch backend): context pairs (k_j, v_j)
   with v = A k (linear) or v = tanh(2 A k) (nonlinear), d = 4, 128 pairs, a query drawn like the
   keys, lambda = 1e-3, tau = 0.5, 200 trials. MSE of the prediction at the query for softmax
   attention, LLA, and a global affine ridge regression on all pairs (the uniform-weight limit).
2. Speed (CUDA only): B = 1, 16 heads, T in {1024, 4096, 16384}, D in {64, 128}, bf16,
   lambda = 1. Median ms (triton.testing.do_bench) of forward and forward+backward for
     pyfastrl_triton   local_linear_attention, Triton backend (CG to tolerance 1e-5)
     pyfastrl_torch    the chunked torch backend (direct Cholesky solves; T <= 4096)
     sdpa_flash        softmax attention, SDPA's FlashAttention-2 backend
   with the CG iterations the forward used (mean and max over query blocks), and the targets'
   ratios: LLA forward / flash forward (target <= 10 at T=4096, D=64) and LLA backward / LLA
   forward (target <= 2.5). A method that fails or runs out of memory is recorded as such.
"""
from __future__ import annotations

import sys

import torch

from common import measure_or_record_failure, parse_args_or_skip, write_report
from pyfastrl import local_linear_attention

HEADS, RIDGE = 16, 1.0
FULL_GRID = [(t, d) for t in (1024, 4096, 16384) for d in (64, 128)]
QUICK_GRID = [(1024, 64), (4096, 64), (4096, 128)]
TORCH_BACKEND_MAX_T = 4096


# ----------------------------------------------------------------------------- regression quality


def regression_quality(trials: int = 200, pairs: int = 128, dim: int = 4, ridge: float = 1e-3, scale: float = 0.5,
                       seed: int = 0) -> dict:
    """MSE at the query of softmax attention, LLA and global affine ridge, per map (float64, CPU)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(trials, pairs, 1, dim, generator=g, dtype=torch.float64)
    a = torch.randn(trials, dim, dim, generator=g, dtype=torch.float64) / dim**0.5
    # Position pairs-1 holds the query (drawn like the keys) and sees all `pairs` context pairs.
    q = torch.randn(trials, pairs, 1, dim, generator=g, dtype=torch.float64)
    query = q[:, -1, 0]
    maps = {"linear": lambda x: x, "tanh(2Ax)": lambda x: torch.tanh(2 * x)}
    table = {}
    for name, f in maps.items():
        v = f(torch.einsum("bij,btj->bti", a, k[:, :, 0]))[:, :, None]
        target = f(torch.einsum("bij,bj->bi", a, query))
        lla = local_linear_attention(q, k, v, ridge_lambda=ridge, softmax_scale=scale, backend="torch")[:, -1, 0]
        softmax = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale)[:, 0, -1]
        # Global affine ridge on all pairs: [b, W] = argmin mean |v - b - W k|^2 + ridge |W|^2.
        z = torch.cat([torch.ones(trials, pairs, 1, dtype=torch.float64), k[:, :, 0]], -1)
        penalty = torch.diag(torch.tensor([0.0] + [ridge] * dim, dtype=torch.float64))
        theta = torch.linalg.solve(z.transpose(1, 2) @ z / pairs + penalty, z.transpose(1, 2) @ v[:, :, 0] / pairs)
        global_ridge = torch.einsum("bi,bid->bd", torch.cat([torch.ones(trials, 1, dtype=torch.float64), query], -1),
                                    theta)
        table[name] = {method: ((pred - target) ** 2).mean().item()
                       for method, pred in (("softmax", softmax), ("lla", lla), ("global_ridge", global_ridge))}
    return table


def print_quality(table: dict) -> None:
    print("in-context regression MSE at the query (d=4, 128 pairs, lambda=1e-3, tau=0.5, 200 trials, float64)")
    print(f"{'map':<10} {'softmax':>10} {'lla':>10} {'global_ridge':>13}")
    for name, row in table.items():
        print(f"{name:<10} {row['softmax']:>10.3g} {row['lla']:>10.3g} {row['global_ridge']:>13.3g}")


# ----------------------------------------------------------------------------- speed


def _time_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=50, return_mode="median")


def _methods(tokens: int):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def lla(backend):
        return lambda q, k, v: local_linear_attention(q, k, v, ridge_lambda=RIDGE, backend=backend)

    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return out.transpose(1, 2)

    methods = {"pyfastrl_triton": lla("triton"), "sdpa_flash": flash}
    if tokens <= TORCH_BACKEND_MAX_T:
        methods["pyfastrl_torch"] = lla("torch")
    return methods


def run_case(tokens: int, head_dim: int, device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, tokens, HEADS, head_dim, device=device, generator=g, dtype=torch.bfloat16)
               .requires_grad_() for _ in range(3))
    grad_out = torch.randn_like(q)
    case = {"T": tokens, "D": head_dim, "methods": {}}
    for name, fn in _methods(tokens).items():
        def measure():
            forward_ms = _time_ms(lambda: fn(q, k, v))
            fwd_bwd_ms = _time_ms(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out))
            return {"fwd_ms": forward_ms, "fwd_bwd_ms": fwd_bwd_ms,
                    "bwd_over_fwd": (fwd_bwd_ms - forward_ms) / forward_ms}

        case["methods"][name] = measure_or_record_failure(measure)
    _, stats = local_linear_attention(q.detach(), k.detach(), v.detach(), ridge_lambda=RIDGE, backend="triton",
                                      return_solver_stats=True)
    case["cg_iterations_mean"] = stats.iterations.float().mean().item()
    case["cg_iterations_max"] = int(stats.iterations.max())
    ours, flash = case["methods"]["pyfastrl_triton"], case["methods"]["sdpa_flash"]
    if "fwd_ms" in ours and "fwd_ms" in flash:
        case["lla_fwd_over_flash_fwd"] = ours["fwd_ms"] / flash["fwd_ms"]
    return case


def print_speed(cases: list[dict]) -> None:
    print(f"\n{'T':>6} {'D':>4} | {'method':<16}| {'fwd ms':>8} {'f+b ms':>8} {'bwd/fwd':>8}")
    for case in cases:
        for name, r in case["methods"].items():
            head = f"{case['T']:>6} {case['D']:>4} | {name:<16}|"
            if "error" in r:
                print(f"{head} {r['error']}")
            else:
                print(f"{head} {r['fwd_ms']:>8.2f} {r['fwd_bwd_ms']:>8.2f} {r['bwd_over_fwd']:>8.2f}")
        print(f"{'':>11} | CG iterations mean {case['cg_iterations_mean']:.1f} max {case['cg_iterations_max']}; "
              f"LLA fwd / flash fwd = {case.get('lla_fwd_over_flash_fwd', float('nan')):.1f}")


def main(argv=None) -> int:
    args = parse_args_or_skip(argv, __doc__, "lla.py", "T in {1024, 4096}, fewer head dims")
    quality = regression_quality()
    print_quality(quality)
    if args is None:
        return 0
    device = torch.device("cuda")
    grid = QUICK_GRID if args.quick else FULL_GRID
    cases = []
    for i, (tokens, head_dim) in enumerate(grid):
        print(f"[{i + 1}/{len(grid)}] T={tokens} D={head_dim} ...", flush=True)
        cases.append(run_case(tokens, head_dim, device))
    print_speed(cases)
    config = {"dtype": "bfloat16", "batch": 1, "heads": HEADS, "ridge_lambda": RIDGE, "tolerance": 1e-5}
    write_report(args.out, "lla", {**config, "regression_quality": quality}, cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
