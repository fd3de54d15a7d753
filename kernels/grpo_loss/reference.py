"""Plain-PyTorch GRPO loss: the ``"torch"`` backend, and the naive reference it is tested against.

Naive reference (float64 ground truth of the tests, and the benchmark's unfused path): TRL 1.16.0's
formulas re-derived on padded ``(B, T)`` tensors and differentiated by autograd.

* ``naive_advantages``: ``GRPOTrainer._generate_and_score_completions`` (trl/trainer/grpo_trainer.py,
  ``multi_objective_aggregation="sum_then_normalize"``): group mean, unbiased std, eps 1e-4.
* ``naive_importance_sampling_ratio``: the vLLM importance-sampling ratio of the same function.
* ``naive_grpo_loss``: ``GRPOTrainer._compute_loss`` with ``get_off_policy_mask``,
  ``get_gamma_weights`` and ``get_high_entropy_mask`` (same file), with TRL's logged metrics.
* ``naive_token_logprobs``: materialised logits ``hidden @ weight.T (+ bias)`` in the input dtype,
  then fp32 (fp64 for fp64 inputs) ``log_softmax(logits / temperature)``, gathered, plus entropy.

Torch backend (what ``backend="torch"`` runs; same contract as ``kernel.py``):

* ``group_advantages``: shifted two-pass mean/variance in float64, so identical rewards give
  exactly 0; NaN rewards are unscorable (left out of their group's statistics, advantage 0).
* ``loss_forward`` / ``loss_backward``: the token-level loss over flat tokens with row boundaries
  ``cu_seqlens``, per-token advantages and an optional per-token policy weight (importance
  sampling, off-policy and entropy masks, VESPO's phi). The forward returns per-row partial sums
  (``PARTIALS``); the backward returns dL/dlogp from closed-form gradients, given each row's
  upstream gradient.
* ``logits_stats`` / ``logits_backward``: one chunk of logits to (lse, logp, entropy), and to the
  logit gradient ``g * (onehot - softmax) / temperature``.

Every per-token term is split the same way in both backends (``_token_terms``): the loss, its
derivative in logp with the ratio held fixed (``direct``), and its derivative in the log-ratio
(``via_ratio``). The token-level gradient is ``direct + via_ratio``; the sequence-level (GSPO) one
sums ``via_ratio`` over the row and spreads it evenly over the row's tokens.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# Loss types whose token loss is TRL's clipped surrogate (they differ in aggregation only).
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
ADVANTAGE_SCALES = ("group", "batch", "none")
VLLM_IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# VESPO's log-weight range (TRL's get_gamma_weights: log(1e-8) .. 20).
VESPO_LOG_MIN, VESPO_LOG_MAX = math.log(1e-8), 20.0
# Per-row partial sums returned by loss_forward, in column order.
# Token-formula and KL-estimator codes of the kernel backends (kernel.py's constexprs, the CUDA
# kernels' LossCode / KlCode in csrc/grpo_loss/grpo_math.h): clipped losses 0, cispo 1, sapo 2,
# vespo's policy gradient 3.
LOSS_CODES = {"grpo": 0, "bnpo": 0, "dr_grpo": 0, "dapo": 0, "luspo": 0, "cispo": 1, "sapo": 2, "vespo": 3}
KL_CODES = {"k1": 1, "k2": 2, "k3": 3}
PARTIALS = ("loss", "tokens", "kl", "clip_low", "clip_high", "clip_delta", "ratio_sum", "ratio_min", "ratio_max")


class LossOptions(NamedTuple):
    """The token-loss options both backends see (validated by the op before they get here).

    ``loss_type`` here is the token formula only; aggregation happens outside the backends."""

    loss_type: str
    sequence_level: bool
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    beta: float
    kl_estimator: str
    use_bias_correction_kl: bool
    sapo_temperature_pos: float
    sapo_temperature_neg: float


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- naive reference (TRL 1.16.0)


def _nan_std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std ignoring NaN (TRL's ``trainer/utils.py::nanstd``): NaN with < 2 values."""
    mean = torch.nanmean(x)
    count = (~torch.isnan(x)).sum()
    return (torch.nanmean((x - mean) ** 2) * count / (count - 1)).sqrt()


def naive_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, scale_rewards: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """TRL's advantages (``GRPOTrainer._generate_and_score_completions``, grpo_trainer.py), group by
    group in float64: ``r - nanmean_g`` divided by ``nanstd_g + eps`` ("group") or the batch's
    ``nanstd + eps`` ("batch") or by nothing ("none"); NaN results (unscorable rewards, groups
    with fewer than two scorable rewards) become 0 (TRL's ``nan_to_num``)."""
    r = rewards.double()
    out = torch.zeros_like(r)
    batch_std = _nan_std(r)
    for g in group_ids.unique():
        idx = (group_ids == g).nonzero().flatten()
        centered = r[idx] - torch.nanmean(r[idx])
        if scale_rewards == "group":
            centered = centered / (_nan_std(r[idx]) + eps) if idx.numel() > 1 else centered / eps
        elif scale_rewards == "batch":
            centered = centered / (batch_std + eps)
        out[idx] = centered
    return torch.nan_to_num(out, nan=0.0)


def naive_importance_sampling_ratio(old_per_token_logps, sampling_per_token_logps, completion_mask,
                                    mode: str = "sequence_mask", clip_min: float | None = None,
                                    clip_max: float | None = 3.0) -> torch.Tensor:
    """TRL's vLLM importance-sampling ratio (``_generate_and_score_completions``): ``exp(old -
    sampling)`` per token ``(B, T)`` or per sequence (the row's summed log-difference, ``(B, 1)``),
    truncated to ``[clip_min, clip_max]`` or set to 0 outside it ("mask")."""
    diff = torch.nan_to_num((old_per_token_logps - sampling_per_token_logps) * completion_mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def _nan_extreme(x: torch.Tensor, largest: bool) -> torch.Tensor:
    kept = x[~torch.isnan(x)]
    if kept.numel() == 0:
        return x.new_tensor(float("nan"))
    return kept.max() if largest else kept.min()


def naive_grpo_loss(
    per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    old_per_token_logps: torch.Tensor | None = None,
    ref_per_token_logps: torch.Tensor | None = None,
    *,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    use_bias_correction_kl: bool = True,
    max_completion_length: int | None = None,
    num_items_in_batch=None,
    importance_sampling_ratio: torch.Tensor | None = None,
    sampling_per_token_logps: torch.Tensor | None = None,
    off_policy_mask_threshold: float | None = None,
    top_entropy_quantile: float = 1.0,
    entropies: torch.Tensor | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
):
    """TRL 1.16.0's ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py) on one process,
    without gradient accumulation, on padded ``(B, T)`` tensors; autograd gives the gradient.

    ``advantages`` is ``(B,)`` or ``(B, T)``; ``importance_sampling_ratio`` is TRL's
    ``inputs["importance_sampling_ratio"]`` (``(B, T)`` or ``(B, 1)``); ``sampling_per_token_logps``
    feeds the off-policy mask (``get_off_policy_mask``), ``entropies`` the entropy mask
    (``get_high_entropy_mask``, the quantile over this batch's valid tokens). The KL estimator is
    TRL's k3 unless ``kl_estimator`` says otherwise (k1 = logp - ref, k2 = half its square: verl's
    names, not TRL options); ``max_completion_length`` must be given for dr_grpo (TRL's config).
    ``num_items_in_batch`` defaults to the valid-token count.

    Returns ``(loss, metrics)``: TRL's logged values under TRL's names, plus ours:
    ``clip_ratio/delta_mean`` (share of tokens where ``delta`` caps the ratio with A < 0) and
    ``ratio_mean`` / ``ratio_min`` / ``ratio_max`` (the importance ratio over valid tokens).
    """
    mask = completion_mask.to(per_token_logps.dtype)
    epsilon_low = epsilon
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if top_entropy_quantile < 1.0:
        local = entropies[mask.bool()].to(per_token_logps.dtype)
        if local.numel() == 0:
            entropy_mask = torch.zeros_like(mask, dtype=torch.bool)
        else:
            threshold = torch.quantile(local, 1 - top_entropy_quantile)
            entropy_mask = ((entropies * mask) >= threshold) & mask.bool()
    else:
        entropy_mask = None
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.to(per_token_logps.dtype)
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    if off_policy_mask_threshold is not None:
        sampling = old if sampling_per_token_logps is None else sampling_per_token_logps
        kl_div = torch.nan_to_num(sampling - per_token_logps.detach(), nan=0.0)
        avg_seq_kl = (kl_div * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
        off_policy_mask = ((advantages >= 0) | (avg_seq_kl <= off_policy_mask_threshold)).to(mask.dtype)
    log_ratio = per_token_logps - old
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    ratio = coef_1.detach()
    if beta != 0.0:
        diff = ref_per_token_logps - per_token_logps
        if kl_estimator == "k1":
            per_token_kl = -diff
        elif kl_estimator == "k2":
            per_token_kl = 0.5 * diff**2
        else:
            per_token_kl = torch.exp(diff) - diff - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=epsilon_high).detach() * advantages * per_token_logps
    elif loss_type in CLIPPED_LOSS_TYPES:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    elif loss_type == "sapo":
        temperatures = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token_loss = -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * advantages
    else:  # vespo
        with torch.no_grad():
            seq_log_ratio = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
            if importance_sampling_ratio is not None:
                log_is = torch.clamp(torch.log(importance_sampling_ratio), VESPO_LOG_MIN, VESPO_LOG_MAX)
                seq_log_ratio = seq_log_ratio + log_is.sum(-1, keepdim=True)
            log_w = torch.clamp(seq_log_ratio, VESPO_LOG_MIN, VESPO_LOG_MAX)
            nonneg = advantages >= 0
            k = torch.where(nonneg, vespo_k_pos, vespo_k_neg)
            lam = torch.where(nonneg, vespo_lambda_pos, vespo_lambda_neg).clamp(min=1e-4)
            phi_seq = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        per_token_loss = -phi_seq * advantages * per_token_logps
    if off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * off_policy_mask
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if importance_sampling_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * importance_sampling_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl

    if loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type in ("cispo", "dapo", "vespo"):
        normaliser = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=mask.dtype)
        loss = (per_token_loss * mask).sum() / normaliser.clamp(min=1.0)
    else:  # luspo
        loss = (per_token_loss * mask).sum(-1).mean()

    def masked_seq_mean(x):
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    def global_masked_mean(x):
        if x.shape[1] == 1:
            return x.sum() / x.shape[0]
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    with torch.no_grad():
        metrics = {"kl": global_masked_mean(per_token_kl) if beta != 0.0 else mask.sum() * 0}
        if entropies is not None:
            metrics["entropy"] = global_masked_mean(entropies.to(mask.dtype))
        coef = coef_1.detach()
        if loss_type in CLIPPED_LOSS_TYPES:
            low = ((coef < 1 - epsilon_low) & (advantages < 0)).to(mask.dtype)
            high = ((coef > 1 + epsilon_high) & (advantages > 0)).to(mask.dtype)
            metrics["clip_ratio/low_mean"] = global_masked_mean(low)
            metrics["clip_ratio/high_mean"] = global_masked_mean(high)
            metrics["clip_ratio/region_mean"] = global_masked_mean(((low + high) > 0).to(mask.dtype))
            metrics["clip_ratio/low_min"] = _nan_extreme(masked_seq_mean(low), largest=False)
            metrics["clip_ratio/high_max"] = _nan_extreme(masked_seq_mean(high), largest=True)
            if delta is not None:
                metrics["clip_ratio/delta_mean"] = global_masked_mean(((ratio > delta) & (advantages < 0)).to(mask.dtype))
        elif loss_type == "cispo":
            metrics["cispo_clip_ratio"] = global_masked_mean(((coef > epsilon_high) & (advantages > 0)).to(mask.dtype))
        elif loss_type == "vespo":
            metrics["vespo/phi_seq_mean"] = global_masked_mean(phi_seq)
        valid = mask.bool()
        ratio_t = ratio.expand_as(mask)
        count = mask.sum()
        metrics["ratio_mean"] = (ratio_t * mask).sum() / count.clamp(min=1.0)
        metrics["ratio_min"] = ratio_t[valid].min() if count > 0 else count * 0
        metrics["ratio_max"] = ratio_t[valid].max() if count > 0 else count * 0
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

    Float64 throughout. NaN rewards are unscorable (TRL): left out of their group's statistics,
    advantage 0. Rewards are shifted by their group's maximum before the two-pass mean and
    variance, so a group of identical rewards has exact zero deviations and gets exactly 0; a group
    with fewer than two scorable rewards gets 0 (TRL: its unbiased std is NaN, then 0).
    """
    r = rewards.to(torch.float64)
    scorable = ~torch.isnan(r)

    def centre(index, size):
        zeros = r.new_zeros(size)
        counts = zeros.index_add(0, index, scorable.to(r.dtype))
        pivot = torch.full_like(zeros, -torch.inf).scatter_reduce(0, index, torch.where(scorable, r, -torch.inf), "amax")
        shifted = torch.where(scorable, r - pivot[index], 0.0)
        centered = torch.where(scorable, shifted - (zeros.index_add(0, index, shifted) / counts.clamp(min=1))[index], 0.0)
        std = (zeros.index_add(0, index, centered**2) / (counts - 1).clamp(min=1)).sqrt()
        return centered, std[index], counts[index] > 1

    centered, group_std, enough = centre(group_index, num_groups)
    if scale == "group":
        centered = centered / (group_std + eps)
    elif scale == "batch":
        _, batch_std, batch_enough = centre(torch.zeros_like(group_index), 1)
        centered = centered / (batch_std + eps)
        enough = enough & batch_enough
    return torch.where(scorable & enough, centered, 0.0)


def segment_sum(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Per-row sums ``(num_rows,)`` of per-token ``values``, token t in row ``rows[t]``."""
    return values.new_zeros(num_rows).index_add_(0, rows, values)


def row_of_token(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Row index (int64) of each of ``num_tokens`` flat tokens, rows delimited by ``cu_seqlens``."""
    tokens = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True)


def _token_terms(logp, log_ratio, ref, adv, weight, opts: LossOptions):
    """Per-token ``(loss, direct, via_ratio, kl, clip_low, clip_high, clip_delta, ratio)``; see the
    module doc. ``adv`` and ``weight`` (the policy term's weight, or None) are per token."""
    ratio = torch.exp(log_ratio)
    zero = torch.zeros_like(ratio)
    clip_low = clip_high = clip_delta = torch.zeros_like(ratio, dtype=torch.bool)
    if opts.loss_type == "cispo":
        coef = torch.clamp(ratio, max=opts.epsilon_high)
        loss, direct, via_ratio = -coef * adv * logp, -coef * adv, zero
        clip_high = (ratio > opts.epsilon_high) & (adv > 0)
    elif opts.loss_type == "sapo":
        tau = torch.where(adv > 0, opts.sapo_temperature_pos, opts.sapo_temperature_neg).to(ratio.dtype)
        soft = torch.sigmoid(tau * (ratio - 1))
        loss, direct, via_ratio = -soft * 4 / tau * adv, zero, -4 * adv * soft * (1 - soft) * ratio
    elif opts.loss_type == "vespo":  # -phi * A * logp: phi (detached) is the weight
        loss, direct, via_ratio = -adv * logp, -adv, zero
    else:
        lo, hi = 1 - opts.epsilon_low, 1 + opts.epsilon_high
        unclipped, unclipped_pass = ratio, torch.ones_like(ratio)
        if opts.delta is not None:
            unclipped = torch.clamp(ratio, max=opts.delta)
            unclipped_pass = (ratio <= opts.delta).to(ratio.dtype)
            clip_delta = (ratio > opts.delta) & (adv < 0)
        clipped = torch.clamp(ratio, lo, hi)
        clipped_pass = ((ratio >= lo) & (ratio <= hi)).to(ratio.dtype)
        term1, term2 = unclipped * adv, clipped * adv
        # min(term1, term2) sends its gradient to the smaller term, half to each on a tie (autograd's rule).
        share1 = torch.where(term1 < term2, 1.0, torch.where(term1 == term2, 0.5, 0.0)).to(ratio.dtype)
        loss, direct = -torch.minimum(term1, term2), zero
        via_ratio = -adv * (share1 * unclipped_pass + (1 - share1) * clipped_pass) * ratio
        clip_low = (unclipped < lo) & (adv < 0)
        clip_high = (unclipped > hi) & (adv > 0)
    if weight is not None:
        loss, direct, via_ratio = loss * weight, direct * weight, via_ratio * weight
    kl = zero
    if opts.beta != 0.0:
        diff = ref - logp
        if opts.kl_estimator == "k1":
            kl, kl_direct = -diff, torch.ones_like(diff)
        elif opts.kl_estimator == "k2":
            kl, kl_direct = 0.5 * diff**2, -diff
        else:
            e = torch.exp(diff)
            kl, kl_direct = e - diff - 1, 1 - e
        if opts.use_bias_correction_kl:  # kl * ratio, the ratio not detached (TRL)
            via_ratio = via_ratio + opts.beta * kl * ratio
            kl, kl_direct = kl * ratio, kl_direct * ratio
        loss = loss + opts.beta * kl
        direct = direct + opts.beta * kl_direct
    return loss, direct, via_ratio, kl, clip_low, clip_high, clip_delta, ratio


def _prepare(logp, old, ref, weight, mask, cu_seqlens, advantages, opts):
    dtype = compute_dtype(logp.dtype)
    num_rows = cu_seqlens.numel() - 1
    rows = row_of_token(cu_seqlens, logp.numel())
    valid = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask != 0
    logp, old = logp.to(dtype), old.to(dtype)
    ref = ref.to(dtype) if opts.beta != 0.0 else None
    weight = None if weight is None else weight.to(dtype)
    diff = logp - old
    counts = segment_sum(valid.to(dtype), rows, num_rows)
    if opts.sequence_level:
        diff = (segment_sum(torch.where(valid, diff, 0.0), rows, num_rows) / counts.clamp(min=1))[rows]
    return logp, diff, ref, weight, valid, rows, num_rows, counts, advantages.to(dtype)


def loss_forward(logp, old, ref, weight, mask, cu_seqlens, advantages, opts: LossOptions) -> torch.Tensor:
    """Per-row partial sums ``(B, len(PARTIALS))`` of the loss terms over the row's valid tokens.

    ``logp, old, ref, weight, mask, advantages``: flat ``(N,)`` (``ref`` used when beta != 0,
    ``weight`` the policy term's weight or None, ``mask`` None = every token valid); row b is
    ``cu_seqlens[b]:cu_seqlens[b+1]``. Masked tokens contribute exactly nothing, whatever their values.
    """
    logp, log_ratio, ref, weight, valid, rows, num_rows, counts, adv = _prepare(
        logp, old, ref, weight, mask, cu_seqlens, advantages, opts)
    loss, _, _, kl, low, high, dclip, ratio = _token_terms(logp, log_ratio, ref, adv, weight, opts)

    def row_sum(x):
        return segment_sum(torch.where(valid, x.to(logp.dtype), 0.0), rows, num_rows)

    ratio_min = torch.full_like(counts, torch.inf).scatter_reduce(0, rows, torch.where(valid, ratio, torch.inf), "amin")
    ratio_max = torch.full_like(counts, -torch.inf).scatter_reduce(0, rows, torch.where(valid, ratio, -torch.inf), "amax")
    return torch.stack([row_sum(loss), counts, row_sum(kl), row_sum(low), row_sum(high), row_sum(dclip),
                        row_sum(ratio), ratio_min, ratio_max], 1)


def loss_backward(row_grad, logp, old, ref, weight, mask, cu_seqlens, advantages, opts: LossOptions) -> torch.Tensor:
    """dL/dlogp ``(N,)`` in logp's dtype, where L = sum_b row_grad[b] * (row b's summed loss)."""
    out_dtype = logp.dtype
    logp, log_ratio, ref, weight, valid, rows, num_rows, counts, adv = _prepare(
        logp, old, ref, weight, mask, cu_seqlens, advantages, opts)
    _, direct, via_ratio, *_ = _token_terms(logp, log_ratio, ref, adv, weight, opts)
    row_grad = row_grad.to(logp.dtype)[rows]
    if opts.sequence_level:
        # log s_b is the mean of the row's log-ratios: d log s_b / d logp_t = 1 / n_b.
        via_ratio = (segment_sum(torch.where(valid, row_grad * via_ratio, 0.0), rows, num_rows) / counts.clamp(min=1))[rows]
        grad = row_grad * direct + via_ratio
    else:
        grad = row_grad * (direct + via_ratio)
    return torch.where(valid, grad, 0.0).to(out_dtype)


def token_grad(logp, old, ref, advantages, weight, token_grad_weight, opts: LossOptions) -> torch.Tensor:
    """Token-level dL/dlogp of valid tokens (the one-pass fused-linear path): ``token_grad_weight``
    is each token's row upstream gradient; ``old`` None means the behaviour policy is the current
    one (ratio 1, gradient through it kept)."""
    dtype = logp.dtype
    log_ratio = logp - (logp if old is None else old.to(dtype))
    ref = ref.to(dtype) if opts.beta != 0.0 else None
    weight = None if weight is None else weight.to(dtype)
    _, direct, via_ratio, *_ = _token_terms(logp, log_ratio, ref, advantages.to(dtype), weight, opts)
    return token_grad_weight.to(dtype) * (direct + via_ratio)


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


def logits_stats_and_backward(logits, target_ids, inv_temperature, old, ref, advantages, weight, token_grad_weight,
                              opts):
    """One-pass chunk step: stats, the token-level GRPO gradient, and the logit gradient."""
    lse, logp, entropy = logits_stats(logits, target_ids, inv_temperature)
    grad = token_grad(logp, old, ref, advantages, weight, token_grad_weight, opts)
    return lse, logp, entropy, logits_backward(logits, target_ids, inv_temperature, lse, grad)
