"""``local_linear_attention_decode``: one generation step of local linear attention over a KV cache.

One torch.library custom op, ``pyfastrl::lla_decode``, with a fake (meta) implementation, so
``torch.compile(fullgraph=True)`` traces it as one node. Forward only: decoding needs no gradient
(train with ``local_linear_attention``), and the op has no autograd formula. Backends
(``pyfastrl.kernels.local_linear_attention``): ``"torch"`` (``reference.decode``: float64, exact),
``"triton"`` (``decode.py``: stats pass, a float64 Cholesky solve per (sequence, head), output pass)
and ``"cuda"`` (``cuda.py``, the CUDA extension's ``csrc/lla_decode``: the same passes and solve in
one block per (sequence, head); chosen only when asked for, as it has not yet run on a GPU).
"""
from __future__ import annotations

import torch

from pyfastrl._backend import require_device, resolve_backend
from pyfastrl.kernels.local_linear_attention import reference
from pyfastrl.ops._attention_checks import positive_finite

_OP = "local_linear_attention_decode"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _kernels(backend: str):
    """The module of a kernel backend (``"triton"`` or ``"cuda"``): ``decode``, ``SUPPORTED_DTYPES``,
    ``MAX_HEAD_DIM``. Imported on first use: importing Triton is slow, and TRITON_INTERPRET must be
    set first."""
    if backend == "cuda":
        from pyfastrl.kernels.local_linear_attention import cuda

        return cuda
    from pyfastrl.kernels.local_linear_attention import decode

    return decode


@torch.library.custom_op("pyfastrl::lla_decode", mutates_args=())
def _decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
               ridge: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    if backend in ("triton", "cuda"):
        return _kernels(backend).decode(q, k_cache, v_cache, cache_seqlens, ridge, scale)
    return reference.decode(q, k_cache, v_cache, cache_seqlens, ridge, scale)


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, ridge, scale, backend):
    return q.new_empty(q.shape)


def _check(q, k_cache, v_cache, cache_seqlens, backend: str, validate: bool) -> None:
    for name, t, rank, shape in (("q", q, 3, "(B, Hq, D)"), ("k_cache", k_cache, 4, "(B, T_max, Hkv, D)"),
                                 ("v_cache", v_cache, 4, "(B, T_max, Hkv, D)")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{_OP}: {name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{_OP}: {name} has dtype {t.dtype}; supported: {_DTYPES}")
        if t.dtype != q.dtype:
            raise TypeError(f"{_OP}: q has dtype {q.dtype} but {name} has {t.dtype}; pass one dtype")
        if t.device != q.device:
            raise ValueError(f"{_OP}: q is on {q.device} but {name} is on {t.device}")
    batch, num_heads, head_dim = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{_OP}: k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    if (k_cache.shape[0], k_cache.shape[3]) != (batch, head_dim):
        raise ValueError(f"{_OP}: cache shape {tuple(k_cache.shape)} does not match q shape {tuple(q.shape)} in B or D")
    if k_cache.shape[1] == 0 or k_cache.shape[2] == 0 or num_heads % k_cache.shape[2] != 0:
        raise ValueError(f"{_OP}: the caches need T_max >= 1 and Hkv >= 1 dividing the {num_heads} query heads, "
                         f"got shape {tuple(k_cache.shape)}")
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"{_OP}: cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
    if cache_seqlens.shape != (batch,) or cache_seqlens.dtype != torch.int32:
        raise ValueError(f"{_OP}: cache_seqlens must be an int32 tensor of shape (B,) = ({batch},), got "
                         f"{cache_seqlens.dtype} of shape {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"{_OP}: q is on {q.device} but cache_seqlens is on {cache_seqlens.device}")
    if backend in ("triton", "cuda"):
        kernel = _kernels(backend)
        if q.dtype not in kernel.SUPPORTED_DTYPES:
            raise TypeError(f"{_OP}: backend {backend!r} supports {kernel.SUPPORTED_DTYPES}, got {q.dtype}; "
                            "use backend='torch'")
        if head_dim > kernel.MAX_HEAD_DIM:
            raise ValueError(f"{_OP}: backend {backend!r} supports head dims up to {kernel.MAX_HEAD_DIM}, got "
                             f"D={head_dim}; use backend='torch'")
    if validate and not torch.compiler.is_compiling():
        # One host synchronisation for every value check; cache entries past a length are not read.
        past = torch.arange(k_cache.shape[1], device=q.device)[None, :] >= cache_seqlens[:, None]
        lengths_ok, *finite = torch.stack([
            ((cache_seqlens >= 1) & (cache_seqlens <= k_cache.shape[1])).all(), torch.isfinite(q).all(),
            *((torch.isfinite(t).flatten(2).all(-1) | past).all() for t in (k_cache, v_cache))]).tolist()
        if not lengths_ok:
            raise ValueError(f"{_OP}: cache_seqlens must lie in 1..T_max = 1..{k_cache.shape[1]}, got "
                             f"{cache_seqlens.tolist()}")
        for name, ok in zip(("q", "k_cache", "v_cache"), finite):
            if not ok:
                raise ValueError(f"{_OP}: {name} contains NaN or infinite values (within cache_seqlens)")


def _ridge(ridge_lambda, num_heads: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if not isinstance(ridge_lambda, torch.Tensor):
        return torch.full((num_heads,), positive_finite(_OP, "ridge_lambda", ridge_lambda), dtype=dtype, device=device)
    if ridge_lambda.shape != (num_heads,) and ridge_lambda.dim() != 0:
        raise ValueError(f"{_OP}: ridge_lambda must be a float or a tensor of shape (Hq,) = ({num_heads},), got "
                         f"shape {tuple(ridge_lambda.shape)}")
    if not ridge_lambda.is_floating_point() or ridge_lambda.device != device:
        raise TypeError(f"{_OP}: ridge_lambda must be a floating tensor on {device}, got {ridge_lambda.dtype} on "
                        f"{ridge_lambda.device}")
    return ridge_lambda.detach().to(dtype).expand(num_heads).contiguous()


def local_linear_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    ridge_lambda: float | torch.Tensor,
    softmax_scale: float | None = None,
    backend: str = "auto",
    validate: bool = False,
) -> torch.Tensor:
    """One decoding step of causal local linear attention: for each sequence, the output of its
    newest token, equal to the last row of ``local_linear_attention`` over the sequence's first
    ``cache_seqlens[b]`` cached tokens. Forward only (no gradient: decoding does not train).

    Args:
        q: ``(B, Hq, D)``, one new query per sequence, whose own key and value are already
            written to the caches (at position ``cache_seqlens[b] - 1``).
        k_cache, v_cache: ``(B, T_max, Hkv, D)``; ``Hq`` a multiple of ``Hkv`` (GQA). Same dtype
            (fp16, bf16, fp32; fp64 on the torch backend) and device as q; any strides with a
            unit-stride head dim. Positions at or past a sequence's length are never read into the
            result (they may hold anything).
        cache_seqlens: ``(B,)`` int32, each sequence's length, in ``1..T_max`` (ragged batches).
        ridge_lambda: the ridge lambda > 0: a float or an ``(Hq,)`` tensor (as in the training op).
        softmax_scale: score scale; default ``D ** -0.5``.
        backend: ``"auto"`` (Triton on CUDA for fp16/bf16/fp32 with D <= 128, PyTorch otherwise;
            ``PYFASTRL_BACKEND`` overrides), ``"torch"`` (float64 arithmetic, exact; any D),
            ``"triton"`` (D <= 128) or ``"cuda"`` (the optional CUDA extension's kernel, fp16/bf16/fp32,
            D <= 128; ``"auto"`` never chooses it, it has not yet run on a GPU: only an explicit
            ``"cuda"`` or ``PYFASTRL_BACKEND=cuda`` does).
        validate: check values at the cost of one host synchronisation: lengths in 1..T_max and
            q and the caches (within the lengths) free of NaN/inf (ValueError). Without it, shapes, dtypes and devices
            are still checked (no synchronisation), and a length outside 1..T_max gives NaN or a
            result over the first T_max tokens.

    Returns:
        ``(B, Hq, D)`` in q's dtype.
    """
    automatic = backend == "auto"
    if isinstance(q, torch.Tensor):
        backend = resolve_backend(_OP, backend, q.device, check_device=False)
        if automatic and backend in ("triton", "cuda") and (q.dtype == torch.float64 or q.shape[-1] > 128):
            backend = "torch"
    _check(q, k_cache, v_cache, cache_seqlens, backend, validate)
    require_device(_OP, backend, q.device)  # after the argument checks: those errors come first anywhere
    batch, num_heads, head_dim = q.shape
    scale = head_dim**-0.5 if softmax_scale is None else positive_finite(_OP, "softmax_scale", softmax_scale)
    ridge = _ridge(ridge_lambda, num_heads, reference.accumulation_dtype(q.dtype), q.device)
    if q.numel() == 0:
        return q.new_empty(q.shape)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (k_cache, v_cache))
    return _decode_op(q, k_cache, v_cache, cache_seqlens, ridge, float(scale), backend)
