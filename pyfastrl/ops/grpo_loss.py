"""GRPO advantages and loss: the public ops, their input checks and their torch.library custom ops.

``grpo_advantages``, ``grpo_loss``, ``fused_linear_grpo_loss`` and ``selective_logprobs``. Both
backends (``pyfastrl.kernels.grpo_loss.reference`` for ``"torch"``, ``.kernel`` for ``"triton"``)
sit behind three custom ops:

* ``pyfastrl::grpo_loss`` (+ ``pyfastrl::grpo_loss_backward``): token-level loss over log-probs.
* ``pyfastrl::fused_linear_grpo_loss``: LM head + loss. Token chunks: the chunk's logits are one
  matmul, the backend turns them into log-probs, entropies and (in place) the logit gradient, and
  two matmuls give the chunk's dh and its share of dW. Only one chunk of logits is ever alive. The
  gradients are computed in the forward (the loss is a scalar: backward only scales them). With
  sequence-level ratios a token's gradient needs its whole row first, so the chunks run twice.
* ``pyfastrl::selective_logprobs``: the chunked log-probs and entropies alone, without gradient.

Every padded ``(B, T)`` input is flattened to tokens with row boundaries ``cu_seqlens``; the fused
op drops masked tokens before the matmuls (they contribute nothing), so padding costs no FLOPs.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from pyfastrl._backend import resolve_backend
from pyfastrl.kernels.grpo_loss import reference
from pyfastrl.kernels.grpo_loss.reference import (
    ADVANTAGE_SCALES,
    IMPORTANCE_SAMPLING_LEVELS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    PARTIALS,
    LossOptions,
)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)
# Bytes of logits one chunk may hold. The torch backend also makes fp32 copies, so it takes less.
_CHUNK_LOGIT_BYTES = {"triton": 1 << 30, "torch": 1 << 28}


def _triton_kernels():
    # Imported on first use: importing Triton is slow, and TRITON_INTERPRET must be set first.
    from pyfastrl.kernels.grpo_loss import kernel

    return kernel


def _implementation(backend: str):
    return _triton_kernels() if backend == "triton" else reference


# ----------------------------------------------------------------------------- checks


def _tensor(op: str, name: str, t, dims: tuple[int, ...], dtypes, device=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{op}: {name} must be {want}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: {dtypes}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")
    return t


def _same_shape(op: str, name: str, t, like: torch.Tensor, like_name: str, dtypes=_FLOAT_DTYPES):
    if t is None:
        return None
    _tensor(op, name, t, (like.dim(),), dtypes, like.device)
    if t.shape != like.shape:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but {like_name} has {tuple(like.shape)}")
    return t


def _mask(op: str, mask, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """The mask as bool (nonzero = the token counts), shape-checked against ``like``."""
    _same_shape(op, "mask", mask, like, like_name, dtypes=None)
    if mask.is_complex():
        raise TypeError(f"{op}: mask must be bool, integer or floating, got {mask.dtype}")
    return mask if mask.dtype == torch.bool else mask != 0


def _positive_number(op: str, name: str, value, *, above: float = 0.0, integer: bool = False):
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and value > above
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{op}: {name} must be {kind} > {above:g}, got {value!r}")
    return value


def _data_checks_enabled() -> bool:
    # Checks that read tensor values synchronise with the GPU and break torch.compile graphs; they
    # are skipped while compiling (the traced graph is the same op either way).
    return not torch.compiler.is_compiling()


def _cu_seqlens(op: str, cu_seqlens, num_tokens: int, device) -> torch.Tensor:
    _tensor(op, "cu_seqlens", cu_seqlens, (1,), _INDEX_DTYPES, device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must hold B+1 >= 2 offsets, got {cu_seqlens.numel()}")
    if _data_checks_enabled():
        first, last = cu_seqlens[0].item(), cu_seqlens[-1].item()
        if first != 0 or last != num_tokens:
            raise ValueError(
                f"{op}: cu_seqlens must start at 0 and end at the number of tokens ({num_tokens}), "
                f"got {first} ... {last}"
            )
        steps = cu_seqlens[1:] - cu_seqlens[:-1]
        if (steps < 0).any():
            bad = int((steps < 0).nonzero()[0])
            raise ValueError(
                f"{op}: cu_seqlens must be non-decreasing, but cu_seqlens[{bad + 1}] < cu_seqlens[{bad}]"
            )
    return cu_seqlens.to(torch.int32)


def _options(op, *, loss_type, importance_sampling_level, eps_low, eps_high, delta, beta, kl_estimator,
             ref_logprobs) -> LossOptions:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"{op}: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"{op}: importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
            f"got {importance_sampling_level!r}"
        )
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"{op}: kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if not (isinstance(eps_low, Real) and 0.0 <= eps_low < 1.0):
        raise ValueError(f"{op}: eps_low must be in [0, 1), got {eps_low!r}")
    if not (isinstance(eps_high, Real) and math.isfinite(eps_high) and eps_high >= 0.0):
        raise ValueError(f"{op}: eps_high must be a finite number >= 0, got {eps_high!r}")
    if loss_type == "cispo" and eps_high <= 0.0:
        raise ValueError(f"{op}: loss_type 'cispo' caps the ratio at eps_high, which must be > 0, got {eps_high!r}")
    if delta is not None:
        _positive_number(op, "delta", delta, above=1.0)
    if not (isinstance(beta, Real) and math.isfinite(beta) and beta >= 0.0):
        raise ValueError(f"{op}: beta must be a finite number >= 0, got {beta!r}")
    if beta > 0.0 and ref_logprobs is None:
        raise ValueError(f"{op}: beta={beta} > 0 adds a KL term to the reference policy: pass ref_logprobs")
    return LossOptions(
        loss_type, importance_sampling_level == "sequence", float(eps_low), float(eps_high),
        None if delta is None else float(delta), float(beta), kl_estimator,
    )


def _advantages(op, advantages, rewards, group_size, num_rows: int, device) -> torch.Tensor:
    if (advantages is None) == (rewards is None):
        raise ValueError(f"{op}: pass exactly one of advantages (B,) or rewards (B,) with group_size")
    if advantages is not None:
        if group_size is not None:
            raise ValueError(f"{op}: group_size goes with rewards; advantages are already normalised")
        _tensor(op, "advantages", advantages, (1,), _FLOAT_DTYPES, device)
        if advantages.numel() != num_rows:
            raise ValueError(f"{op}: advantages has {advantages.numel()} entries but there are {num_rows} rows")
        return advantages
    _tensor(op, "rewards", rewards, (1,), None, device)
    if rewards.numel() != num_rows:
        raise ValueError(f"{op}: rewards has {rewards.numel()} entries but there are {num_rows} rows")
    if group_size is None:
        raise ValueError(f"{op}: rewards need group_size (completions per prompt) to be normalised")
    return grpo_advantages(rewards, group_size=group_size)


def _row_counts(valid: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Valid tokens per row (int64), from the flat bool mask and the row offsets."""
    running = torch.cat([valid.new_zeros(1, dtype=torch.int64), valid.to(torch.int64).cumsum(0)])
    return running[cu_seqlens[1:].long()] - running[cu_seqlens[:-1].long()]


def _row_weights(op, counts: torch.Tensor, opts: LossOptions, dtype, max_completion_length, num_items_in_batch):
    """Weight of each row's summed token losses in the aggregate loss (the spec's table)."""
    counts = counts.to(dtype)
    num_rows = counts.numel()
    if opts.loss_type == "grpo":
        return 1.0 / (num_rows * counts.clamp(min=1))
    if opts.loss_type == "bnpo":
        normaliser = counts.sum().clamp(min=1)
    elif opts.loss_type == "dr_grpo":
        normaliser = torch.full((), float(num_rows * max_completion_length), dtype=dtype, device=counts.device)
    elif num_items_in_batch is None:
        normaliser = counts.sum().clamp(min=1)
    elif isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"{op}: num_items_in_batch must be a number or a 1-element tensor")
        normaliser = num_items_in_batch.reshape(()).to(device=counts.device, dtype=dtype)
    else:
        normaliser = torch.tensor(float(_positive_number(op, "num_items_in_batch", num_items_in_batch)),
                                  dtype=dtype, device=counts.device)
    return (1.0 / normaliser).expand(num_rows).contiguous()


def _aggregate(partials: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """The loss: each row's summed token losses times its aggregation weight, summed."""
    return (row_weights.to(partials.dtype) * partials[:, 0]).sum()


def _metrics(partials: torch.Tensor, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
    p = partials.detach()
    column = {name: p[:, i] for i, name in enumerate(PARTIALS)}
    tokens = column["tokens"].sum()
    denom = tokens.clamp(min=1)
    low = column["clip_low"].sum() / denom
    high = column["clip_high"].sum() / denom
    zero = tokens * 0
    adv = advantages.detach().to(p.dtype)
    return {
        "clip_ratio_low": low,
        "clip_ratio_high": high,
        "clip_ratio": low + high,
        "kl": column["kl"].sum() / denom,
        "ratio_mean": column["ratio_sum"].sum() / denom,
        "ratio_min": torch.where(tokens > 0, column["ratio_min"].min(), zero),
        "ratio_max": torch.where(tokens > 0, column["ratio_max"].max(), zero),
        "advantage_mean": adv.mean(),
        "advantage_std": adv.std() if adv.numel() > 1 else zero,
    }


def _check_triton_dtype(op: str, backend: str, name: str, dtype: torch.dtype) -> None:
    if backend == "triton" and dtype not in _triton_kernels().SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: backend 'triton' supports {_triton_kernels().SUPPORTED_DTYPES} for {name}, got {dtype}; "
            "use backend='torch'"
        )


_LOSS_ARGUMENTS = ("advantages", "rewards", "group_size", "old_logprobs", "ref_logprobs", "loss_type",
                   "importance_sampling_level", "eps_low", "eps_high", "delta", "beta", "kl_estimator",
                   "max_completion_length", "num_items_in_batch")


def _loss_arguments(arguments: dict) -> dict:
    """The loss options among a public function's arguments (both public losses take all of them)."""
    return {name: arguments[name] for name in _LOSS_ARGUMENTS}


class _LossSetup:
    """Checks and derived inputs shared by ``grpo_loss`` and ``fused_linear_grpo_loss``.

    ``tokens`` is the per-token tensor the others must match (padded ``(B, T)`` or packed ``(N,)``
    with ``cu_seqlens``); ``valid`` its flat bool mask. Provides ``cu_seqlens`` (int32 row
    offsets), ``opts``, ``advantages (B,)``, per-row valid ``counts``, the aggregation
    ``row_weights`` and the flat detached ``old`` / ``ref`` (None when absent or unused)."""

    def __init__(self, op, tokens, tokens_name, valid, cu_seqlens, dtype, *, advantages, rewards, group_size,
                 old_logprobs, ref_logprobs, max_completion_length, num_items_in_batch, **loss_options):
        device = tokens.device
        if tokens.dim() == 2:
            if cu_seqlens is not None:
                raise ValueError(f"{op}: cu_seqlens goes with the packed form, not padded (B, T) {tokens_name}")
            num_rows, length = tokens.shape
            self.cu_seqlens = torch.arange(num_rows + 1, device=device, dtype=torch.int32) * length
        else:
            if cu_seqlens is None:
                raise ValueError(f"{op}: packed {tokens_name} (N,) need cu_seqlens (B+1,) row offsets")
            self.cu_seqlens = _cu_seqlens(op, cu_seqlens, tokens.shape[0], device)
            num_rows, length = self.cu_seqlens.numel() - 1, None
        old_logprobs = _same_shape(op, "old_logprobs", old_logprobs, tokens, tokens_name)
        ref_logprobs = _same_shape(op, "ref_logprobs", ref_logprobs, tokens, tokens_name)
        self.opts = _options(op, ref_logprobs=ref_logprobs, **loss_options)
        if max_completion_length is not None:
            length = _positive_number(op, "max_completion_length", max_completion_length, integer=True)
        elif length is None:  # packed: the longest row
            length = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())
        self.advantages = _advantages(op, advantages, rewards, group_size, num_rows, device).contiguous()
        self.counts = _row_counts(valid, self.cu_seqlens)
        self.row_weights = _row_weights(op, self.counts, self.opts, dtype, length, num_items_in_batch)
        self.old = None if old_logprobs is None else old_logprobs.detach().reshape(-1).contiguous()
        self.ref = None if self.opts.beta == 0.0 else ref_logprobs.detach().reshape(-1).contiguous()


# ----------------------------------------------------------------------------- advantages


def grpo_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    scale: str = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Group-normalised advantages (GRPO), TRL conventions.

    Args:
        rewards: ``(B,)`` one scalar reward per completion (any real dtype; finite).
        group_size: completions per prompt, the groups being consecutive runs of ``group_size``
            rewards (TRL's layout). Exactly one of ``group_size`` / ``group_ids``.
        group_ids: ``(B,)`` integer group label of each completion (ragged groups, any order).
        scale: ``"group"``: ``(r - mean_g) / (std_g + eps)``; ``"batch"``: mean per group, std over
            the whole batch; ``"none"`` (Dr. GRPO): ``r - mean_g``. Standard deviations are
            unbiased (Bessel).
        eps: added to the standard deviation (TRL: 1e-4; verl: 1e-6).

    Returns:
        ``(B,)`` advantages in the rewards' dtype (float32 for integer rewards). Computed in
        float64 with a shifted two-pass mean, so a group of identical rewards gets exactly 0; a
        group of one completion gets 0.

    Raises:
        ValueError naming the first non-finite reward, a group size that does not divide B, or an
        unknown ``scale``.
    """
    op = "grpo_advantages"
    _tensor(op, "rewards", rewards, (1,), None)
    if rewards.is_complex() or rewards.dtype == torch.bool:
        raise TypeError(f"{op}: rewards must be real numbers, got {rewards.dtype}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"{op}: scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if not (isinstance(eps, Real) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    num = rewards.numel()
    if (group_size is None) == (group_ids is None):
        raise ValueError(f"{op}: pass exactly one of group_size or group_ids")
    if group_size is not None:
        _positive_number(op, "group_size", group_size, integer=True)
        if num % int(group_size) != 0:
            raise ValueError(
                f"{op}: {num} rewards do not split into groups of group_size={group_size} "
                f"({num % int(group_size)} left over)"
            )
        group_index = torch.arange(num, device=rewards.device) // int(group_size)
        num_groups = num // int(group_size)
    else:
        _tensor(op, "group_ids", group_ids, (1,), None, rewards.device)
        if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.numel() != num:
            raise ValueError(f"{op}: group_ids must be an integer tensor with one label per reward ({num})")
        labels, group_index = torch.unique(group_ids, return_inverse=True)
        num_groups = labels.numel()
    if _data_checks_enabled() and rewards.is_floating_point():
        bad = ~torch.isfinite(rewards)
        if bad.any():
            index = int(bad.nonzero()[0])
            raise ValueError(f"{op}: rewards[{index}] is {rewards[index].item()}; rewards must be finite")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return reference.group_advantages(rewards, group_index, num_groups, scale, float(eps)).to(out_dtype)


# ----------------------------------------------------------------------------- grpo_loss op


@torch.library.custom_op("pyfastrl::grpo_loss", mutates_args=())
def _loss_op(
    logp: torch.Tensor,
    old: torch.Tensor,
    ref: torch.Tensor | None,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    advantages: torch.Tensor,
    row_weight: torch.Tensor,
    loss_type: str,
    sequence_level: bool,
    eps_low: float,
    eps_high: float,
    delta: float | None,
    beta: float,
    kl_estimator: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    opts = LossOptions(loss_type, sequence_level, eps_low, eps_high, delta, beta, kl_estimator)
    partials = _implementation(backend).loss_forward(logp, old, ref, mask, cu_seqlens, advantages, opts)
    return _aggregate(partials, row_weight), partials


@_loss_op.register_fake
def _(logp, old, ref, mask, cu_seqlens, advantages, row_weight, *args):
    dtype = reference.compute_dtype(logp.dtype)
    return logp.new_empty((), dtype=dtype), logp.new_empty((cu_seqlens.shape[0] - 1, len(PARTIALS)), dtype=dtype)


@torch.library.custom_op("pyfastrl::grpo_loss_backward", mutates_args=())
def _loss_backward_op(
    row_grad: torch.Tensor,
    logp: torch.Tensor,
    old: torch.Tensor,
    ref: torch.Tensor | None,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    advantages: torch.Tensor,
    loss_type: str,
    sequence_level: bool,
    eps_low: float,
    eps_high: float,
    delta: float | None,
    beta: float,
    kl_estimator: str,
    backend: str,
) -> torch.Tensor:
    opts = LossOptions(loss_type, sequence_level, eps_low, eps_high, delta, beta, kl_estimator)
    return _implementation(backend).loss_backward(row_grad, logp, old, ref, mask, cu_seqlens, advantages, opts)


@_loss_backward_op.register_fake
def _(row_grad, logp, *args):
    return torch.empty_like(logp)


def _loss_setup_context(ctx, inputs, output):
    logp, old, ref, mask, cu_seqlens, advantages, row_weight, *options = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logp, old, ref, mask, cu_seqlens, advantages, row_weight)
    ctx.options = options


def _loss_backward(ctx, grad_loss, grad_partials):
    logp, old, ref, mask, cu_seqlens, advantages, row_weight = ctx.saved_tensors
    row_grad = (row_weight * grad_loss.to(row_weight.dtype)).contiguous()
    dlogp = _loss_backward_op(row_grad, logp, old, ref, mask, cu_seqlens, advantages, *ctx.options)
    return (dlogp,) + (None,) * 14


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


def grpo_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    advantages: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    group_size: int | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    delta: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss of per-token log-probs: clipped surrogate (+ beta * KL), aggregated as in TRL.

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled completion tokens under the current policy
            (fp16/bf16/fp32; fp64 on the torch backend), or ``(N,)`` packed with ``cu_seqlens``.
        mask: same shape; nonzero marks completion tokens. Masked tokens contribute exactly
            nothing, whatever their log-prob values (padding may hold garbage).
        advantages: ``(B,)`` per-completion advantages; or instead
        rewards, group_size: ``(B,)`` rewards normalised inside with ``grpo_advantages``
            (``scale="group"``, eps 1e-4).
        old_logprobs: behaviour-policy log-probs, shape of ``logprobs``; None means on-policy
            (``old = logprobs.detach()``: ratio 1, loss often 0, gradient not).
        ref_logprobs: reference-policy log-probs for the KL term (needed when ``beta > 0``).
        loss_type: ``"grpo"`` (per-sequence token mean, then mean over rows), ``"bnpo"`` (token
            mean of this batch), ``"dapo"`` (token sum / ``num_items_in_batch``, default the valid
            token count), ``"dr_grpo"`` (token sum / (B * ``max_completion_length``, default T))
            or ``"cispo"`` (``-sg(min(r, eps_high)) * A * logp``, aggregated as dapo).
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO: one ratio per row, the
            exp of the row's mean log-ratio).
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]`` (cispo: eps_high is the cap).
        delta: two-sided clip; caps the unclipped ratio at ``delta`` (> 1). Unused by cispo.
        beta, kl_estimator: KL weight and estimator of ``KL(pi || pi_ref)``: ``"k1"``
            (logp - ref), ``"k2"`` (half the squared difference), ``"k3"`` (``e^(ref-logp) -
            (ref-logp) - 1``, TRL's) or ``"k3_corrected"`` (k3 times the ratio).
        cu_seqlens: ``(B+1,)`` int row offsets for the packed ``(N,)`` form.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``pyfastrl.prefix_grouped_attention``).

    log(ratio) is clamped to +-20 before exp (verl's guard; no gradient past it).

    Returns:
        ``(loss, metrics)``: the scalar loss (fp32; fp64 for fp64 log-probs), differentiable in
        ``logprobs`` only; ``metrics`` a dict of detached 0-d tensors, means over valid tokens
        (0 when there are none): ``clip_ratio_low`` / ``clip_ratio_high`` / ``clip_ratio``
        (TRL's definitions), ``kl`` (the KL term before beta; 0 when beta = 0), ``ratio_mean``
        / ``ratio_min`` / ``ratio_max``, and ``advantage_mean`` / ``advantage_std`` over rows.
    """
    op = "grpo_loss"
    _tensor(op, "logprobs", logprobs, (1, 2), _FLOAT_DTYPES)
    device = logprobs.device
    backend = resolve_backend(op, backend, device)
    _check_triton_dtype(op, backend, "logprobs", logprobs.dtype)
    valid = _mask(op, mask, logprobs, "logprobs").reshape(-1).contiguous()
    setup = _LossSetup(op, logprobs, "logprobs", valid, cu_seqlens, reference.compute_dtype(logprobs.dtype),
                       **_loss_arguments(locals()))
    flat = logprobs.reshape(-1).contiguous()
    old = flat.detach() if setup.old is None else setup.old
    loss, partials = _loss_op(flat, old, setup.ref, valid, setup.cu_seqlens, setup.advantages, setup.row_weights,
                              *setup.opts, backend)
    return loss, _metrics(partials, setup.advantages)


# ----------------------------------------------------------------------------- fused LM head


def _default_chunk_size(backend: str, vocab: int, dtype: torch.dtype) -> int:
    return max(1, _CHUNK_LOGIT_BYTES[backend] // (vocab * dtype.itemsize))


def _chunk_logits(hidden_chunk, weight, bias):
    if bias is None:
        return hidden_chunk @ weight.t()
    return torch.addmm(bias, hidden_chunk, weight.t())


def _chunk_ranges(num_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, num_tokens)) for start in range(0, num_tokens, chunk_size)]


def _stats_pass(impl, hidden, weight, bias, target_ids, inv_temperature, chunks, lse, logp, entropy) -> None:
    """Fill ``lse``, ``logp`` and ``entropy`` chunk by chunk, one chunk of logits alive at a time."""
    for start, end in chunks:
        logits = _chunk_logits(hidden[start:end], weight, bias)
        stats = impl.logits_stats(logits, target_ids[start:end], inv_temperature)
        for buffer, value in zip((lse, logp, entropy), stats):
            buffer[start:end] = value
        del logits, stats


class _GradientAccumulator:
    """dh rows, dW and db of the LM head, one chunk's logit gradient at a time."""

    def __init__(self, hidden, weight, bias, need_hidden: bool, need_weight: bool, need_bias: bool):
        # dW / db sum over chunks: accumulate in fp32 (fp64 for fp64) and round once at the end.
        acc = reference.compute_dtype(weight.dtype)
        self.dh = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
        self.dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        self.db = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_bias else None
        self.weight = weight

    def add(self, start: int, end: int, hidden_chunk, dlogits):
        if self.dh.numel():
            torch.mm(dlogits, self.weight, out=self.dh[start:end])
        if self.dw is not None:
            if self.dw.dtype == dlogits.dtype:
                self.dw.addmm_(dlogits.t(), hidden_chunk)
            elif dlogits.is_cuda:
                torch.addmm(self.dw, dlogits.t(), hidden_chunk, out_dtype=self.dw.dtype, out=self.dw)
            else:  # CPU has no mixed-dtype GEMM
                self.dw += (dlogits.t() @ hidden_chunk).to(self.dw.dtype)
        if self.db is not None:
            self.db += dlogits.sum(0, dtype=self.db.dtype)

    def results(self):
        """``(dh, dw, db)`` in the dtypes of hidden, weight and bias (the LM head shares one dtype);
        empty where not asked for."""
        # Separate empties: custom-op outputs may not alias each other.
        dw = self.dw.to(self.weight.dtype) if self.dw is not None else self.weight.new_empty(0)
        db = self.db.to(self.weight.dtype) if self.db is not None else self.weight.new_empty(0)
        return self.dh, dw, db


@torch.library.custom_op("pyfastrl::fused_linear_grpo_loss", mutates_args=())
def _fused_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target_ids: torch.Tensor,
    old: torch.Tensor | None,
    ref: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    advantages: torch.Tensor,
    row_weight: torch.Tensor,
    inv_temperature: float,
    chunk_size: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    loss_type: str,
    sequence_level: bool,
    eps_low: float,
    eps_high: float,
    delta: float | None,
    beta: float,
    kl_estimator: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(loss, partials, logp, entropy, dh, dw, db)``; the gradients are of ``loss``
    (empty when not asked for). Every token of ``hidden (N, H)`` counts (masked ones were dropped)."""
    opts = LossOptions(loss_type, sequence_level, eps_low, eps_high, delta, beta, kl_estimator)
    impl = _implementation(backend)
    num_tokens = hidden.shape[0]
    stat_dtype = reference.compute_dtype(hidden.dtype)
    lse, logp, entropy = (torch.empty(num_tokens, dtype=stat_dtype, device=hidden.device) for _ in range(3))
    grads = _GradientAccumulator(hidden, weight, bias, need_grad_hidden, need_grad_weight, need_grad_bias)
    need_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    # Token-level gradients are local to a token: one pass does logits, loss gradient and dh/dW.
    # A sequence-level ratio needs the whole row first: stats pass, loss gradient, gradient pass.
    one_pass = need_grad and not sequence_level
    if one_pass:
        rows = reference.row_of_token(cu_seqlens, num_tokens)
    chunks = _chunk_ranges(num_tokens, chunk_size)
    if one_pass:
        for start, end in chunks:
            hidden_chunk = hidden[start:end]
            logits = _chunk_logits(hidden_chunk, weight, bias)
            token_inputs = (None if old is None else old[start:end], None if ref is None else ref[start:end],
                            rows[start:end], advantages, row_weight)
            stats = impl.logits_stats_and_backward(logits, target_ids[start:end], inv_temperature,
                                                   *token_inputs, opts)
            grads.add(start, end, hidden_chunk, stats[3])
            for buffer, value in zip((lse, logp, entropy), stats):
                buffer[start:end] = value
            del logits, stats
    else:
        _stats_pass(impl, hidden, weight, bias, target_ids, inv_temperature, chunks, lse, logp, entropy)
    old_values = logp if old is None else old
    partials = impl.loss_forward(logp, old_values, ref, None, cu_seqlens, advantages, opts)
    loss = _aggregate(partials, row_weight)
    if need_grad and not one_pass:
        dlogp = impl.loss_backward(row_weight, logp, old_values, ref, None, cu_seqlens, advantages, opts)
        for start, end in chunks:
            hidden_chunk = hidden[start:end]
            logits = _chunk_logits(hidden_chunk, weight, bias)
            dlogits = impl.logits_backward(logits, target_ids[start:end], inv_temperature, lse[start:end],
                                           dlogp[start:end])
            grads.add(start, end, hidden_chunk, dlogits)
            del logits, dlogits
    return (loss, partials, logp, entropy) + grads.results()


@_fused_op.register_fake
def _(hidden, weight, bias, target_ids, old, ref, cu_seqlens, advantages, row_weight, inv_temperature,
      chunk_size, need_grad_hidden, need_grad_weight, need_grad_bias, *args):
    dtype = reference.compute_dtype(hidden.dtype)
    num_tokens = hidden.shape[0]
    return (
        hidden.new_empty((), dtype=dtype),
        hidden.new_empty((cu_seqlens.shape[0] - 1, len(PARTIALS)), dtype=dtype),
        hidden.new_empty(num_tokens, dtype=dtype),
        hidden.new_empty(num_tokens, dtype=dtype),
        torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_grad_weight else weight.new_empty(0),
        torch.empty_like(bias) if need_grad_bias else weight.new_empty(0),
    )


def _fused_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[4:])
    ctx.computed = inputs[11:14]  # need_grad_hidden, need_grad_weight, need_grad_bias


def _fused_backward(ctx, grad_loss, *unused):
    grads = tuple(grad * grad_loss.to(grad.dtype) if computed else None
                  for grad, computed in zip(ctx.saved_tensors, ctx.computed))
    return grads + (None,) * 19


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


@torch.library.custom_op("pyfastrl::selective_logprobs", mutates_args=())
def _selective_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target_ids: torch.Tensor,
    inv_temperature: float,
    chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens = hidden.shape[0]
    dtype = reference.compute_dtype(hidden.dtype)
    lse, logp, entropy = (torch.empty(num_tokens, dtype=dtype, device=hidden.device) for _ in range(3))
    _stats_pass(_implementation(backend), hidden, weight, bias, target_ids, inv_temperature,
                _chunk_ranges(num_tokens, chunk_size), lse, logp, entropy)
    return logp, entropy


@_selective_op.register_fake
def _(hidden, weight, bias, target_ids, inv_temperature, chunk_size, backend):
    dtype = reference.compute_dtype(hidden.dtype)
    return hidden.new_empty(hidden.shape[0], dtype=dtype), hidden.new_empty(hidden.shape[0], dtype=dtype)


def _lm_head_inputs(op, hidden, weight, bias, target_ids, temperature, chunk_size, backend):
    """Checks shared by the fused ops; returns the resolved backend, 1/temperature and chunk size."""
    _tensor(op, "hidden", hidden, (2, 3), _FLOAT_DTYPES)
    device = hidden.device
    backend = resolve_backend(op, backend, device)
    _tensor(op, "weight", weight, (2,), _FLOAT_DTYPES, device)
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: hidden {tuple(hidden.shape)} must end in the hidden size H of weight (V, H) = {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{op}: hidden has dtype {hidden.dtype} but weight has {weight.dtype}; pass one dtype")
    _check_triton_dtype(op, backend, "hidden/weight", hidden.dtype)
    vocab = weight.shape[0]
    if bias is not None:
        _tensor(op, "bias", bias, (1,), (weight.dtype,), device)
        if bias.shape[0] != vocab:
            raise ValueError(f"{op}: bias has {bias.shape[0]} entries but weight has V={vocab} rows")
    _tensor(op, "target_ids", target_ids, (hidden.dim() - 1,), _INDEX_DTYPES, device)
    if target_ids.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{op}: target_ids has shape {tuple(target_ids.shape)} but hidden has {tuple(hidden.shape[:-1])} tokens"
        )
    if _data_checks_enabled() and target_ids.numel():
        low, high = target_ids.min().item(), target_ids.max().item()
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(f"{op}: target_ids holds {bad}, outside the vocabulary [0, {vocab})")
    _positive_number(op, "temperature", temperature)
    if chunk_size is None:
        chunk_size = _default_chunk_size(backend, vocab, weight.dtype)
    else:
        _positive_number(op, "chunk_size", chunk_size, integer=True)
    return backend, 1.0 / float(temperature), int(chunk_size)


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    group_size: int | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    delta: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss straight from hidden states and the LM head, never materialising all the logits.

    Equal to ``grpo_loss`` on the log-probs of ``log_softmax((hidden @ weight.T + bias) /
    temperature)`` at ``target_ids``, but the logits exist one token chunk at a time: each chunk's
    logits are computed (in the weight dtype, like the model's own LM head), reduced by an online
    log-sum-exp to log-probs and entropies, and turned in place into their gradient for the dh /
    dW / db matmuls. Masked tokens are dropped before any matmul.

    Args:
        hidden: ``(B, T, H)`` final hidden states at the positions that predict each completion
            token (padded form, with ``mask (B, T)``), or ``(N, H)`` packed with ``cu_seqlens
            (B+1,)`` (e.g. the completion tokens of a prefix-grouped forward; ``mask (N,)`` or None).
        weight: ``(V, H)`` LM-head weight, hidden's dtype (fp16/bf16/fp32; fp64 on torch).
        target_ids: ``(B, T)`` / ``(N,)`` int token ids in ``[0, V)``.
        mask: nonzero = completion token; None (packed form only) = all tokens count.
        bias: optional ``(V,)`` LM-head bias.
        temperature: logits are divided by it (the sampling temperature, as in TRL).
        chunk_size: tokens per chunk; default: 1 GiB of logits (256 MiB on the torch backend).
        old_logprobs, ref_logprobs: like ``target_ids``' shape; see ``grpo_loss``.
        everything else: as in ``grpo_loss``.

    Returns:
        ``(loss, metrics)``: loss differentiable in hidden, weight and bias; metrics as in
        ``grpo_loss`` plus ``entropy`` (mean token entropy of the tempered distribution).
        Gradients are computed in the forward pass when any of hidden / weight / bias requires
        grad (and grad mode is on); backward only scales them by the incoming gradient.
    """
    op = "fused_linear_grpo_loss"
    backend, inv_temperature, chunk_size = _lm_head_inputs(op, hidden, weight, bias, target_ids, temperature,
                                                           chunk_size, backend)
    tokens_shape = hidden.shape[:-1]
    if hidden.dim() == 3 and mask is None:
        raise ValueError(f"{op}: padded (B, T, H) hidden needs mask (B, T)")
    valid = (torch.ones(tokens_shape, dtype=torch.bool, device=hidden.device) if mask is None
             else _mask(op, mask, target_ids, "target_ids")).reshape(-1)
    setup = _LossSetup(op, target_ids, "target_ids", valid, cu_seqlens, reference.compute_dtype(hidden.dtype),
                       **_loss_arguments(locals()))
    kept = valid.nonzero().squeeze(1)
    everything = kept.numel() == valid.numel()

    def select(t):
        t = t.reshape(-1, *t.shape[len(tokens_shape):])
        return (t if everything else t.index_select(0, kept)).contiguous()

    hidden_kept = select(hidden)
    targets = select(target_ids)
    old, ref = (None if t is None else select(t) for t in (setup.old, setup.ref))
    kept_cu = torch.cat([setup.counts.new_zeros(1), setup.counts.cumsum(0)]).to(torch.int32)
    grad_on = torch.is_grad_enabled()
    loss, partials, _, entropy, *_ = _fused_op(
        hidden_kept, weight, bias, targets, old, ref, kept_cu, setup.advantages, setup.row_weights,
        inv_temperature, chunk_size, grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad, *setup.opts, backend,
    )
    metrics = _metrics(partials, setup.advantages)
    metrics["entropy"] = entropy.sum() / max(entropy.numel(), 1)
    return loss, metrics


def selective_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
):
    """Log-probs (and entropies) of ``target_ids`` under the LM head, chunked; no gradient.

    For the old-policy and reference-policy passes: the same numerics as
    ``fused_linear_grpo_loss`` (logits in the weight dtype, fp32 log-sum-exp over vocab tiles), so
    on-policy ratios come out at 1.

    Args:
        hidden: ``(..., H)``; weight ``(V, H)`` in hidden's dtype; bias ``(V,)`` or None.
        target_ids: ``hidden.shape[:-1]`` int ids in ``[0, V)``.
        temperature, chunk_size, backend: as in ``fused_linear_grpo_loss``.

    Returns:
        ``logprobs`` shaped like ``target_ids`` (fp32; fp64 for fp64 inputs), or ``(logprobs,
        entropy)`` with ``return_entropy=True``. Never requires grad.
    """
    op = "selective_logprobs"
    backend, inv_temperature, chunk_size = _lm_head_inputs(op, hidden, weight, bias, target_ids, temperature,
                                                           chunk_size, backend)
    with torch.no_grad():
        logp, entropy = _selective_op(hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight, bias,
                                      target_ids.reshape(-1).contiguous(), inv_temperature, chunk_size, backend)
    logp, entropy = logp.reshape(target_ids.shape), entropy.reshape(target_ids.shape)
    return (logp, entropy) if return_entropy else logp
