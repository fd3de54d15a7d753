"""Plain-PyTorch GRPO loss: the ``"torch"`` backend, and the naive reference it is tested against.

Naive reference (TRL's formulas, differentiated by autograd; the tests' float64 ground truth and the
benchmark's unfused path):

* ``naive_advantages``: group-normalised advantages, mean/std per group as written in the spec.
* ``naive_grpo_loss``: per-token clipped surrogate (+ KL) on padded ``(B, T)`` log-probs, aggregated
  per ``loss_type``, with every metric.
* ``naive_token_logprobs``: materialised logits ``hidden @ weight.T (+ bias)`` in the input dtype,
  then fp32 (fp64 for fp64 inputs) ``log_softmax(logits / temperature)``, gathered, plus entropy.

Torch backend (what ``backend="torch"`` runs; same contract as ``kernel.py``):

* ``group_advantages``: shifted two-pass mean/variance in float64, so identical rewards give
  exactly 0.
* ``loss_forward`` / ``loss_backward``: the token-level loss over flat tokens with row boundaries
  ``cu_seqlens``. The forward returns per-row partial sums (``PARTIALS``); the backward returns
  dL/dlogp from the closed-form gradients of the spec, given each row's upstream gradient.
* ``logits_stats`` / ``logits_backward``: one chunk of logits to (lse, logp, entropy), and to the
  logit gradient ``g * (onehot - softmax) / temperature``.

Every per-token term is split the same way in both backends (``_token_terms``): the loss, its
derivative in logp with the ratio held fixed (``direct``), and its derivative in the log-ratio
(``via_ratio``). The token-level gradient is ``direct + via_ratio`` (the ratio clamp passing); the
sequence-level (GSPO) one sums ``via_ratio`` over the row and spreads it over the row's tokens.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3", "k3_corrected")
ADVANTAGE_SCALES = ("group", "batch", "none")
# log(ratio) is clamped to +-LOG_RATIO_CLAMP before exp (verl's safety clamp); no gradient beyond it.
LOG_RATIO_CLAMP = 20.0
# Per-row partial sums returned by loss_forward, in column order.
PARTIALS = ("loss", "tokens", "kl", "clip_low", "clip_high", "ratio_sum", "ratio_min", "ratio_max")


class LossOptions(NamedTuple):
    """The loss options shared by both backends (validated by the op before they get here)."""

    loss_type: str
    sequence_level: bool
    eps_low: float
    eps_high: float
    delta: float | None
    beta: float
    kl_estimator: str


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- naive reference


def naive_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, scale: str = "group", eps: float = 1e-4):
    """Spec formulas, group by group in Python (float64): ``(r - mean_g) / (std_g + eps)``."""
    r = rewards.double()
    out = torch.zeros_like(r)
    batch_std = r.std() if r.numel() > 1 else r.new_zeros(())
    for g in group_ids.unique():
        idx = (group_ids == g).nonzero().flatten()
        if idx.numel() < 2:
            continue
        centered = r[idx] - r[idx].mean()
        if scale == "group":
            centered = centered / (r[idx].std() + eps)
        elif scale == "batch":
            centered = centered / (batch_std + eps)
        out[idx] = centered
    return out


def naive_grpo_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    *,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    delta: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    max_completion_length: int | None = None,
    num_items_in_batch=None,
):
    """TRL's GRPO loss on padded ``(B, T)`` tensors, written straight from the spec; autograd gives
    the gradient. Returns ``(loss, metrics)`` with the same metric names as ``pyfastrl.grpo_loss``."""
    m = mask.to(logprobs.dtype)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    log_ratio = logprobs - old
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1)).unsqueeze(-1)
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=eps_high).detach() * adv * logprobs
        clip_low = torch.zeros_like(m, dtype=torch.bool)
        clip_high = (ratio > eps_high) & (adv > 0)
    else:
        clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
        per_token = -torch.min(unclipped * adv, clipped * adv)
        clip_low = (unclipped < 1 - eps_low) & (adv < 0)
        clip_high = (unclipped > 1 + eps_high) & (adv > 0)
    kl = torch.zeros_like(logprobs)
    if beta != 0.0:
        diff = ref_logprobs - logprobs
        if kl_estimator == "k1":
            kl = -diff
        elif kl_estimator == "k2":
            kl = 0.5 * diff**2
        else:
            kl = torch.exp(diff) - diff - 1
            if kl_estimator == "k3_corrected":
                kl = kl * ratio
        per_token = per_token + beta * kl
    per_token = per_token.expand_as(m)

    num_rows = m.shape[0]
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        length = m.shape[1] if max_completion_length is None else max_completion_length
        loss = (per_token * m).sum() / (num_rows * length)
    else:
        normaliser = m.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = (per_token * m).sum() / normaliser

    with torch.no_grad():
        count = m.sum()
        denom = count.clamp(min=1)
        ratio_t = ratio.expand_as(m)
        valid = m.bool()
        low = (clip_low.expand_as(m) * m).sum() / denom
        high = (clip_high.expand_as(m) * m).sum() / denom
        metrics = {
            "clip_ratio_low": low,
            "clip_ratio_high": high,
            "clip_ratio": low + high,
            "kl": (kl.expand_as(m) * m).sum() / denom,
            "ratio_mean": (ratio_t * m).sum() / denom,
            "ratio_min": ratio_t[valid].min() if count > 0 else count * 0,
            "ratio_max": ratio_t[valid].max() if count > 0 else count * 0,
            "advantage_mean": advantages.mean(),
            "advantage_std": advantages.std() if num_rows > 1 else advantages.sum() * 0,
        }
    return loss, metrics


def naive_token_logprobs(hidden, weight, target_ids, bias=None, temperature: float = 1.0):
    """Log-probs and entropies of ``target_ids`` from materialised logits (the unfused path)."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.to(compute_dtype(hidden.dtype)) / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


# ----------------------------------------------------------------------------- torch backend


def group_advantages(rewards: torch.Tensor, group_index: torch.Tensor, num_groups: int, scale: str, eps: float):
    """Advantages of ``rewards (B,)`` whose group is ``group_index (B,)`` in ``[0, num_groups)``.

    Float64 throughout. Rewards are shifted by their group's maximum before the two-pass mean and
    variance, so a group of identical rewards has exact zero deviations and gets exactly 0; a group
    of one member gets 0 as well (its unbiased std is undefined).
    """
    r = rewards.to(torch.float64)
    zeros = r.new_zeros(num_groups)
    counts = zeros.index_add(0, group_index, torch.ones_like(r))
    pivot = torch.full_like(zeros, -torch.inf).scatter_reduce(0, group_index, r, "amax")
    shifted = r - pivot[group_index]
    centered = shifted - (zeros.index_add(0, group_index, shifted) / counts)[group_index]
    if scale == "group":
        variance = zeros.index_add(0, group_index, centered**2) / (counts - 1).clamp(min=1)
        centered = centered / (variance.sqrt()[group_index] + eps)
    elif scale == "batch":
        batch_std = r.std() if r.numel() > 1 else r.new_zeros(())
        centered = centered / (batch_std + eps)
    return torch.where(counts[group_index] > 1, centered, 0.0)


def _segment_sum(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    return values.new_zeros(num_rows).index_add_(0, rows, values)


def row_of_token(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Row index (int64) of each of ``num_tokens`` flat tokens, rows delimited by ``cu_seqlens``."""
    tokens = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True)


def _token_terms(logp, log_ratio, ref, adv, opts: LossOptions):
    """Per-token ``(loss, direct, via_ratio, kl, clip_low, clip_high, ratio)``; see the module doc.

    ``log_ratio`` is already clamped; ``adv`` is broadcast to the tokens.
    """
    ratio = torch.exp(log_ratio)
    if opts.loss_type == "cispo":
        coef = torch.clamp(ratio, max=opts.eps_high)
        loss = -coef * adv * logp
        direct = -coef * adv
        via_ratio = torch.zeros_like(ratio)
        clip_low = torch.zeros_like(ratio, dtype=torch.bool)
        clip_high = (ratio > opts.eps_high) & (adv > 0)
    else:
        lo, hi = 1 - opts.eps_low, 1 + opts.eps_high
        unclipped, unclipped_pass = ratio, torch.ones_like(ratio)
        if opts.delta is not None:
            unclipped = torch.clamp(ratio, max=opts.delta)
            unclipped_pass = (ratio <= opts.delta).to(ratio.dtype)
        clipped = torch.clamp(ratio, lo, hi)
        clipped_pass = ((ratio >= lo) & (ratio <= hi)).to(ratio.dtype)
        term1, term2 = unclipped * adv, clipped * adv
        # min(term1, term2) sends its gradient to the smaller term, half to each on a tie (autograd's rule).
        share1 = torch.where(term1 < term2, 1.0, torch.where(term1 == term2, 0.5, 0.0)).to(ratio.dtype)
        loss = -torch.minimum(term1, term2)
        direct = torch.zeros_like(ratio)
        via_ratio = -adv * (share1 * unclipped_pass + (1 - share1) * clipped_pass) * ratio
        clip_low = (unclipped < lo) & (adv < 0)
        clip_high = (unclipped > hi) & (adv > 0)
    kl = torch.zeros_like(ratio)
    if opts.beta != 0.0:
        diff = ref - logp
        if opts.kl_estimator == "k1":
            kl, kl_direct = -diff, torch.ones_like(diff)
        elif opts.kl_estimator == "k2":
            kl, kl_direct = 0.5 * diff**2, -diff
        else:
            e = torch.exp(diff)
            kl, kl_direct = e - diff - 1, 1 - e
            if opts.kl_estimator == "k3_corrected":
                via_ratio = via_ratio + opts.beta * kl * ratio
                kl, kl_direct = kl * ratio, kl_direct * ratio
        loss = loss + opts.beta * kl
        direct = direct + opts.beta * kl_direct
    return loss, direct, via_ratio, kl, clip_low, clip_high, ratio


def _log_ratios(logp, old, valid, rows, num_rows, sequence_level: bool):
    """Clamped per-token log-ratios, whether the clamp passes gradient, and per-row valid counts."""
    counts = _segment_sum(valid.to(logp.dtype), rows, num_rows)
    diff = logp - old
    if sequence_level:
        row_mean = _segment_sum(torch.where(valid, diff, 0.0), rows, num_rows) / counts.clamp(min=1)
        diff = row_mean[rows]
    passes = diff.abs() <= LOG_RATIO_CLAMP
    return diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), passes, counts


def _prepare(logp, old, ref, mask, cu_seqlens, advantages, opts):
    dtype = compute_dtype(logp.dtype)
    num_rows = cu_seqlens.numel() - 1
    rows = row_of_token(cu_seqlens, logp.numel())
    valid = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask != 0
    logp, old = logp.to(dtype), old.to(dtype)
    ref = ref.to(dtype) if opts.beta != 0.0 else None
    return logp, old, ref, valid, rows, num_rows, advantages.to(dtype)[rows]


def loss_forward(logp, old, ref, mask, cu_seqlens, advantages, opts: LossOptions) -> torch.Tensor:
    """Per-row partial sums ``(B, len(PARTIALS))`` of the loss terms over the row's valid tokens.

    ``logp, old, ref, mask``: flat ``(N,)``; row b is ``cu_seqlens[b]:cu_seqlens[b+1]``; ``mask``
    None means every token is valid. Masked tokens contribute exactly nothing, whatever their values.
    """
    logp, old, ref, valid, rows, num_rows, adv = _prepare(logp, old, ref, mask, cu_seqlens, advantages, opts)
    log_ratio, _, counts = _log_ratios(logp, old, valid, rows, num_rows, opts.sequence_level)
    loss, _, _, kl, low, high, ratio = _token_terms(logp, log_ratio, ref, adv, opts)

    def row_sum(x):
        return _segment_sum(torch.where(valid, x.to(logp.dtype), 0.0), rows, num_rows)

    ratio_min = torch.full_like(counts, torch.inf).scatter_reduce(0, rows, torch.where(valid, ratio, torch.inf), "amin")
    ratio_max = torch.full_like(counts, -torch.inf).scatter_reduce(0, rows, torch.where(valid, ratio, -torch.inf), "amax")
    return torch.stack(
        [row_sum(loss), counts, row_sum(kl), row_sum(low), row_sum(high), row_sum(ratio), ratio_min, ratio_max], 1
    )


def loss_backward(row_grad, logp, old, ref, mask, cu_seqlens, advantages, opts: LossOptions) -> torch.Tensor:
    """dL/dlogp ``(N,)`` in logp's dtype, where L = sum_b row_grad[b] * (row b's summed loss)."""
    out_dtype = logp.dtype
    logp, old, ref, valid, rows, num_rows, adv = _prepare(logp, old, ref, mask, cu_seqlens, advantages, opts)
    log_ratio, passes, counts = _log_ratios(logp, old, valid, rows, num_rows, opts.sequence_level)
    _, direct, via_ratio, *_ = _token_terms(logp, log_ratio, ref, adv, opts)
    if opts.sequence_level:
        # log s_b is the mean of the row's log-ratios: d log s_b / d logp_t = 1 / n_b.
        row_total = _segment_sum(torch.where(valid, via_ratio, 0.0), rows, num_rows) / counts.clamp(min=1)
        via_ratio = row_total[rows]
    grad = row_grad.to(logp.dtype)[rows] * (direct + torch.where(passes, via_ratio, 0.0))
    return torch.where(valid, grad, 0.0).to(out_dtype)


def token_grad(logp, old, ref, advantages, row_grad, rows, opts: LossOptions) -> torch.Tensor:
    """Token-level dL/dlogp of valid tokens given their rows: the one-pass fused-linear path.
    ``old`` None means the behaviour policy is the current one (ratio 1, gradient through it kept)."""
    dtype = logp.dtype
    diff = logp - (logp if old is None else old.to(dtype))
    ref = ref.to(dtype) if opts.beta != 0.0 else None
    log_ratio = diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    _, direct, via_ratio, *_ = _token_terms(logp, log_ratio, ref, advantages.to(dtype)[rows], opts)
    return row_grad.to(dtype)[rows] * (direct + torch.where(diff.abs() <= LOG_RATIO_CLAMP, via_ratio, 0.0))


def logits_stats(logits: torch.Tensor, target_ids: torch.Tensor, inv_temperature: float):
    """``(lse, logp, entropy)`` of each row of ``logits (C, V)`` scaled by ``inv_temperature``."""
    z = logits.to(compute_dtype(logits.dtype)) * inv_temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, target_ids.unsqueeze(1)).squeeze(1) - lse
    p = torch.exp(z - lse.unsqueeze(1))
    entropy = lse - (p * z).sum(-1)
    return lse, logp, entropy


def logits_backward(logits, target_ids, inv_temperature: float, lse, grad) -> torch.Tensor:
    """``dL/dlogits = grad * (onehot(target) - softmax(logits * inv_temperature)) * inv_temperature``,
    in the logits' dtype."""
    z = logits.to(lse.dtype) * inv_temperature
    dz = torch.exp(z - lse.unsqueeze(1)).mul_(-grad.unsqueeze(1))
    dz.scatter_add_(1, target_ids.unsqueeze(1), grad.unsqueeze(1))
    return dz.mul_(inv_temperature).to(logits.dtype)


def logits_stats_and_backward(logits, target_ids, inv_temperature, old, ref, rows, advantages, row_grad, opts):
    """One-pass chunk step: stats, the token-level GRPO gradient, and the logit gradient."""
    lse, logp, entropy = logits_stats(logits, target_ids, inv_temperature)
    grad = token_grad(logp, old, ref, advantages, row_grad, rows, opts)
    return lse, logp, entropy, logits_backward(logits, target_ids, inv_temperature, lse, grad)
