"""``prefix_grouped_attention``: the public op, its input checks and its torch.library custom ops.

Two custom ops, ``pyfastrl::prefix_attention_fwd`` and ``pyfastrl::prefix_attention_bwd``, with
fake (meta) implementations and an autograd formula, so ``torch.compile(fullgraph=True)`` traces
the op as one node without graph breaks. Both backends sit behind them (see
``pyfastrl.kernels.prefix_attention``).
"""
from __future__ import annotations

import torch

from pyfastrl._backend import require_device, resolve_backend
from pyfastrl.kernels.prefix_attention import reference
from pyfastrl.ops._attention_checks import check_qkv, largest_element_offset, positive_finite, window_length
from pyfastrl.layout import PrefixGroupLayout
from pyfastrl.tree_layout import PrefixTreeLayout

_OP = "prefix_grouped_attention"
# The op's name for backend resolution with a PrefixTreeLayout: not one of the ops with a flash backend.
_TREE_OP = f"{_OP} (tree layout)"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triton_kernels():
    # Imported on first use: importing Triton is slow, and TRITON_INTERPRET must be set first.
    from pyfastrl.kernels.prefix_attention import kernel

    return kernel


def _tree_attention(q, k, v, layout, scale, cap, window, backend):
    from pyfastrl.ops._prefix_tree_attention import tree_attention

    return tree_attention(q, k, v, layout, scale, cap, window, backend)


def _flash():
    from pyfastrl.kernels.prefix_attention import flash

    return flash


@torch.library.custom_op("pyfastrl::prefix_attention_fwd", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_blocks: torch.Tensor,
    dq_blocks: torch.Tensor,
    dkdv_blocks: torch.Tensor,
    scale: float,
    softcap: float,
    window: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _triton_kernels().forward(q, k, v, query_blocks, scale, softcap, window)
    if backend == "flash":
        return _flash().forward(q, k, v, query_blocks, scale)
    return reference.forward(q, k, v, query_blocks, scale, softcap, window)


@_forward_op.register_fake
def _(q, k, v, query_blocks, dq_blocks, dkdv_blocks, scale, softcap, window, backend):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return out, q.new_empty((q.shape[1], q.shape[0]), dtype=reference.accumulation_dtype(q.dtype))


@torch.library.custom_op("pyfastrl::prefix_attention_bwd", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    query_blocks: torch.Tensor,
    dq_blocks: torch.Tensor,
    dkdv_blocks: torch.Tensor,
    scale: float,
    softcap: float,
    window: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    if backend == "triton":
        return _triton_kernels().backward(
            grad_out, q, k, v, out, lse, dq_blocks, dkdv_blocks, scale, softcap, window
        )
    if backend == "flash":
        return _flash().backward(grad_out, q, k, v, out, lse, query_blocks, scale)
    return reference.backward(grad_out, q, k, v, out, lse, query_blocks, scale, softcap, window)


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, query_blocks, dq_blocks, dkdv_blocks, scale, softcap, window, backend):
    return (
        torch.empty(q.shape, dtype=q.dtype, device=q.device),
        torch.empty(k.shape, dtype=k.dtype, device=k.device),
        torch.empty(v.shape, dtype=v.dtype, device=v.device),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, query_blocks, dq_blocks, dkdv_blocks, scale, softcap, window, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, query_blocks, dq_blocks, dkdv_blocks)
    ctx.options = (scale, softcap, window, backend)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, query_blocks, dq_blocks, dkdv_blocks = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out, q, k, v, out, lse, query_blocks, dq_blocks, dkdv_blocks, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q, k, v, layout, backend: str) -> None:
    check_qkv(_OP, q, k, v, "(T, Hq, D)", _DTYPES)
    if not isinstance(layout, (PrefixGroupLayout, PrefixTreeLayout)):
        raise TypeError(f"{_OP}: layout must be a pyfastrl.PrefixGroupLayout or pyfastrl.PrefixTreeLayout, "
                        f"got {type(layout).__name__}")
    num_tokens, num_heads, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(
            f"{_OP}: k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in T or D"
        )
    if num_heads % k.shape[1] != 0:
        raise ValueError(
            f"{_OP}: the number of query heads ({num_heads}) must be a multiple of the number of "
            f"key/value heads ({k.shape[1]})"
        )
    if num_tokens != layout.total_tokens:
        raise ValueError(f"{_OP}: q has T={num_tokens} tokens but layout.total_tokens is {layout.total_tokens}")
    if layout.device != q.device:
        raise ValueError(
            f"{_OP}: layout is on {layout.device} but q is on {q.device}; "
            f"build it with {type(layout).__name__}(..., device=q.device) or use layout.to(q.device)"
        )
    if backend == "triton":
        refusal = _triton_refusal(q)
        if refusal is not None:
            error, reason = refusal
            raise error(f"{_OP}: {reason}")
        largest = largest_element_offset(q, k, v)
        if largest >= 2**31:
            raise ValueError(
                f"{_OP}: backend 'triton' indexes with 32-bit offsets; q/k/v reach element offset {largest:,} "
                "(>= 2**31): split the batch into several layouts"
            )


def _triton_refusal(q: torch.Tensor) -> tuple[type, str] | None:
    """Why the Triton kernels refuse ``q``'s head dim or dtype (on its device), with the error type
    to raise, or None."""
    kernel = _triton_kernels()
    head_dim = q.shape[-1]
    if head_dim % 16 != 0 or head_dim > kernel.MAX_HEAD_DIM:
        return ValueError, (f"backend 'triton' needs a head dim that is a multiple of 16 and at most "
                            f"{kernel.MAX_HEAD_DIM}, got D={head_dim}; use backend='torch'")
    reason = kernel.unsupported_reason(q.dtype, head_dim, q.device)
    return None if reason is None else (TypeError, reason)


def _resolve_tree(requested: str, q: torch.Tensor) -> str:
    """The backend for a ``PrefixTreeLayout``: ``"torch"`` or ``"triton"``. ``"flash"`` and ``"cuda"``
    do not take trees; ``"auto"`` (and ``PYFASTRL_BACKEND``) resolve as for an op without a flash
    backend: Triton for CUDA tensors (``"torch"`` for inputs its kernels refuse), else PyTorch."""
    if requested in ("flash", "cuda"):
        raise ValueError(
            f"{_OP}: backend {requested!r} does not take a PrefixTreeLayout; tree layouts run on "
            "backend='triton' or backend='torch' (or 'auto')"
        )
    return _resolve(requested, q, op=_TREE_OP)


def _resolve(requested: str, q: torch.Tensor, softcap=None, sliding_window=None, op: str = _OP) -> str:
    """The backend that runs: ``resolve_backend``'s choice for ``op``, except that ``"auto"`` sends
    inputs the Triton kernels refuse (a head dim not a multiple of 16 or above their maximum, fp32 at
    head dims with no spill-free tile on this GPU) to ``"torch"``."""
    head_dim = q.shape[-1] if q.dim() else None
    backend = resolve_backend(op, requested, q.device, dtype=q.dtype, head_dim=head_dim, softcap=softcap,
                              sliding_window=sliding_window, check_device=False)
    if requested == "auto" and backend == "triton" and q.dim() == 3 and _triton_refusal(q) is not None:
        return "torch"
    return backend


def prefix_grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PrefixGroupLayout | PrefixTreeLayout,
    *,
    softmax_scale: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention over a packed shared-prefix batch, as if every prompt were repeated.

    Each prefix token attends causally within its prefix; each suffix token attends to its whole
    group prefix and causally within its own suffix. Forward values and gradients equal those of
    running every member's ``[prefix; suffix]`` as its own causal sequence (the repeated batch),
    with the prefix gradients summed over members. Soft-capping and the sliding window apply as
    they would to each repeated sequence.

    With a ``PrefixTreeLayout`` (prompts shared at several levels) each token attends to every
    token of its ancestor segments and causally within its own segment: values and gradients equal
    running every root-to-leaf path as its own causal sequence, the gradients of shared tokens
    summed over the paths through them. Tree layouts run on the torch and triton backends (``"auto"``
    picks Triton for CUDA tensors, as for a group layout with soft-capping or a window; the flash
    backend refuses trees).

    Args:
        q: ``(T, Hq, D)`` queries, T = ``layout.total_tokens``.
        k, v: ``(T, Hkv, D)``; ``Hq`` must be a multiple of ``Hkv`` (GQA/MQA: query head h reads
            kv head ``h // (Hq // Hkv)``). Same dtype (fp16, bf16, fp32; fp64 on the torch
            backend) and device as q. Any strides with a unit-stride head dim are read in place.
        layout: the batch's ``PrefixGroupLayout`` or ``PrefixTreeLayout``, on q's device.
        softmax_scale: score scale, any positive finite real scalar (Python or numpy); default
            ``D ** -0.5``.
        softcap: attention logit soft-capping (Gemma2's ``attn_logit_softcapping``): a positive
            finite real c; scores ``s = softmax_scale * q.k`` become ``c * tanh(s / c)`` before the
            softmax, with the exact gradient. Default None (off).
        sliding_window: an integer W >= 1 (transformers' ``sliding_window``): the query at path
            position i sees the key at path position j of its own path only if ``i - j < W``
            (W keys including itself). Path positions are ``layout.position_ids``: a prompt
            token's index in its prompt, ``P + index`` for a completion token. Keys outside every
            window of a query block are skipped, not masked. Default None (off).
        backend: ``"auto"`` (see ``pyfastrl._backend``: ``"flash"`` on CPU and, where its kernels
            take the inputs, on CUDA; else Triton on CUDA; ``"torch"`` with soft-capping or a
            sliding window on CPU, and for inputs the Triton kernels refuse; ``PYFASTRL_BACKEND``
            overrides; for a tree layout as with a window: Triton on CUDA, else ``"torch"``),
            ``"torch"``, ``"triton"`` or ``"flash"`` (group layouts only; FlashAttention-style
            kernels composed: CUDA fp16/bf16 with head dims multiple of 8 up to 256; CPU
            fp16/bf16/fp32/fp64; no soft-capping or sliding window).

    Returns:
        ``(T, Hq, D)`` in q's dtype. Differentiable in q, k and v.
    """
    # The backend name must be settled before the checks that depend on it.
    tree = isinstance(layout, PrefixTreeLayout)
    if isinstance(q, torch.Tensor):
        backend = _resolve_tree(backend, q) if tree else _resolve(backend, q, softcap, sliding_window)
    _check_inputs(q, k, v, layout, backend)
    require_device(_OP, backend, q.device)  # after the argument checks: those errors come first anywhere
    head_dim = q.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else positive_finite(_OP, "softmax_scale", softmax_scale)
    cap = 0.0 if softcap is None else positive_finite(_OP, "softcap", softcap)
    window = 0 if sliding_window is None else window_length(_OP, "sliding_window", sliding_window)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if tree:
        return _tree_attention(q, k, v, layout, scale, cap, window, backend)

    if backend == "triton":
        block_fwd, block_dq, block_dkdv = _triton_kernels().block_sizes(head_dim, q.device)
        query_blocks = layout.query_blocks(block_fwd)
        dq_blocks = layout.query_blocks(block_dq)
        dkdv_blocks = layout.key_blocks(block_dkdv)
    else:
        query_blocks = dq_blocks = dkdv_blocks = layout.query_blocks(None)
    out, _ = _forward_op(q, k, v, query_blocks, dq_blocks, dkdv_blocks, scale, cap, window, backend)
    return out
