"""Prefix-tree attention (``prefix_grouped_attention`` with a ``PrefixTreeLayout``) as torch.library
custom ops, ``pyfastrl::prefix_tree_attention_fwd`` / ``_bwd``, with fake implementations and an
autograd formula, so ``torch.compile(fullgraph=True)`` traces it as one node. Only the torch backend
(``pyfastrl.kernels.prefix_attention.tree``) runs tree layouts for now.
"""
from __future__ import annotations

import torch

from pyfastrl.kernels.prefix_attention import reference, tree


@torch.library.custom_op("pyfastrl::prefix_tree_attention_fwd", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_table: torch.Tensor,
    ancestor_index: torch.Tensor,
    scale: float,
    softcap: float,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return tree.forward(q, k, v, segment_table, ancestor_index, scale, softcap, window)


@_forward_op.register_fake
def _(q, k, v, segment_table, ancestor_index, scale, softcap, window):
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
    scale: float,
    softcap: float,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tree.backward(grad_out, q, k, v, out, lse, segment_table, ancestor_index, scale, softcap, window)


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, segment_table, ancestor_index, scale, softcap, window):
    return (
        torch.empty(q.shape, dtype=q.dtype, device=q.device),
        torch.empty(k.shape, dtype=k.dtype, device=k.device),
        torch.empty(v.shape, dtype=v.dtype, device=v.device),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, segment_table, ancestor_index, scale, softcap, window = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, segment_table, ancestor_index)
    ctx.options = (scale, softcap, window)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, segment_table, ancestor_index = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out.contiguous(), q, k, v, out, lse, segment_table, ancestor_index,
                              *ctx.options)
    return dq, dk, dv, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def tree_attention(q, k, v, layout, scale: float, softcap: float, window: int) -> torch.Tensor:
    """``(T, Hq, D)`` attention output over ``layout`` (a ``PrefixTreeLayout`` on q's device), inputs
    already checked by ``prefix_grouped_attention``; ``softcap``/``window`` 0 mean off."""
    out, _ = _forward_op(q, k, v, layout.segment_table, layout.ancestor_index, scale, softcap, window)
    return out
