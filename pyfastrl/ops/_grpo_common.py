"""What the GRPO ops share: input checks, TRL's options, the per-token policy weights, aggregation
weights and metrics. Backend-independent plain PyTorch; no host-device sync unless ``validate=True``
(then exactly one, for all value checks together).

The ops reduce every option to what the backends see (``reference.LossOptions`` and a few flat
per-token tensors):

* advantages per token ``(N,)`` (a ``(B,)`` input is repeated over its row's tokens);
* the policy term's per-token weight (TRL multiplies ``per_token_loss`` by it before adding the
  KL term): the vLLM importance-sampling ratio, the off-policy sequence mask, the entropy mask and
  VESPO's phi, or None when none applies (``policy_weights``);
* each row's aggregation weight (``row_weights``): the loss is ``sum_b w_b * sum_t m_bt l_bt``.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple

import torch

from pyfastrl.kernels.grpo_loss import reference
from pyfastrl.kernels.grpo_loss.reference import (
    CLIPPED_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    PARTIALS,
    VESPO_LOG_MAX,
    VESPO_LOG_MIN,
    VLLM_IMPORTANCE_SAMPLING_MODES,
    LossOptions,
    segment_sum,
)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def triton_kernels():
    # Imported on first use: importing Triton is slow, and TRITON_INTERPRET must be set first.
    from pyfastrl.kernels.grpo_loss import kernel

    return kernel


def cuda_kernels():
    from pyfastrl.kernels.grpo_loss import cuda

    return cuda


def implementation(backend: str):
    if backend == "triton":
        return triton_kernels()
    return cuda_kernels() if backend == "cuda" else reference


def check_triton_dtype(op: str, backend: str, name: str, dtype: torch.dtype) -> None:
    """The kernel backends (triton, cuda) take fp16/bf16/fp32; torch also fp64."""
    if backend in ("triton", "cuda") and dtype not in implementation(backend).SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: backend {backend!r} supports {implementation(backend).SUPPORTED_DTYPES} for {name}, "
            f"got {dtype}; use backend='torch'"
        )


# ----------------------------------------------------------------------------- checks


def check_tensor(op: str, name: str, t, dims: tuple[int, ...], dtypes, device=None) -> torch.Tensor:
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


def same_shape(op: str, name: str, t, like: torch.Tensor, like_name: str, dtypes=FLOAT_DTYPES):
    if t is None:
        return None
    check_tensor(op, name, t, (like.dim(),), dtypes, like.device)
    if t.shape != like.shape:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but {like_name} has {tuple(like.shape)}")
    return t


def bool_mask(op: str, mask, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """``completion_mask`` as bool (nonzero = the token counts), shape-checked against ``like``."""
    same_shape(op, "completion_mask", mask, like, like_name, dtypes=None)
    if mask.is_complex():
        raise TypeError(f"{op}: completion_mask must be bool, integer or floating, got {mask.dtype}")
    return mask if mask.dtype == torch.bool else mask != 0


def number(op: str, name: str, value, *, above: float | None = None, at_least: float | None = None,
           integer: bool = False, optional: bool = False):
    """``value`` if it is a finite real number in range (``> above``, ``>= at_least``), else ValueError."""
    if value is None and optional:
        return None
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "an integer" if integer else "a finite number"
        bound = f" > {above:g}" if above is not None else f" >= {at_least:g}" if at_least is not None else ""
        raise ValueError(f"{op}: {name} must be {kind}{bound}{' or None' if optional else ''}, got {value!r}")
    return value


class Validation:
    """Value checks (``validate=True``) gathered and read in one host-device sync.

    ``add(bad, message)``: ``bad`` a 0-d bool tensor, ``message()`` the error (may sync: only on the
    error path). ``read(*counts)`` syncs once and returns the integer ``counts`` read with them."""

    def __init__(self, op: str, enabled: bool):
        self.op, self.enabled, self.checks = op, enabled and not torch.compiler.is_compiling(), []

    def add(self, bad: torch.Tensor, message) -> None:
        if self.enabled:
            self.checks.append((bad, message))

    def read(self, *counts: torch.Tensor) -> list[int]:
        values = [c.reshape(()).to(torch.int64) for c in counts] + [b.reshape(()).to(torch.int64) for b, _ in self.checks]
        if not values:
            return []
        host = torch.stack([v.to(values[0].device) for v in values]).tolist()
        for (_, message), bad in zip(self.checks, host[len(counts):]):
            if bad:
                raise ValueError(f"{self.op}: {message()}")
        return host[:len(counts)]


def check_cu_seqlens(op: str, cu_seqlens, num_tokens: int, device, validation: Validation) -> torch.Tensor:
    check_tensor(op, "cu_seqlens", cu_seqlens, (1,), INDEX_DTYPES, device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must hold B+1 >= 2 offsets, got {cu_seqlens.numel()}")
    # Compared with Python numbers: a tensor built from host numbers would be a copy to the device (a sync).
    validation.add((cu_seqlens[0] != 0) | (cu_seqlens[-1] != num_tokens),
                   lambda: f"cu_seqlens must start at 0 and end at the number of tokens ({num_tokens}), "
                           f"got {cu_seqlens[0].item()} ... {cu_seqlens[-1].item()}")
    steps = cu_seqlens[1:] - cu_seqlens[:-1]
    validation.add((steps < 0).any(),
                   lambda: f"cu_seqlens must be non-decreasing, but cu_seqlens[{int((steps < 0).nonzero()[0]) + 1}] "
                           f"< cu_seqlens[{int((steps < 0).nonzero()[0])}]")
    return cu_seqlens.to(torch.int32)


# ----------------------------------------------------------------------------- options


class StageOptions(NamedTuple):
    """Options of the per-token policy weights that need the current log-probs (``policy_weights``)."""

    off_policy_mask_threshold: float | None
    top_entropy_quantile: float
    vespo_k_pos: float
    vespo_lambda_pos: float
    vespo_k_neg: float
    vespo_lambda_neg: float

    def needs_logprobs(self, loss_type: str) -> bool:
        return self.off_policy_mask_threshold is not None or self.top_entropy_quantile < 1.0 or loss_type == "vespo"


def scale_rewards_name(op: str, scale_rewards) -> str:
    """TRL's ``scale_rewards``: "group" | "batch" | "none", or True (= "group") / False (= "none")."""
    if scale_rewards is True or scale_rewards is False:
        return "group" if scale_rewards else "none"
    if scale_rewards not in reference.ADVANTAGE_SCALES:
        raise ValueError(f"{op}: scale_rewards must be one of {reference.ADVANTAGE_SCALES} or True/False, "
                         f"got {scale_rewards!r}")
    return scale_rewards


def loss_options(op, *, loss_type, importance_sampling_level, epsilon, epsilon_high, delta, beta, kl_estimator,
                 use_bias_correction_kl, sapo_temperature_pos, sapo_temperature_neg, has_ref) -> LossOptions:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"{op}: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"{op}: importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"{op}: kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if not isinstance(use_bias_correction_kl, bool):
        raise TypeError(f"{op}: use_bias_correction_kl must be True or False, got {use_bias_correction_kl!r}")
    number(op, "epsilon", epsilon, at_least=0.0)
    if epsilon >= 1.0:
        raise ValueError(f"{op}: epsilon must be in [0, 1), got {epsilon!r}")
    epsilon_high = epsilon if epsilon_high is None else number(op, "epsilon_high", epsilon_high, at_least=0.0)
    if loss_type == "cispo" and epsilon_high <= 0.0:
        raise ValueError(f"{op}: loss_type 'cispo' caps the ratio at epsilon_high, which must be > 0, "
                         f"got {epsilon_high!r}")
    number(op, "delta", delta, above=1.0, optional=True)
    number(op, "beta", beta, at_least=0.0)
    number(op, "sapo_temperature_pos", sapo_temperature_pos, above=0.0)
    number(op, "sapo_temperature_neg", sapo_temperature_neg, above=0.0)
    if beta > 0.0 and not has_ref:
        raise ValueError(f"{op}: beta={beta} > 0 adds a KL term to the reference policy: pass ref_per_token_logps")
    return LossOptions(loss_type, importance_sampling_level == "sequence", float(epsilon), float(epsilon_high),
                       None if delta is None else float(delta), float(beta), kl_estimator, use_bias_correction_kl,
                       float(sapo_temperature_pos), float(sapo_temperature_neg))


def stage_options(op, *, off_policy_mask_threshold, top_entropy_quantile, vespo_k_pos, vespo_lambda_pos,
                  vespo_k_neg, vespo_lambda_neg) -> StageOptions:
    number(op, "off_policy_mask_threshold", off_policy_mask_threshold, optional=True)
    number(op, "top_entropy_quantile", top_entropy_quantile, at_least=0.0)
    if top_entropy_quantile > 1.0:
        raise ValueError(f"{op}: top_entropy_quantile must be in [0, 1], got {top_entropy_quantile!r}")
    for name, value in (("vespo_k_pos", vespo_k_pos), ("vespo_lambda_pos", vespo_lambda_pos),
                        ("vespo_k_neg", vespo_k_neg), ("vespo_lambda_neg", vespo_lambda_neg)):
        number(op, name, value)
    return StageOptions(None if off_policy_mask_threshold is None else float(off_policy_mask_threshold),
                        float(top_entropy_quantile), float(vespo_k_pos), float(vespo_lambda_pos),
                        float(vespo_k_neg), float(vespo_lambda_neg))


# The loss options every public loss takes (named, and defaulting, as TRL 1.16's GRPOConfig).
LOSS_ARGUMENTS = (
    "advantages", "rewards", "group_size", "scale_rewards", "old_per_token_logps", "ref_per_token_logps",
    "loss_type", "importance_sampling_level", "epsilon", "epsilon_high", "delta", "beta", "kl_estimator",
    "use_bias_correction_kl", "max_completion_length", "num_items_in_batch", "importance_sampling_ratio",
    "sampling_per_token_logps", "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
    "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max", "off_policy_mask_threshold",
    "top_entropy_quantile", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos",
    "vespo_k_neg", "vespo_lambda_neg",
)


def loss_arguments(arguments: dict) -> dict:
    """The loss options among a public function's arguments (both public losses take all of them)."""
    return {name: arguments[name] for name in LOSS_ARGUMENTS}


# ----------------------------------------------------------------------------- setup


def _row_counts(valid: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Valid tokens per row (int64), from the flat bool mask and the row offsets."""
    running = torch.cat([valid.new_zeros(1, dtype=torch.int64), valid.to(torch.int64).cumsum(0)])
    return running[cu_seqlens[1:].long()] - running[cu_seqlens[:-1].long()]


class LossSetup:
    """Checks and derived inputs shared by ``grpo_loss`` and ``fused_linear_grpo_loss``.

    ``tokens`` is the per-token tensor the others must match (padded ``(B, T)`` or packed ``(N,)``
    with ``cu_seqlens``); ``valid`` its flat bool mask. Provides ``cu_seqlens`` (int32 row offsets),
    ``rows`` (each token's row), ``opts``, ``stage``, ``advantages`` (per token, compute dtype),
    ``row_advantages`` (``(B,)`` or None for per-token input), per-row valid ``counts``, the
    aggregation ``row_weights``, the flat detached ``old`` / ``ref`` / ``sampling`` (None when
    absent or unused), ``is_weight`` (the importance-sampling ratio per token, or None) and
    ``vespo_log_is`` (VESPO's per-row log importance weight, or None). ``advantages_backend``
    (``"torch"`` or ``"cuda"``) normalises ``rewards`` (``grpo_advantages``' backends)."""

    def __init__(self, op, tokens, tokens_name, valid, cu_seqlens, dtype, validation: Validation, *, advantages,
                 rewards, group_size, scale_rewards, old_per_token_logps, ref_per_token_logps, max_completion_length,
                 num_items_in_batch, importance_sampling_ratio, sampling_per_token_logps,
                 vllm_importance_sampling_correction, vllm_importance_sampling_mode, vllm_importance_sampling_clip_min,
                 vllm_importance_sampling_clip_max, off_policy_mask_threshold, top_entropy_quantile, vespo_k_pos,
                 vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg, advantages_backend="torch", **options):
        from pyfastrl.ops.grpo_advantages import group_advantages

        device = tokens.device
        if tokens.dim() == 2:
            if cu_seqlens is not None:
                raise ValueError(f"{op}: cu_seqlens goes with the packed form, not padded (B, T) {tokens_name}")
            num_rows, length = tokens.shape
            self.cu_seqlens = torch.arange(num_rows + 1, device=device, dtype=torch.int32) * length
        else:
            if cu_seqlens is None:
                raise ValueError(f"{op}: packed {tokens_name} (N,) need cu_seqlens (B+1,) row offsets")
            self.cu_seqlens = check_cu_seqlens(op, cu_seqlens, tokens.shape[0], device, validation)
            num_rows = self.cu_seqlens.numel() - 1
        num_tokens = valid.numel()
        # Clamped so that offsets that fail validation (read later, in the one sync) cannot index out of range.
        self.rows = reference.row_of_token(self.cu_seqlens, num_tokens).clamp_(max=num_rows - 1)
        old = same_shape(op, "old_per_token_logps", old_per_token_logps, tokens, tokens_name)
        ref = same_shape(op, "ref_per_token_logps", ref_per_token_logps, tokens, tokens_name)
        sampling = same_shape(op, "sampling_per_token_logps", sampling_per_token_logps, tokens, tokens_name)
        self.opts = loss_options(op, has_ref=ref is not None, **options)
        self.stage = stage_options(op, off_policy_mask_threshold=off_policy_mask_threshold,
                                   top_entropy_quantile=top_entropy_quantile, vespo_k_pos=vespo_k_pos,
                                   vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                                   vespo_lambda_neg=vespo_lambda_neg)
        if self.opts.loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError(f"{op}: loss_type 'dr_grpo' divides by B * max_completion_length (TRL's "
                             "GRPOConfig.max_completion_length): pass max_completion_length")
        number(op, "max_completion_length", max_completion_length, above=0.0, integer=True, optional=True)

        # Advantages: (B,) per row, or per token (the shape of the tokens).
        if (advantages is None) == (rewards is None):
            raise ValueError(f"{op}: pass exactly one of advantages or rewards (B,) with group_size")
        if rewards is not None:
            check_tensor(op, "rewards", rewards, (1,), None, device)
            if rewards.numel() != num_rows:
                raise ValueError(f"{op}: rewards has {rewards.numel()} entries but there are {num_rows} rows")
            if group_size is None:
                raise ValueError(f"{op}: rewards need group_size (completions per prompt) to be normalised")
            advantages = group_advantages(rewards, group_size, None, scale_rewards, 1e-4, validation,
                                          advantages_backend, op)
        elif group_size is not None:
            raise ValueError(f"{op}: group_size goes with rewards; advantages are already normalised")
        check_tensor(op, "advantages", advantages, (1, 2), FLOAT_DTYPES, device)
        if advantages.dim() == 1 and advantages.numel() == num_rows:
            self.row_advantages = advantages.to(dtype)
            self.advantages = self.row_advantages[self.rows]
        elif advantages.shape == tokens.shape:
            self.row_advantages = None
            self.advantages = advantages.reshape(-1).to(dtype)
        else:
            raise ValueError(f"{op}: advantages has shape {tuple(advantages.shape)}; expected ({num_rows},) per row "
                             f"or {tuple(tokens.shape)} per token")
        self.advantages = self.advantages.contiguous()

        self.counts = _row_counts(valid, self.cu_seqlens)
        self.row_weights = row_weights(op, self.counts, self.opts.loss_type, dtype, max_completion_length,
                                       num_items_in_batch)
        self.old = None if old is None else old.detach().reshape(-1).to(dtype).contiguous()
        self.ref = None if self.opts.beta == 0.0 else ref.detach().reshape(-1).contiguous()
        self.sampling = None if sampling is None else sampling.detach().reshape(-1).to(dtype).contiguous()
        self._importance_sampling(op, tokens, valid, dtype, importance_sampling_ratio, vllm_importance_sampling_correction,
                                  vllm_importance_sampling_mode, vllm_importance_sampling_clip_min,
                                  vllm_importance_sampling_clip_max)

    def _importance_sampling(self, op, tokens, valid, dtype, ratio, correction, mode, clip_min, clip_max):
        """``is_weight`` / ``vespo_log_is`` from TRL's ``importance_sampling_ratio``, or computed as TRL's
        ``_generate_and_score_completions`` does from old and sampling log-probs."""
        if mode not in VLLM_IMPORTANCE_SAMPLING_MODES:
            raise ValueError(f"{op}: vllm_importance_sampling_mode must be one of {VLLM_IMPORTANCE_SAMPLING_MODES}, "
                             f"got {mode!r}")
        number(op, "vllm_importance_sampling_clip_min", clip_min, at_least=0.0, optional=True)
        number(op, "vllm_importance_sampling_clip_max", clip_max, at_least=0.0, optional=True)
        if not isinstance(correction, bool):
            raise TypeError(f"{op}: vllm_importance_sampling_correction must be True or False, got {correction!r}")
        num_rows = self.counts.numel()
        per_row = None
        if ratio is not None:
            check_tensor(op, "importance_sampling_ratio", ratio, (1, 2), FLOAT_DTYPES, tokens.device)
            if ratio.shape == tokens.shape:
                per_row = False
            elif ratio.numel() == num_rows and ratio.shape in ((num_rows,), (num_rows, 1)):
                per_row = True
            else:
                raise ValueError(f"{op}: importance_sampling_ratio has shape {tuple(ratio.shape)}; expected "
                                 f"{tuple(tokens.shape)} per token or ({num_rows},) / ({num_rows}, 1) per sequence")
            ratio = ratio.detach().reshape(-1).to(dtype)
        elif self.sampling is not None and correction:
            if self.old is None:
                raise ValueError(f"{op}: the vLLM importance-sampling ratio exp(old - sampling) needs "
                                 "old_per_token_logps (or pass vllm_importance_sampling_correction=False)")
            per_row = mode.startswith("sequence")
            if self.opts.loss_type == "vespo" and per_row:
                raise ValueError(f"{op}: loss_type 'vespo' needs a token-level vllm_importance_sampling_mode "
                                 f"('token_truncate' or 'token_mask'), got {mode!r}")
            diff = torch.nan_to_num(torch.where(valid, self.old - self.sampling, 0.0), nan=0.0)
            if per_row:
                diff = segment_sum(diff, self.rows, num_rows)
            ratio = torch.exp(diff)
            if mode.endswith("truncate"):
                ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
            else:
                low = -math.inf if clip_min is None else clip_min
                high = math.inf if clip_max is None else clip_max
                ratio = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
        self.is_weight = self.vespo_log_is = None
        if ratio is None:
            return
        if self.opts.loss_type == "vespo":  # TRL folds it into phi, in log space
            log_is = torch.clamp(torch.log(ratio), VESPO_LOG_MIN, VESPO_LOG_MAX)
            self.vespo_log_is = log_is if per_row else segment_sum(torch.where(valid, log_is, 0.0), self.rows, num_rows)
        else:
            self.is_weight = (ratio[self.rows] if per_row else ratio).contiguous()


def row_weights(op, counts: torch.Tensor, loss_type: str, dtype, max_completion_length, num_items_in_batch):
    """Weight of each row's summed token losses in the aggregate loss (TRL's ``_compute_loss``)."""
    counts = counts.to(dtype)
    num_rows = counts.numel()
    if loss_type in ("grpo", "sapo"):
        return 1.0 / (num_rows * counts.clamp(min=1))
    if loss_type == "luspo":
        return torch.full_like(counts, 1.0 / max(num_rows, 1))
    if loss_type == "bnpo":
        normaliser = counts.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        normaliser = torch.full((), float(num_rows * max_completion_length), dtype=dtype, device=counts.device)
    elif num_items_in_batch is None:
        normaliser = counts.sum().clamp(min=1)
    elif isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"{op}: num_items_in_batch must be a number or a 1-element tensor")
        normaliser = num_items_in_batch.reshape(()).to(device=counts.device, dtype=dtype).clamp(min=1)
    else:
        value = number(op, "num_items_in_batch", num_items_in_batch, at_least=0.0)
        # torch.full, not torch.tensor: a fill kernel rather than a copy from the host (a sync).
        normaliser = torch.full((), max(float(value), 1.0), dtype=dtype, device=counts.device)
    return (1.0 / normaliser).expand(num_rows).contiguous()


def aggregate(partials: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """The loss: each row's summed token losses times its aggregation weight, summed."""
    return (row_weights.to(partials.dtype) * partials[:, 0]).sum()


# ----------------------------------------------------------------------------- policy weights


def _quantile(values: torch.Tensor, valid: torch.Tensor, q: float):
    """``torch.quantile`` (linear) of ``values[valid]`` without the sync a boolean index makes;
    also returns the number of valid values (0-d)."""
    n = valid.sum()
    ordered = torch.where(valid, values, torch.inf).sort().values
    rank = q * (n - 1).clamp(min=0).to(values.dtype)
    below = rank.floor()
    low = ordered.gather(0, below.long().reshape(1))
    high = ordered.gather(0, rank.ceil().long().reshape(1))
    return torch.lerp(low, high, (rank - below).reshape(1)).reshape(()), n


def policy_weights(logp, entropy, valid, rows, counts, old, sampling, advantages, row_advantages, is_weight,
                   vespo_log_is, loss_type: str, stage: StageOptions):
    """The policy term's per-token weight ``(N,)`` (or None) and VESPO's phi metric (0-d or None).

    TRL multiplies ``per_token_loss`` by the off-policy sequence mask (``get_off_policy_mask``), the
    entropy mask (``get_high_entropy_mask``: tokens at or above the ``1 - top_entropy_quantile``
    quantile of the valid tokens' entropies) and the importance-sampling ratio; VESPO's loss is
    ``-phi * A * logp`` with phi (``get_gamma_weights``) from the row's summed log-ratio. ``logp``
    is detached; ``valid`` None means every token is valid; everything is in logp's dtype."""
    dtype = logp.dtype
    num_rows = counts.numel()
    valid_t = torch.ones_like(logp, dtype=torch.bool) if valid is None else valid
    counts = counts.to(dtype)
    old = logp if old is None else old
    factors, phi_metric = [], None
    if is_weight is not None:
        factors.append(is_weight)
    if stage.off_policy_mask_threshold is not None:
        kl = torch.nan_to_num((old if sampling is None else sampling) - logp, nan=0.0)
        row_kl = segment_sum(torch.where(valid_t, kl, 0.0), rows, num_rows) / counts.clamp(min=1)
        factors.append(((advantages >= 0) | (row_kl[rows] <= stage.off_policy_mask_threshold)).to(dtype))
    if stage.top_entropy_quantile < 1.0:
        threshold, n = _quantile(entropy.to(dtype), valid_t, 1.0 - stage.top_entropy_quantile)
        factors.append((valid_t & (entropy.to(dtype) >= threshold) & (n > 0)).to(dtype))
    if loss_type == "vespo":
        log_ratio = torch.clamp(logp - old, -20.0, 20.0)
        seq = segment_sum(torch.where(valid_t, log_ratio, 0.0), rows, num_rows)
        if vespo_log_is is not None:
            seq = seq + vespo_log_is
        log_w = torch.clamp(seq, VESPO_LOG_MIN, VESPO_LOG_MAX)

        def phi(log_w, adv):
            nonneg = adv >= 0
            k = torch.where(nonneg, stage.vespo_k_pos, stage.vespo_k_neg).to(dtype)
            lam = torch.where(nonneg, stage.vespo_lambda_pos, stage.vespo_lambda_neg).to(dtype).clamp(min=1e-4)
            return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)

        if row_advantages is not None:  # one phi per sequence; the metric averages over every row
            row_phi = phi(log_w, row_advantages)
            phi_metric = row_phi.sum() / max(num_rows, 1)
            token_phi = row_phi[rows]
        else:
            token_phi = phi(log_w[rows], advantages)
            phi_metric = torch.where(valid_t, token_phi, 0.0).sum() / counts.sum().clamp(min=1)
        factors.append(token_phi)
    if not factors:
        return None, phi_metric
    weight = factors[0]
    for factor in factors[1:]:
        weight = weight * factor
    return weight.contiguous(), phi_metric


# ----------------------------------------------------------------------------- metrics


def _nan_extreme(x: torch.Tensor, largest: bool) -> torch.Tensor:
    """Min / max ignoring NaN; NaN when every value is NaN (TRL's ``nanmin`` / ``nanmax``)."""
    if x.numel() == 0:
        return x.new_full((), float("nan"))
    fill = -torch.inf if largest else torch.inf
    filled = torch.where(torch.isnan(x), fill, x)
    value = filled.max() if largest else filled.min()
    return torch.where(torch.isnan(x).all(), torch.nan, value)


def metrics(partials: torch.Tensor, opts: LossOptions, row_advantages) -> dict[str, torch.Tensor]:
    """TRL's logged loss metrics (``_compute_loss``) from the per-row partial sums.

    Token-valued flags (token-level ratios, or per-token advantages) are averaged over valid tokens;
    sequence-valued ones (sequence-level ratios with ``(B,)`` advantages) over sequences, fully
    masked ones included (TRL's ``global_masked_mean``). ``clip_ratio/low_min`` / ``high_max`` are
    the extremes of the per-sequence means (NaN when there are none, as TRL's ``nanmin``)."""
    p = partials.detach()
    column = {name: p[:, i] for i, name in enumerate(PARTIALS)}
    tokens = column["tokens"]
    total = tokens.sum()
    denom = total.clamp(min=1)
    num_rows = p.shape[0]
    per_sequence = opts.sequence_level and row_advantages is not None

    def per_row(values, empty=None):
        if per_sequence:  # each valid token of a row carries the row's flag
            flag = values / tokens.clamp(min=1)
            return flag if empty is None else torch.where(tokens > 0, flag, empty)
        return values / tokens  # NaN for fully masked rows, left out of the min / max

    def mean(values, empty=None):
        if per_sequence:
            return per_row(values, empty).sum() / max(num_rows, 1)
        return values.sum() / denom

    out = {"kl": column["kl"].sum() / denom}
    low, high = column["clip_low"], column["clip_high"]
    if opts.loss_type in CLIPPED_LOSS_TYPES:
        out["clip_ratio/low_mean"] = mean(low)
        out["clip_ratio/high_mean"] = mean(high)
        out["clip_ratio/region_mean"] = mean(low + high)
        out["clip_ratio/low_min"] = _nan_extreme(per_row(low), largest=False)
        out["clip_ratio/high_max"] = _nan_extreme(per_row(high), largest=True)
        if opts.delta is not None:
            out["clip_ratio/delta_mean"] = mean(column["clip_delta"])
    elif opts.loss_type == "cispo":
        # A fully masked sequence has ratio exp(0) = 1: clipped when 1 > epsilon_high and A > 0.
        empty = None
        if per_sequence:
            empty = ((1.0 > opts.epsilon_high) & (row_advantages > 0)).to(p.dtype)
        out["cispo_clip_ratio"] = mean(high, empty)
    zero = total * 0
    out["ratio_mean"] = column["ratio_sum"].sum() / denom
    out["ratio_min"] = torch.where(total > 0, column["ratio_min"].min() if num_rows else zero, zero)
    out["ratio_max"] = torch.where(total > 0, column["ratio_max"].max() if num_rows else zero, zero)
    return out
