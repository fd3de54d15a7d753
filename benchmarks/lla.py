"""Benchmark case ``lla``: local linear attention's regression quality and its speed against softmax.

    pyfastrl bench lla [--quick] [--cpu]     (or python benchmarks/lla.py)

1. In-context regression quality (any machine, float64, torch backend): context pairs (k_j, v_j)
   with v = A k (linear) or v = tanh(2 A k) (nonlinear), d = 4, 128 pairs, a query drawn like the
   keys, lambda = 1e-3, tau = 0.5, 200 trials. MSE of the prediction at the query for softmax
   attention, LLA, and a global affine ridge regression on all pairs (the uniform-weight limit).
2. Speed: B = 1, 16 heads, T in {1024, 4096, 16384}, D in {64, 128}, bf16, lambda = 1. Forward and
   forward+backward of
     pyfastrl          local_linear_attention, Triton backend (CG to tolerance 1e-5)
     pyfastrl_torch    the chunked torch backend (direct Cholesky solves; T <= 4096)
     sdpa_softmax      softmax attention, SDPA on its FlashAttention-2 backend (CPU: SDPA's CPU kernel)
   with the CG iterations the forward used (mean and max over query blocks), and the targets'
   ratios: LLA forward / softmax (flash) forward (target <= 10 at T=4096, D=64) and LLA backward / LLA
   forward (target <= 2.5).
   Useful work: softmax attention 4*D per attended (query, key) pair and head forward, 2.5x that
   backward. LLA: its CG algorithm's arithmetic, per pair and head 12*D + 4*D per CG iteration
   (scores twice, moment sums, one matrix-free matvec sweep per iteration, output), with the mean
   iteration count measured on the same inputs; backward counted as twice the forward (the adjoint
   solve plus the gradient sweeps); the torch backend's direct solves as in lla_direct_flops.
   Bytes: q, k, v read and o written (forward), then q, k, v, o, dO read and dq, dk, dv written.
   With --cpu: T in {64, 128}, D = 16, 2 heads, fp32; the torch backend against SDPA's CPU kernel.
3. Decode (GPU only; with --cpu skipped, the reason recorded in the report's config): one generation
   step for a batch of 8 sequences, 16 heads, bf16, lambda = 1, cache lengths L in {1024, 4096,
   16384, 32768} (quick: 1024, 32768: the ends of the range), D in {64, 128}: ms per step (one new token per sequence) of
     pyfastrl_decode       local_linear_attention_decode, Triton backend
     pyfastrl_decode_cuda  the same, the CUDA extension's kernel (csrc/lla_decode; where it is built)
     sdpa_decode           softmax attention of the new query over the cache, SDPA (flash)
   Useful work per cached key and head: softmax 4*D; LLA 12*D + 2*D^2 (scores twice in the stats
   pass and once in the output pass, kbar, the centred covariance, the effective weights and the
   output), plus D^3/3 + 2*D^2 per (sequence, head) for the Cholesky solve. Bytes: the K and V caches
   read once (the LLA kernels read K three times and V once: the fraction of the roofline says so).
"""
from __future__ import annotations

import sys

import torch

import harness
from pyfastrl import local_linear_attention, local_linear_attention_decode
from pyfastrl.kernels import cuda_extension

NAME = "lla"
PLOT = {"x": "T", "series": "D", "baseline": "sdpa_softmax", "ours": "pyfastrl"}
HEADS, RIDGE = 16, 1.0
FULL_GRID = [(t, d) for t in (1024, 4096, 16384) for d in (64, 128)]
QUICK_GRID = [(1024, 64), (4096, 64), (4096, 128)]
CPU_GRID = [(64, 16), (128, 16)]
CPU_HEADS = 2
TORCH_BACKEND_MAX_T = 4096
BACKWARD_FLOP_FACTOR = 2.5
DECODE_BATCH = 8
DECODE_LENGTHS = (1024, 4096, 16384, 32768)


def causal_pairs(tokens: int) -> int:
    return tokens * (tokens + 1) // 2


def softmax_flops(tokens: int, heads: int, head_dim: int, backward: bool) -> float:
    forward = 4.0 * head_dim * heads * causal_pairs(tokens)
    return forward * (1.0 + BACKWARD_FLOP_FACTOR) if backward else forward


def lla_flops(tokens: int, heads: int, head_dim: int, cg_iterations: float, backward: bool) -> float:
    forward = (12.0 + 4.0 * cg_iterations) * head_dim * heads * causal_pairs(tokens)
    return 3.0 * forward if backward else forward


def lla_direct_flops(tokens: int, heads: int, head_dim: int, backward: bool) -> float:
    """The torch backend's direct solves: per pair and head, scores and output 6*D plus the
    weighted covariance 2*D^2; per query and head, a Cholesky factorisation D^3/3 and two triangular
    solves 2*D^2. Backward counted as twice the forward."""
    d = head_dim
    forward = heads * (causal_pairs(tokens) * (6.0 * d + 2.0 * d * d) + tokens * (d**3 / 3 + 2.0 * d * d))
    return 3.0 * forward if backward else forward


def attention_bytes(tokens: int, heads: int, head_dim: int, element_size: int, backward: bool) -> float:
    tensor = tokens * heads * head_dim * element_size
    return 4 * tensor + (8 * tensor if backward else 0)  # q, k, v, o; then q, k, v, o, dO, dq, dk, dv


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


def build_methods(tokens: int, *, cuda: bool) -> tuple[dict, dict]:
    """``({name: fn(q, k, v) -> out}, {name: reason})`` on ``(B, T, H, D)`` inputs."""
    def lla(backend):
        return lambda q, k, v: local_linear_attention(q, k, v, ridge_lambda=RIDGE, backend=backend)

    def softmax(q, k, v):
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        if not cuda:
            return torch.nn.functional.scaled_dot_product_attention(*args, is_causal=True).transpose(1, 2)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(*args, is_causal=True).transpose(1, 2)

    methods, skipped = {"pyfastrl": lla("triton" if cuda else "torch"), "sdpa_softmax": softmax}, {}
    if not cuda:
        skipped["pyfastrl_torch"] = "on the CPU, pyfastrl is the torch backend already"
    elif tokens <= TORCH_BACKEND_MAX_T:
        methods["pyfastrl_torch"] = lla("torch")
    else:
        skipped["pyfastrl_torch"] = f"T > {TORCH_BACKEND_MAX_T}: the per-query Cholesky solves take minutes"
    return methods, skipped


def lla_decode_flops(batch: int, cache_length: int, heads: int, head_dim: int) -> float:
    d = head_dim
    return batch * heads * (cache_length * (12.0 * d + 2.0 * d * d) + d**3 / 3 + 2.0 * d * d)


def decode_cases(runner: harness.Runner) -> list:
    """Section 3 of the module docstring: one decoding step, LLA against softmax (SDPA flash)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    grid = [(n, d) for n in ((1024, 32768) if runner.quick else DECODE_LENGTHS) for d in (64, 128)]
    cases = []
    for index, (length, head_dim) in enumerate(grid):
        harness.progress(index, len(grid), f"decode L={length} D={head_dim}")

        def make(seed):
            g = torch.Generator(device=runner.device).manual_seed(seed)
            q = torch.randn(DECODE_BATCH, HEADS, head_dim, device=runner.device, generator=g).to(torch.bfloat16)
            k, v = (torch.randn(DECODE_BATCH, length, HEADS, head_dim, device=runner.device, generator=g)
                    .to(torch.bfloat16) for _ in range(2))
            lengths = torch.full((DECODE_BATCH,), length, dtype=torch.int32, device=runner.device)
            return q, k, v, lengths

        def lla(q, k, v, lengths, backend="triton"):
            return local_linear_attention_decode(q, k, v, lengths, ridge_lambda=RIDGE, backend=backend)

        def softmax(q, k, v, lengths):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(
                    q[:, :, None], k.transpose(1, 2), v.transpose(1, 2))[:, :, 0]

        sets = runner.input_sets(make)
        nbytes = 2 * DECODE_BATCH * length * HEADS * head_dim * 2
        softmax_work = 4.0 * head_dim * HEADS * DECODE_BATCH * length
        lla_work = lla_decode_flops(DECODE_BATCH, length, HEADS, head_dim)
        case = {"params": {"decode_L": length, "D": head_dim}, "work": {"input_sets": len(sets)}, "methods": {
            "pyfastrl_decode": {"fwd": runner.measure(lla, sets, flops=lla_work, nbytes=nbytes)},
            "sdpa_decode": {"fwd": runner.measure(softmax, sets, flops=softmax_work, nbytes=nbytes)}}, "skipped": {}}
        reason = cuda_extension.device_unavailable_reason(runner.device)
        if reason is None:
            case["methods"]["pyfastrl_decode_cuda"] = {"fwd": runner.measure(
                lambda *inputs: lla(*inputs, backend="cuda"), sets, flops=lla_work, nbytes=nbytes)}
        else:
            case["skipped"]["pyfastrl_decode_cuda"] = reason
        ours, base = (case["methods"][m]["fwd"].get("ms") for m in ("pyfastrl_decode", "sdpa_decode"))
        if ours and base:
            case["lla_decode_over_softmax_decode"] = ours / base
            print(f"  decode L={length} D={head_dim}: LLA {ours:.3f} ms, softmax {base:.3f} ms per step "
                  f"({ours / base:.1f}x)", flush=True)
        cases.append(case)
    return cases


def run(runner: harness.Runner):
    quality = regression_quality()
    print_quality(quality)
    heads = CPU_HEADS if runner.cpu else HEADS
    dtype = torch.float32 if runner.cpu else torch.bfloat16
    grid = CPU_GRID if runner.cpu else (QUICK_GRID if runner.quick else FULL_GRID)
    cases = []
    for index, (tokens, head_dim) in enumerate(grid):
        harness.progress(index, len(grid), f"T={tokens} D={head_dim}")

        def make(seed):
            g = torch.Generator(device=runner.device).manual_seed(seed)
            q, k, v, grad = (torch.randn(1, tokens, heads, head_dim, device=runner.device, generator=g).to(dtype)
                             for _ in range(4))
            return (q.requires_grad_(), k.requires_grad_(), v.requires_grad_()), grad

        sets = runner.input_sets(make)
        case = {"params": {"T": tokens, "D": head_dim}, "work": {"input_sets": len(sets)}, "methods": {}}
        if not runner.cpu:
            (q, k, v), _ = sets[0]
            _, stats = local_linear_attention(q.detach(), k.detach(), v.detach(), ridge_lambda=RIDGE,
                                              backend="triton", return_solver_stats=True)
            case["work"]["cg_iterations_mean"] = stats.iterations.float().mean().item()
            case["work"]["cg_iterations_max"] = int(stats.iterations.max())
        methods, case["skipped"] = build_methods(tokens, cuda=not runner.cpu)
        element = torch.finfo(dtype).bits // 8
        for name, fn in methods.items():
            def flops(backward):
                if name == "sdpa_softmax":
                    return softmax_flops(tokens, heads, head_dim, backward)
                if "cg_iterations_mean" in case["work"] and name == "pyfastrl":  # the Triton CG solver
                    return lla_flops(tokens, heads, head_dim, case["work"]["cg_iterations_mean"], backward)
                return lla_direct_flops(tokens, heads, head_dim, backward)

            result = {}
            for mode, backward in (("fwd", False), ("fwd_bwd", True)):
                step = ((lambda inputs, grad: torch.autograd.grad(fn(*inputs), inputs, grad)) if backward
                        else (lambda inputs, grad: fn(*inputs)))
                result[mode] = runner.measure(step, sets, flops=flops(backward),
                                              nbytes=attention_bytes(tokens, heads, head_dim, element, backward))
            if "ms" in result["fwd"] and "ms" in result["fwd_bwd"]:
                result["fwd_bwd"]["bwd_over_fwd"] = (result["fwd_bwd"]["ms"] - result["fwd"]["ms"]) / result["fwd"]["ms"]
            case["methods"][name] = result
        ours, softmax = case["methods"]["pyfastrl"], case["methods"]["sdpa_softmax"]
        if "ms" in ours["fwd"] and "ms" in softmax["fwd"]:
            case["lla_fwd_over_softmax_fwd"] = ours["fwd"]["ms"] / softmax["fwd"]["ms"]
        solver = (f"CG iterations mean {case['work']['cg_iterations_mean']:.1f} max {case['work']['cg_iterations_max']}; "
                  if "cg_iterations_mean" in case["work"] else "")
        print(f"  {solver}LLA fwd / softmax fwd = {case.get('lla_fwd_over_softmax_fwd', float('nan')):.1f}; "
              f"LLA bwd / fwd = {ours['fwd_bwd'].get('bwd_over_fwd', float('nan')):.2f}", flush=True)
        cases.append(case)
    config = {"dtype": str(dtype).removeprefix("torch."), "batch": 1, "heads": heads, "ridge_lambda": RIDGE,
              "tolerance": 1e-5, "regression_quality": quality, "decode_batch": DECODE_BATCH}
    if runner.cpu:
        config["decode_skipped"] = "the decode case times the Triton decode kernel against SDPA flash: GPU only"
        print(f"decode: skipped ({config['decode_skipped']})")
    else:
        cases += decode_cases(runner)
    return config, cases


if __name__ == "__main__":
    sys.exit(harness.main([NAME, *sys.argv[1:]]))
