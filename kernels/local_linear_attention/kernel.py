"""Triton kernels of local linear attention (the ``"triton"`` backend); formulas in ``reference.py``.

Nothing of size T x T, and no D x D matrix per query, is ever stored. Every solve with
``B_i = C_i + lambda I`` is a Jacobi-preconditioned conjugate gradient whose matrix-vector product is
a sweep over the causal key tiles: ``B d = sum_j p_j (x_j.d) x_j - (xbar.d) xbar + lambda d`` with
``x_j = k_j - c`` the keys centred at their mean c (``key_centres``; why in ``triton_kernels.py``). A
query block iterates until every row's residual is below ``tolerance * |rhs|`` (or the cap), so easy
blocks stop early.

Three launches:

* ``_forward_kernel`` (query block x (batch, query head)): a statistics pass (online max, then
  sum p, sum p k, sum p k^2: the lse, kbar and the Jacobi diagonal), the CG solve for ``eta``, and an
  output pass ``o = sum_j p_j a_j v_j``. Saves ``eta``, ``lse`` and each row's final relative residual.
* ``_backward_query_kernel`` (same grid): a statistics pass from the saved lse (kbar, rbar,
  ``sum p r k``), the adjoint CG solve for ``xi``, then a dQ pass. Saves ``xi``, three per-row
  scalars for the key kernel and each row's ``-xi.eta`` (summed into dlambda on the host).
* ``_backward_key_kernel`` (key block x (batch, kv head)): dK and dV over the query tiles at or after
  the block, for every query head sharing the kv head (GQA) in the same program: no atomics.

The programs themselves (precision scheme, register use) are in ``triton_kernels.py``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from pyfastrl.kernels.attention_common import INTERPRETED, LOG2E
from pyfastrl.kernels.launch_target import tile_target
from pyfastrl.kernels.local_linear_attention import triton_kernels as tk

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128)
# Per-row scalars the query kernel hands to the key kernel, in this order.
ROW_STATS = ("a0", "b0", "cbar")


class Tiles(NamedTuple):
    """One launch's tiles: rows of the program's own block (queries; keys for the key kernel), rows
    of the tiles its loops sweep (keys; queries for the key kernel), warps and pipeline stages."""

    block: int
    sweep: int
    num_warps: int
    num_stages: int


KERNELS = ("_forward_kernel", "_backward_query_kernel", "_backward_key_kernel")
_INTERPRETER = Tiles(16, 16, 4, 1)
# (target, kernel, head dim <= 64 or 128[, dtype]) -> Tiles (a dtype entry overrides), chosen from
# compiles for sm_80 and sm_90a (registers, spill bytes, shared memory, HMMA/HGMMA counts): 16-bit
# dots on tensor cores, wgmma on sm_90a where the block has 64 rows; at D = 128 64-row blocks spill,
# and so does the fp16 key kernel's at D = 64 with GQA (REP > 1: 16-72 B). Checked for REP 1 and 4.
_GPU_TILES = {
    ("sm80", "_forward_kernel", 64): Tiles(64, 32, 8, 2),
    ("sm80", "_forward_kernel", 128): Tiles(32, 32, 8, 2),
    ("sm80", "_backward_query_kernel", 64): Tiles(32, 32, 8, 2),
    ("sm80", "_backward_query_kernel", 128): Tiles(32, 16, 8, 1),
    ("sm80", "_backward_query_kernel", 128, torch.float16): Tiles(16, 16, 4, 2),
    ("sm80", "_backward_key_kernel", 64): Tiles(32, 32, 8, 1),
    ("sm80", "_backward_key_kernel", 128): Tiles(16, 16, 8, 2),
    ("sm90", "_forward_kernel", 64): Tiles(64, 32, 8, 2),
    ("sm90", "_forward_kernel", 128): Tiles(32, 32, 8, 2),
    ("sm90", "_backward_query_kernel", 64): Tiles(64, 16, 8, 2),
    ("sm90", "_backward_query_kernel", 64, torch.float16): Tiles(64, 32, 8, 1),
    ("sm90", "_backward_query_kernel", 128): Tiles(32, 16, 8, 2),
    ("sm90", "_backward_key_kernel", 64): Tiles(64, 16, 4, 2),
    ("sm90", "_backward_key_kernel", 64, torch.float16): Tiles(32, 32, 8, 1),
    ("sm90", "_backward_key_kernel", 128): Tiles(16, 16, 8, 2),
}


def tiles(kernel: str, head_dim: int, dtype: torch.dtype, target: str) -> Tiles:
    """The tiles ``kernel`` launches with for ``head_dim`` and input ``dtype`` on ``target``
    (``launch_target.tile_target``: "interpreter", "sm80" or "sm90")."""
    if target == "interpreter":
        return _INTERPRETER
    key = (target, kernel, 64 if head_dim <= 64 else 128)
    return _GPU_TILES.get((*key, dtype), _GPU_TILES[key])


def compile_config(kernel: str, dtype: torch.dtype, head_dim: int, target: str):
    """``(constexprs, options)`` of a launch of ``kernel``, as ``triton.compile`` takes them: what the
    launchers below pass, for compile checks without a GPU."""
    t = tiles(kernel, head_dim, dtype, target)
    const = dict(HEAD_DIM=head_dim, BLOCK_M=t.sweep if kernel == "_backward_key_kernel" else t.block,
                 BLOCK_N=t.block if kernel == "_backward_key_kernel" else t.sweep,
                 INTERPRETED=False)
    return const, dict(num_warps=t.num_warps, num_stages=t.num_stages)


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()[:3]]


def _launch(kernel: str, q: torch.Tensor, k: torch.Tensor):
    const, options = compile_config(kernel, q.dtype, q.shape[3], tile_target(q.device))
    const["INTERPRETED"] = INTERPRETED
    return dict(REP=q.shape[2] // k.shape[2], **const, **options)


def _solver_scratch(q: torch.Tensor) -> torch.Tensor:
    """Four planes like eta (kbar, the Jacobi diagonal, CG's residual and direction) where a solve
    keeps its rows between key sweeps."""
    return torch.empty((4, *q.shape), dtype=torch.float32, device=q.device)


def key_centres(k: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, D)`` fp32: each (sequence, kv head)'s mean key, the point the kernels centre keys at.

    One per sequence and kv head, not per tile: the key-side backward combines every query row with
    every key tile, and a row's saved offsets (a0, b0) hold for one centre only. The mean rather than
    the first key: a first token's key is often an outlier (attention sinks), and the mean is within
    the keys' spread of every key. Any centre gives the same result in exact arithmetic, so the
    forward and the backward need not share it (each computes its own: one small reduction)."""
    return k.mean(dim=1, dtype=torch.float32)


def query_blocks(num_tokens: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> int:
    """Query blocks per (batch, head) of the forward and query-side backward launches."""
    return triton.cdiv(num_tokens, tiles("_forward_kernel", head_dim, dtype, tile_target(device)).block)


def forward(q, k, v, ridge, scale: float, tolerance: float, max_iterations: int):
    """Launch the forward. ``q (B, T, Hq, D)`` and ``k, v (B, T, Hkv, D)`` with unit stride in D,
    ``ridge (Hq,)`` fp32. Returns ``out`` (q's dtype), ``eta (B, T, Hq, D)`` fp32, ``lse (B, Hq, T)``
    fp32, each row's final relative residual ``(B, Hq, T)`` and each query block's CG iterations
    ``(B, Hq, blocks)`` int32."""
    batch, num_tokens, num_heads, head_dim = q.shape
    launch = _launch("_forward_kernel", q, k)
    blocks = triton.cdiv(num_tokens, launch["BLOCK_M"])
    # out and eta are contiguous and share their strides (one row layout in the kernels).
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    eta = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, num_heads, num_tokens), dtype=torch.float32, device=q.device)
    residual = torch.empty_like(lse)
    iterations = torch.empty((batch, num_heads, blocks), dtype=torch.int32, device=q.device)
    tk._forward_kernel[(blocks, batch * num_heads)](
        q, k, v, key_centres(k), ridge, out, eta, lse, residual, iterations, _solver_scratch(q),
        *_strides(q, k, v, out),
        num_tokens, num_heads, scale * LOG2E.value, tolerance**2, max_iterations, q.numel(), **launch,
    )
    return out, eta, lse, residual, iterations


def backward(grad_out, q, k, v, ridge, eta, lse, scale: float, tolerance: float, max_iterations: int):
    """Launch the backward. ``grad_out`` is contiguous (B, T, Hq, D); ``eta`` and ``lse`` are the
    forward's. Returns ``dq, dk, dv`` (inputs' dtypes), ``dridge (Hq,)`` fp32, and the adjoint
    solve's residuals and iterations (as ``forward``)."""
    batch, num_tokens, num_heads, head_dim = q.shape
    launch = _launch("_backward_query_kernel", q, k)
    blocks = triton.cdiv(num_tokens, launch["BLOCK_M"])
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    xi = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    rows = torch.empty((len(ROW_STATS), batch, num_heads, num_tokens), dtype=torch.float32, device=q.device)
    dridge_rows = torch.empty_like(lse)
    residual = torch.empty_like(lse)
    iterations = torch.empty((batch, num_heads, blocks), dtype=torch.int32, device=q.device)
    strides = _strides(q, k, v, grad_out)
    centres = key_centres(k)
    tk._backward_query_kernel[(blocks, batch * num_heads)](
        q, k, v, centres, ridge, grad_out, eta, lse, dq, xi, rows, dridge_rows, residual, iterations,
        _solver_scratch(q), *strides,
        num_tokens, num_heads, scale, scale * LOG2E.value, tolerance**2, max_iterations, q.numel(),
        **launch,
    )
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    launch = _launch("_backward_key_kernel", q, k)
    tk._backward_key_kernel[(triton.cdiv(num_tokens, launch["BLOCK_N"]), batch * k.shape[2])](
        q, k, v, centres, grad_out, eta, xi, lse, rows, dk, dv, *strides, *dk.stride()[:3],
        num_tokens, k.shape[2], scale, scale * LOG2E.value, **launch,
    )
    return dq, dk, dv, dridge_rows.sum((0, 2)), residual, iterations
