"""``local_linear_attention``: the public op, its input checks and its torch.library custom ops.

Two custom ops, ``pyfastrl::lla_forward`` and ``pyfastrl::lla_backward``, with fake (meta)
implementations and an autograd formula, so ``torch.compile(fullgraph=True)`` traces the op as one
node. Both backends sit behind them (``pyfastrl.kernels.local_linear_attention``): ``"torch"`` solves
each query's ridge system directly (Cholesky), ``"triton"`` iterates (CG) to ``tolerance``.
"""
from __future__ import annotations

import atexit
import os
import warnings
from numbers import Real
from typing import NamedTuple

import torch

from pyfastrl._backend import BACKEND_ENV, require_device, resolve_backend
from pyfastrl.kernels.launch_target import tile_target
from pyfastrl.kernels.local_linear_attention import reference
from pyfastrl.kernels.local_linear_attention.reference import accumulation_dtype
from pyfastrl.ops._attention_checks import check_qkv, largest_element_offset, positive_finite

_OP = "local_linear_attention"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_TOLERANCE = 1e-5


def _triton_kernels():
    # Imported on first use: importing Triton is slow, and TRITON_INTERPRET must be set first.
    from pyfastrl.kernels.local_linear_attention import kernel

    return kernel


class SolverStats(NamedTuple):
    """How the ridge solves of one call went (returned with ``return_solver_stats=True``).

    iterations: ``(B, Hq, query blocks)`` int32, the CG iterations each query block of the Triton
        forward ran (its slowest row); zero blocks for the torch backend, which solves directly.
    residual: ``(B, Hq, T)`` float32, each query's final relative residual ``|B eta - rhs| / |rhs|``
        (Triton); zeros for the direct torch solve.
    """

    iterations: torch.Tensor
    residual: torch.Tensor


def _residual_summary(residual: torch.Tensor, tolerance: float) -> torch.Tensor:
    """``(2 + Hq,)``: the worst relative residual, the count of queries above ``tolerance`` (NaN
    counts) and each query head's worst residual (NaN where a row is NaN), from a ``(B, Hq, T)``
    tensor; one small tensor, so one copy to the host."""
    count = (~(residual <= tolerance)).sum().to(residual.dtype)
    return torch.cat([residual.amax().reshape(1), count.reshape(1), residual.amax(dim=(0, 2))])


def _unconverged_message(summary: list[float], total: int, tolerance: float, max_iterations: int,
                         head_dim: int, which: str) -> tuple[str, bool] | None:
    """``(message, failed)`` for a solve whose residual summary (``_residual_summary``) is above the
    tolerance, else None. ``failed``: a residual that is NaN, or not below 1 (an iterate no better
    than zero) after at least D iterations (exact-arithmetic CG would have converged): fp32 CG
    diverges once the conditioning ``(lambda_max(C) + lambda) / lambda`` nears 1/eps, where more
    iterations cannot help but float64 or a larger lambda can."""
    worst, count, *head_worst = summary
    if worst <= tolerance:
        return None
    heads = [h for h, r in enumerate(head_worst) if not r <= tolerance]
    if not (worst < 1.0 or (worst == worst and max_iterations < head_dim)):
        return (
            f"{_OP}: the {which} ridge solve failed for query head(s) {heads}: relative residual up to "
            f"{worst:.2e} (>= 1, or NaN) after max_iterations={max_iterations} in {int(count)} of {total} "
            "queries: the system is too ill-conditioned for fp32 CG; use backend='torch' (it solves in "
            "float64) or a larger ridge_lambda"
        ), True
    return (
        f"{_OP}: the {which} ridge solve reached max_iterations={max_iterations} with relative residual "
        f"up to {worst:.2e} > tolerance {tolerance:.1e} in {int(count)} of {total} queries (query head(s) "
        f"{heads}); raise max_iterations or ridge_lambda (CG needs more iterations as lambda shrinks), "
        "or use backend='torch' (a direct float64 solve)"
    ), False


def _warn_unconverged_now(residual: torch.Tensor, tolerance: float, max_iterations: int, head_dim: int,
                          which: str) -> None:
    """validate=True: check the residuals at once (one host synchronisation); a failed solve raises."""
    if residual.numel() == 0:
        return
    report = _unconverged_message(_residual_summary(residual, tolerance).tolist(), residual.numel(), tolerance,
                                  max_iterations, head_dim, which)
    if report is not None:
        message, failed = report
        if failed:
            raise RuntimeError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class _DeferredConvergenceCheck:
    """The default (validate=False) report of unconverged solves, without a host synchronisation:
    each Triton solve's worst residual and count of unconverged queries are copied to host memory
    without blocking (pinned, after a CUDA event), and a later call of the op, or the interpreter's
    exit, reads the copies whose event has completed and warns about any above the tolerance (a
    failed solve too: an exception from an unrelated later call could not be handled where it
    belongs). Not armed during CUDA graph capture."""

    def __init__(self):
        self._pending = []

    def submit(self, residual: torch.Tensor, tolerance: float, max_iterations: int, head_dim: int,
               which: str) -> None:
        if residual.numel() == 0:
            return
        summary = _residual_summary(residual, tolerance)
        event = None
        if summary.is_cuda:
            if torch.cuda.is_current_stream_capturing():
                return
            host = torch.empty(summary.shape, dtype=summary.dtype, pin_memory=True)
            host.copy_(summary, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            summary = host
        self._pending.append((summary, event, (residual.numel(), tolerance, max_iterations, head_dim, which)))

    def report(self, wait: bool = False) -> None:
        """Warn about every finished (or, with ``wait``, every) pending solve above its tolerance."""
        still_pending = []
        for summary, event, options in self._pending:
            if event is not None and not wait and not event.query():
                still_pending.append((summary, event, options))
                continue
            if event is not None:
                event.synchronize()
            report = _unconverged_message(summary.tolist(), *options)
            if report is not None:
                warnings.warn(report[0], RuntimeWarning, stacklevel=3)
        self._pending = still_pending


_deferred = _DeferredConvergenceCheck()
atexit.register(_deferred.report, wait=True)


def _check_convergence(residual, tolerance: float, max_iterations: int, head_dim: int, which: str,
                       validate: bool) -> None:
    if validate:
        _warn_unconverged_now(residual, tolerance, max_iterations, head_dim, which)
    else:
        _deferred.submit(residual, tolerance, max_iterations, head_dim, which)


def _iteration_blocks(backend: str, q: torch.Tensor) -> int:
    if backend != "triton":
        return 0
    _, num_tokens, _, head_dim = q.shape
    return _triton_kernels().query_blocks(num_tokens, head_dim, q.dtype, q.device)


@torch.library.custom_op("pyfastrl::lla_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ridge: torch.Tensor,
    scale: float, tolerance: float, max_iterations: int, backend: str, validate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        out, eta, lse, residual, iterations = _triton_kernels().forward(
            q, k, v, ridge, scale, tolerance, max_iterations)
        _check_convergence(residual, tolerance, max_iterations, q.shape[3], "forward", validate)
        return out, eta, lse, residual, iterations
    out, eta, lse = reference.forward(q, k, v, ridge, scale)
    batch, _, num_heads, _ = q.shape
    residual = torch.zeros(lse.shape, dtype=torch.float32, device=q.device)
    return out, eta, lse, residual, torch.zeros((batch, num_heads, 0), dtype=torch.int32, device=q.device)


@_forward_op.register_fake
def _(q, k, v, ridge, scale, tolerance, max_iterations, backend, validate):
    batch, num_tokens, num_heads, head_dim = q.shape
    acc = accumulation_dtype(q.dtype)
    blocks = _iteration_blocks(backend, q)
    return (
        q.new_empty(q.shape),
        q.new_empty(q.shape, dtype=acc),
        q.new_empty((batch, num_heads, num_tokens), dtype=acc),
        q.new_empty((batch, num_heads, num_tokens), dtype=torch.float32),
        q.new_empty((batch, num_heads, blocks), dtype=torch.int32),
    )


@torch.library.custom_op("pyfastrl::lla_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ridge: torch.Tensor,
    eta: torch.Tensor, lse: torch.Tensor, scale: float, tolerance: float, max_iterations: int, backend: str,
    validate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_out = grad_out.contiguous()
    if backend == "triton":
        dq, dk, dv, dridge, residual, _ = _triton_kernels().backward(
            grad_out, q, k, v, ridge, eta, lse, scale, tolerance, max_iterations)
        _check_convergence(residual, tolerance, max_iterations, q.shape[3], "backward (adjoint)", validate)
        return dq, dk, dv, dridge
    return reference.backward(grad_out, q, k, v, ridge, lse, scale)


@_backward_op.register_fake
def _(grad_out, q, k, v, ridge, eta, lse, scale, tolerance, max_iterations, backend, validate):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ridge.new_empty(ridge.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, ridge, scale, tolerance, max_iterations, backend, validate = inputs
    _, eta, lse, residual, iterations = output
    ctx.mark_non_differentiable(eta, lse, residual, iterations)
    ctx.save_for_backward(q, k, v, ridge, eta, lse)
    ctx.options = (scale, tolerance, max_iterations, backend, validate)


def _backward(ctx, grad_out, *_unused):
    q, k, v, ridge, eta, lse = ctx.saved_tensors
    dq, dk, dv, dridge = _backward_op(grad_out, q, k, v, ridge, eta, lse, *ctx.options)
    return dq, dk, dv, dridge, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- checks


def _validating(validate: bool) -> bool:
    # Value checks synchronise with the GPU and break torch.compile graphs: skipped while compiling.
    return validate and not torch.compiler.is_compiling()


def _check_tensors(q, k, v, backend: str, validate: bool) -> None:
    check_qkv(_OP, q, k, v, "(B, T, Hq, D)", _DTYPES)
    batch, num_tokens, num_heads, head_dim = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, num_tokens, head_dim):
        raise ValueError(f"{_OP}: k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in B, T or D")
    if num_heads % k.shape[2] != 0:
        raise ValueError(
            f"{_OP}: the number of query heads ({num_heads}) must be a multiple of the number of "
            f"key/value heads ({k.shape[2]})"
        )
    if backend == "triton":
        kernel = _triton_kernels()
        if q.dtype not in kernel.SUPPORTED_DTYPES:
            raise TypeError(
                f"{_OP}: backend 'triton' supports {kernel.SUPPORTED_DTYPES}, got {q.dtype}; use backend='torch'"
            )
        if head_dim not in kernel.HEAD_DIMS:
            raise ValueError(
                f"{_OP}: backend 'triton' supports head dims {kernel.HEAD_DIMS}, got D={head_dim}; "
                "use backend='torch'"
            )
        # After the head dim: casting to bf16 is no way out of an unsupported head dim.
        if q.dtype == torch.float32 and tile_target(q.device) != "interpreter":
            raise TypeError(
                f"{_OP}: backend 'triton' on a GPU takes fp16/bf16 inputs (its fp32 3xTF32 products spill "
                "registers); use backend='torch' for fp32, or cast q/k/v to bf16"
            )
        largest = largest_element_offset(q, k, v)
        if largest >= 2**31:
            raise ValueError(
                f"{_OP}: backend 'triton' indexes with 32-bit offsets; q/k/v reach element offset {largest:,}: "
                "split the batch"
            )
    if _validating(validate):
        # One host synchronisation for the three tensors, not one each.
        finite = torch.stack([torch.isfinite(t).all() for t in (q, k, v)]).tolist()
        for name, ok in zip("qkv", finite):
            if not ok:
                raise ValueError(f"{_OP}: {name} contains NaN or infinite values")


def _ridge_tensor(ridge_lambda, num_heads: int, dtype: torch.dtype, device: torch.device,
                  validate: bool) -> torch.Tensor:
    """``ridge_lambda`` (a positive float, or a positive ``(Hq,)`` tensor) as an ``(Hq,)`` tensor."""
    if isinstance(ridge_lambda, torch.Tensor):
        if ridge_lambda.shape != (num_heads,) and ridge_lambda.dim() != 0:
            raise ValueError(
                f"{_OP}: ridge_lambda must be a float or a tensor of shape (Hq,) = ({num_heads},), "
                f"got shape {tuple(ridge_lambda.shape)}"
            )
        if not ridge_lambda.is_floating_point():
            raise TypeError(f"{_OP}: ridge_lambda must be a floating tensor, got {ridge_lambda.dtype}")
        if ridge_lambda.device != device:
            raise ValueError(f"{_OP}: ridge_lambda is on {ridge_lambda.device} but q is on {device}")
        if _validating(validate) and not bool(((ridge_lambda > 0) & torch.isfinite(ridge_lambda)).all()):
            raise ValueError(f"{_OP}: ridge_lambda must be positive and finite, got {ridge_lambda.tolist()}")
        return ridge_lambda.to(dtype).expand(num_heads).contiguous()
    return torch.full((num_heads,), positive_finite(_OP, "ridge_lambda", ridge_lambda), dtype=dtype, device=device)


def local_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    ridge_lambda: float | torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    max_iterations: int | None = None,
    backend: str = "auto",
    return_solver_stats: bool = False,
    validate: bool = False,
):
    """Causal local linear attention (LLA): per query, the intercept of a softmax-weighted local
    linear ridge regression of values on keys centred at the query.

    ``o_i = sum_j p_ij (1 + eta_i.(k_j - kbar_i)) v_j`` with ``p_ij`` the causal softmax weights of
    ``softmax_scale * q_i.k_j``, ``kbar_i = sum_j p_ij k_j`` and ``eta_i`` the solution of
    ``(C_i + lambda I) eta_i = q_i - kbar_i`` (``C_i`` the p-weighted key covariance). lambda -> inf
    gives softmax attention; ``o_0 = v_0``.

    Args:
        q: ``(B, T, Hq, D)`` queries (the flash-attn dense layout).
        k, v: ``(B, T, Hkv, D)``; ``Hq`` a multiple of ``Hkv`` (GQA: query head h reads kv head
            ``h // (Hq // Hkv)``). Same dtype (fp16, bf16, fp32; fp64 on the torch backend) and
            device as q; any strides with a unit-stride head dim.
        ridge_lambda: the ridge lambda > 0: a float, or an ``(Hq,)`` tensor (one per query head),
            which gets a gradient. Smaller lambda fits the local slope more closely and needs more
            solver iterations; ``pyfastrl.nn.LocalLinearAttention`` learns it per head.
        softmax_scale: score scale tau; default ``D ** -0.5``.
        causal: must be True (LLA is defined here for causal attention only).
        tolerance: the Triton solver stops once every query's relative residual
            ``|B eta - rhs| / |rhs|`` is at most this (default 1e-5: the outputs are then accurate to
            about 1e-5 relative, well below bf16's resolution and near fp32 CG's floor). The torch
            backend solves directly and ignores it.
        max_iterations: the Triton solver's cap per query block (default ``4 * D``). CG needs at
            most D iterations in exact arithmetic, but fp32 rounding costs more the worse the
            conditioning ``(lambda_max(C) + lambda) / lambda``: measured in fp32 on Gaussian keys
            at D=64 (worst query of T=256), about 15 iterations at lambda=1, 50 at 0.1, 110-300 at
            0.01. Reaching the cap with a residual above ``tolerance`` emits a RuntimeWarning
            stating the residual and the query heads (forward, or the backward's adjoint solve); the
            result is then the last iterate. A solve still at a relative residual >= 1 after at
            least D iterations, or NaN, has failed (fp32 CG diverges once the conditioning nears
            1/eps): the message says so and names backend='torch' (float64) or a larger lambda.
            Without ``validate`` the warning comes without a host synchronisation: the residual
            summary is copied to host memory asynchronously and the warning is issued by a later
            call of this op (or at interpreter exit) once the copy has landed.
        backend: ``"auto"`` (Triton on CUDA for fp16/bf16, PyTorch otherwise — fp32 on CUDA too;
            ``PYFASTRL_BACKEND`` overrides),
            ``"torch"`` or ``"triton"``.
        return_solver_stats: also return a ``SolverStats`` (iterations per query block, residuals).
        validate: check values, at the cost of host synchronisations (default False: the op then
            never waits for the GPU, and CUDA graphs can capture it): q, k, v free of NaN/inf and a
            tensor ``ridge_lambda`` positive and finite (ValueError otherwise), and the solves'
            residuals checked at once (the RuntimeWarning above, forward and backward, in the call
            itself; a failed solve is a RuntimeError). Skipped while torch.compile traces. Shapes,
            dtypes, devices, head dims and float arguments are always checked (no synchronisation
            needed).

    Returns:
        ``(B, T, Hq, D)`` in q's dtype (and the ``SolverStats`` when asked). Differentiable in q,
        k, v and a tensor ``ridge_lambda``, with the exact gradient (including the ridge's
        dependence on q and k through the weights).
    """
    if isinstance(q, torch.Tensor):
        automatic = backend == "auto" and os.environ.get(BACKEND_ENV, "auto") == "auto"
        backend = resolve_backend(_OP, backend, q.device, check_device=False)
        if automatic and backend == "triton" and q.dtype == torch.float32 and q.device.type == "cuda":
            backend = "torch"  # the compiled kernels take 16-bit inputs (see _check_tensors)
    _deferred.report()
    _check_tensors(q, k, v, backend, validate)
    require_device(_OP, backend, q.device)  # after the argument checks: those errors come first anywhere
    if causal is not True:
        raise ValueError(f"{_OP}: only causal=True is supported (non-causal LLA is not implemented), got {causal!r}")
    batch, num_tokens, num_heads, head_dim = q.shape
    softmax_scale = head_dim**-0.5 if softmax_scale is None else positive_finite(_OP, "softmax_scale", softmax_scale)
    if not (isinstance(tolerance, Real) and 0 < tolerance < 1):
        raise ValueError(f"{_OP}: tolerance must be a number in (0, 1), got {tolerance!r}")
    if max_iterations is None:
        max_iterations = 4 * head_dim
    elif not (isinstance(max_iterations, int) and not isinstance(max_iterations, bool) and max_iterations >= 1):
        raise ValueError(f"{_OP}: max_iterations must be an integer >= 1, got {max_iterations!r}")
    ridge = _ridge_tensor(ridge_lambda, num_heads, accumulation_dtype(q.dtype), q.device, validate)
    if q.numel() == 0:
        backend = "torch"  # nothing to launch
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, _, _, residual, iterations = _forward_op(
        q, k, v, ridge, float(softmax_scale), float(tolerance), max_iterations, backend, bool(validate))
    if return_solver_stats:
        return out, SolverStats(iterations, residual)
    return out
