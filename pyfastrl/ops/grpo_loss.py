"""``grpo_loss``: TRL's GRPO loss of per-token log-probs, as the ``pyfastrl::grpo_loss`` custom op
(+ ``pyfastrl::grpo_loss_backward``). Every backend (``pyfastrl.kernels.grpo_loss.reference`` for
``"torch"``, ``.kernel`` for ``"triton"``, ``.cuda`` for ``"cuda"``) reduces the row's tokens to
per-row partial sums; the aggregation and the metrics are plain PyTorch (``_grpo_common``). No host-device sync unless
``validate=True`` (then one).
"""
from __future__ import annotations

import torch

from pyfastrl._backend import require_device, resolve_backend
from pyfastrl.kernels import cuda_extension
from pyfastrl.kernels.grpo_loss import reference
from pyfastrl.kernels.grpo_loss.reference import PARTIALS, LossOptions
from pyfastrl.ops._grpo_common import (
    FLOAT_DTYPES,
    LossSetup,
    Validation,
    aggregate,
    bool_mask,
    check_tensor,
    check_triton_dtype,
    implementation,
    loss_arguments,
    metrics,
    policy_weights,
    same_shape,
)


@torch.library.custom_op("pyfastrl::grpo_loss", mutates_args=())
def _loss_op(
    logp: torch.Tensor,
    old: torch.Tensor,
    ref: torch.Tensor | None,
    weight: torch.Tensor | None,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    advantages: torch.Tensor,
    row_weight: torch.Tensor,
    loss_type: str,
    sequence_level: bool,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    beta: float,
    kl_estimator: str,
    use_bias_correction_kl: bool,
    sapo_temperature_pos: float,
    sapo_temperature_neg: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    opts = LossOptions(loss_type, sequence_level, epsilon_low, epsilon_high, delta, beta, kl_estimator,
                       use_bias_correction_kl, sapo_temperature_pos, sapo_temperature_neg)
    partials = implementation(backend).loss_forward(logp, old, ref, weight, mask, cu_seqlens, advantages, opts)
    return aggregate(partials, row_weight), partials


@_loss_op.register_fake
def _(logp, old, ref, weight, mask, cu_seqlens, advantages, row_weight, *args):
    dtype = reference.compute_dtype(logp.dtype)
    return logp.new_empty((), dtype=dtype), logp.new_empty((cu_seqlens.shape[0] - 1, len(PARTIALS)), dtype=dtype)


@torch.library.custom_op("pyfastrl::grpo_loss_backward", mutates_args=())
def _loss_backward_op(
    row_grad: torch.Tensor,
    logp: torch.Tensor,
    old: torch.Tensor,
    ref: torch.Tensor | None,
    weight: torch.Tensor | None,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    advantages: torch.Tensor,
    loss_type: str,
    sequence_level: bool,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    beta: float,
    kl_estimator: str,
    use_bias_correction_kl: bool,
    sapo_temperature_pos: float,
    sapo_temperature_neg: float,
    backend: str,
) -> torch.Tensor:
    opts = LossOptions(loss_type, sequence_level, epsilon_low, epsilon_high, delta, beta, kl_estimator,
                       use_bias_correction_kl, sapo_temperature_pos, sapo_temperature_neg)
    return implementation(backend).loss_backward(row_grad, logp, old, ref, weight, mask, cu_seqlens, advantages, opts)


@_loss_backward_op.register_fake
def _(row_grad, logp, *args):
    return torch.empty_like(logp)


def _loss_setup_context(ctx, inputs, output):
    logp, old, ref, weight, mask, cu_seqlens, advantages, row_weight, *options = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logp, old, ref, weight, mask, cu_seqlens, advantages, row_weight)
    ctx.options = options


def _loss_backward(ctx, grad_loss, grad_partials):
    logp, old, ref, weight, mask, cu_seqlens, advantages, row_weight = ctx.saved_tensors
    row_grad = (row_weight * grad_loss.to(row_weight.dtype)).contiguous()
    dlogp = _loss_backward_op(row_grad, logp, old, ref, weight, mask, cu_seqlens, advantages, *ctx.options)
    return (dlogp,) + (None,) * (8 + len(ctx.options) - 1)


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


def grpo_loss(
    per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    advantages: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    group_size: int | None = None,
    scale_rewards: str | bool = "group",
    old_per_token_logps: torch.Tensor | None = None,
    ref_per_token_logps: torch.Tensor | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    use_bias_correction_kl: bool = True,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    sampling_per_token_logps: torch.Tensor | None = None,
    vllm_importance_sampling_correction: bool = True,
    vllm_importance_sampling_mode: str = "sequence_mask",
    vllm_importance_sampling_clip_min: float | None = None,
    vllm_importance_sampling_clip_max: float | None = 3.0,
    off_policy_mask_threshold: float | None = None,
    top_entropy_quantile: float = 1.0,
    entropies: torch.Tensor | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    cu_seqlens: torch.Tensor | None = None,
    validate: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL 1.16's GRPO loss (``GRPOTrainer._compute_loss``) of per-token log-probs, with its metrics.

    Option names and defaults are those of TRL's ``GRPOConfig``; with the same inputs the loss, its
    gradient and the metrics are TRL's (one process, one accumulation step: TRL's trainer further
    divides by its gradient-accumulation count, and its metrics gather over processes).

    Args:
        per_token_logps: ``(B, T)`` log-probs of the sampled completion tokens under the current
            policy (fp16/bf16/fp32; fp64 on the torch backend), or ``(N,)`` packed with ``cu_seqlens``.
        completion_mask: same shape; nonzero marks the tokens that count (TRL's ``completion_mask``
            times its ``tool_mask``). Masked tokens contribute exactly nothing, whatever their values.
        advantages: ``(B,)`` per completion, or per token (the shape of ``per_token_logps``); or instead
        rewards, group_size, scale_rewards: ``(B,)`` rewards normalised inside with ``grpo_advantages``
            (on the device by the extension's kernel with ``backend="cuda"``).
        old_per_token_logps: behaviour-policy log-probs; None means on-policy (``old =
            per_token_logps.detach()``: ratio 1, loss often 0, gradient not).
        ref_per_token_logps: reference-policy log-probs for the KL term (needed when ``beta > 0``).
        loss_type: TRL's: ``"grpo"`` and ``"sapo"`` (per-sequence token mean, then mean over rows),
            ``"bnpo"`` (token mean of this batch), ``"dapo"``, ``"cispo"`` and ``"vespo"`` (token sum /
            ``num_items_in_batch``, default the valid-token count), ``"dr_grpo"`` (token sum / (B *
            ``max_completion_length``)), ``"luspo"`` (per-sequence token sum, mean over rows). Token
            loss: the clipped surrogate ``-min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A)``
            (grpo, bnpo, dr_grpo, dapo, luspo); cispo ``-sg(min(r, epsilon_high)) A logp``; sapo
            ``-sigmoid(tau (r - 1)) 4 / tau A`` (tau = ``sapo_temperature_pos`` for A > 0, else
            ``_neg``); vespo ``-sg(phi) A logp``, phi = ``e^lam w^k e^(-lam w)`` of the sequence's
            importance weight w (``vespo_k_pos`` / ``vespo_lambda_pos`` for A >= 0, else ``_neg``).
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO: one ratio per row, the exp
            of the row's mean log-ratio).
        epsilon, epsilon_high: clip range ``[1 - epsilon, 1 + epsilon_high]``; ``epsilon_high``
            None means ``epsilon`` (cispo: ``epsilon_high`` is the cap itself).
        delta: two-sided clip: caps the unclipped ratio at ``delta`` (> 1); clipped losses only.
        beta, kl_estimator, use_bias_correction_kl: KL weight; estimator ``"k3"`` (TRL's:
            ``e^(ref-logp) - (ref-logp) - 1``) or verl's ``"k1"`` (logp - ref) / ``"k2"`` (half its
            square); multiplied by the (not detached) ratio when ``use_bias_correction_kl`` (TRL's
            default True).
        max_completion_length: dr_grpo's normaliser (TRL's ``GRPOConfig.max_completion_length``);
            required for dr_grpo, since the padded width is not what TRL divides by.
        num_items_in_batch: dapo/cispo/vespo normaliser (number or 1-element tensor), clamped to
            at least 1 as TRL does; default: this call's valid-token count. Pass the global count
            when micro-batching, so the micro-batch losses sum to the full batch's.
        importance_sampling_ratio: TRL's ``inputs["importance_sampling_ratio"]`` (vLLM rollout
            correction; Liger's ``vllm_is_ratio``, verl's ``rollout_is_weights``), per token or
            per sequence ``(B,)`` / ``(B, 1)``; multiplies the policy term (vespo: enters phi).
        sampling_per_token_logps: the rollout engine's log-probs. With
            ``vllm_importance_sampling_correction`` (default True, as TRL's with vLLM) and no
            ``importance_sampling_ratio``, the ratio is computed as TRL does: ``exp(old - sampling)``
            per token or per sequence (summed), per ``vllm_importance_sampling_mode``
            (``"token_truncate"``, ``"token_mask"``, ``"sequence_truncate"``, ``"sequence_mask"``)
            truncated to, or zeroed outside, ``[vllm_importance_sampling_clip_min,
            vllm_importance_sampling_clip_max]``. Also the off-policy mask's behaviour policy.
        off_policy_mask_threshold: drop sequences with A < 0 whose mean ``sampling - logp`` exceeds it.
        top_entropy_quantile, entropies: below 1, only tokens whose entropy (``entropies``, like
            ``per_token_logps``) is at or above that quantile of this call's valid tokens get the
            policy term (TRL takes the quantile over every process's tokens).
        cu_seqlens: ``(B+1,)`` int row offsets for the packed ``(N,)`` form.
        validate: check values (rewards finite, ``cu_seqlens`` consistent) in one host-device sync.
            Off by default: the call never syncs.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (the CUDA extension's kernels,
            ``csrc/grpo_loss``: rows of any length spread over the whole GPU; needs
            ``PYFASTRL_BUILD_CUDA=1 pip install -e .``). ``"auto"``: triton on CUDA, torch on CPU.

    Returns:
        ``(loss, metrics)``: the scalar loss (fp32; fp64 for fp64 log-probs), differentiable in
        ``per_token_logps`` only; ``metrics`` detached 0-d tensors named as TRL logs them: ``kl``
        (0 when beta = 0), ``entropy`` (with ``entropies``), for clipped losses
        ``clip_ratio/low_mean``, ``/high_mean``, ``/region_mean``, ``/low_min``, ``/high_max``
        (and ours, ``clip_ratio/delta_mean``: share where ``delta`` caps a ratio with A < 0),
        ``cispo_clip_ratio``, ``vespo/phi_seq_mean``; plus ``ratio_mean`` / ``ratio_min`` /
        ``ratio_max`` over valid tokens. Means follow TRL: over valid tokens, or over sequences
        (fully masked ones included) for sequence-level ratios with ``(B,)`` advantages.
    """
    op = "grpo_loss"
    check_tensor(op, "per_token_logps", per_token_logps, (1, 2), FLOAT_DTYPES)
    device = per_token_logps.device
    backend = resolve_backend(op, backend, device, check_device=False)
    check_triton_dtype(op, backend, "per_token_logps", per_token_logps.dtype)
    valid = bool_mask(op, completion_mask, per_token_logps, "per_token_logps").reshape(-1).contiguous()
    dtype = reference.compute_dtype(per_token_logps.dtype)
    validation = Validation(op, validate)
    # Rewards are normalised by the CUDA kernel with the cuda backend; where that cannot run,
    # require_device below says so after the remaining argument checks.
    cuda_advantages = backend == "cuda" and cuda_extension.device_unavailable_reason(device) is None
    setup = LossSetup(op, per_token_logps, "per_token_logps", valid, cu_seqlens, dtype, validation,
                      advantages_backend="cuda" if cuda_advantages else "torch", **loss_arguments(locals()))
    same_shape(op, "entropies", entropies, per_token_logps, "per_token_logps")
    if setup.stage.top_entropy_quantile < 1.0 and entropies is None:
        raise ValueError(f"{op}: top_entropy_quantile < 1 masks tokens by entropy: pass entropies")
    require_device(op, backend, device)  # after the argument checks: those errors come first anywhere
    validation.read()
    flat = per_token_logps.reshape(-1).contiguous()
    detached = flat.detach().to(dtype)
    flat_entropy = None if entropies is None else entropies.detach().reshape(-1)
    weight, phi_metric = policy_weights(detached, flat_entropy, valid, setup.rows, setup.counts, setup.old,
                                        setup.sampling, setup.advantages, setup.row_advantages, setup.is_weight,
                                        setup.vespo_log_is, setup.opts.loss_type, setup.stage)
    old = detached if setup.old is None else setup.old
    loss, partials = _loss_op(flat, old, setup.ref, weight, valid, setup.cu_seqlens, setup.advantages,
                              setup.row_weights, *setup.opts, backend)
    out = metrics(partials, setup.opts, setup.row_advantages)
    if flat_entropy is not None:
        out["entropy"] = torch.where(valid, flat_entropy.to(dtype), 0.0).sum() / valid.sum().clamp(min=1)
    if phi_metric is not None:
        out["vespo/phi_seq_mean"] = phi_metric
    return loss, out
