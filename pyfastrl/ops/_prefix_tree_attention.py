"""Prefix-tree attention (``prefix_grouped_attention`` with a ``PrefixTreeLayout``) as torch.library
custom ops, ``pyfastrl::prefix_tree_attention_fwd`` / ``_bwd``, with fake implementations and an
autograd formula, so ``torch.compile(fullgraph=True)`` traces it as one node. Both tree backends sit
behind them: ``"torch"`` (``pyfastrl.kernels.prefix_attention.tree``, reading the layout's
``segment_table`` and ``ancestor_index``) and ``"triton"`` (the prefix-attention kernels over the
tree's block tables, ``kernel.tree_tables``; empty for the torch backend).
"""
from __future__ import annotations

import torch

from pyfastrl.kernels.prefix_attention import reference, tree


def _triton_kernels():
    # Imported on first use: importing Triton is slow, and TRITON_INTERPRET must be set first.
    from pyfastrl.kernels.prefix_attention import kernel

    return kernel


@torch.library.custom_op("pyfastrl::prefix_tree_attention_fwd", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_table: torch.Tensor,
    ancestor_index: torch.Tensor,
    tables: list[torch.Tensor],
    scale: float,
    softcap: float,
    window: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _triton_kernels().forward(q, k, v, tables[0], scale, softcap, window, key_tiles=tables[1])
    return tree.forward(q, k, v, segment_table, ancestor_index, scale, softcap, window)


@_forward_op.register_fake
def _(q, k, v, segment_table, ancestor_index, tables, scale, softcap, window, backend):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return out, q.new_empty((q.shape[1], q.shape[0]), dtype=reference.accumulation_dtype(q.dtype))


@torch.library.custom_op("pyfastrl::prefix_tree_attention_bwd", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    segment_table: torch.Tensor,
    ancestor_index: torch.Tensor,
    tables: list[torch.Tensor],
    scale: float,
    softcap: float,
    window: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    if backend == "triton":
        return _triton_kernels().tree_backward(grad_out, q, k, v, out, lse, tables, scale, softcap, window)
    return tree.backward(grad_out, q, k, v, out, lse, segment_table, ancestor_index, scale, softcap, window)


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, segment_table, ancestor_index, tables, scale, softcap, window, backend):
    return (
        torch.empty(q.shape, dtype=q.dtype, device=q.device),
        torch.empty(k.shape, dtype=k.dtype, device=k.device),
        torch.empty(v.shape, dtype=v.dtype, device=v.device),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, segment_table, ancestor_index, tables, scale, softcap, window, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, segment_table, ancestor_index, *tables)
    ctx.options = (scale, softcap, window, backend)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, segment_table, ancestor_index, *tables = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out, q, k, v, out, lse, segment_table, ancestor_index, tables, *ctx.options)
    # The returned structure mirrors the inputs': one None per table of the list.
    return dq, dk, dv, None, None, [None] * len(tables), None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def tree_attention(q, k, v, layout, scale: float, softcap: float, window: int, backend: str) -> torch.Tensor:
    """``(T, Hq, D)`` attention output over ``layout`` (a ``PrefixTreeLayout`` on q's device) with
    ``backend`` ``"torch"`` or ``"triton"``, inputs already checked by ``prefix_grouped_attention``;
    ``softcap``/``window`` 0 mean off."""
    tables = _triton_kernels().tree_tables(layout, q, k, softcap, window) if backend == "triton" else []
    out, _ = _forward_op(q, k, v, layout.segment_table, layout.ancestor_index, tables, scale, softcap, window,
                         backend)
    return out
