"""Triton kernels of the GRPO loss (the ``"triton"`` backend); same contract as ``reference.py``.

* ``_loss_forward_kernel`` (one program per row): the row's per-token policy term + KL and metric
  terms, reduced to the row's partial sums (``reference.PARTIALS``). Sequence-level ratios (GSPO)
  take one extra pass over the row for the mean log-ratio.
* ``_loss_backward_kernel`` (one program per row): dL/dlogp from the closed-form gradients, given
  the row's upstream gradient (the aggregation weight times dL_total/dL).
* ``_logits_kernel`` (``BLOCK_T`` tokens per program): one chunk of LM-head logits. Pass 1 runs an
  online log-sum-exp over vocab tiles (with the running sum of p*z for the entropy); then,
  optionally, the token-level GRPO gradient of each token; pass 2 writes the logit gradient
  ``g * (onehot - p) / temperature`` over the logits in place, ready for the dh / dW matmuls.

Advantages and the policy term's weight (importance sampling, off-policy / entropy masks, VESPO's
phi) come per token. Rows and tokens run along grid axis 0 (limit 2**31 - 1, not 65,535), and
logits rows are addressed with 64-bit offsets. All arithmetic is fp32. Tiles come from
``launch_target.tile_target`` (the GPU tables, or small ones under the interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyfastrl.kernels.grpo_loss.reference import KL_CODES, LOSS_CODES, PARTIALS, LossOptions
from pyfastrl.kernels.launch_target import tile_target

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_CISPO = tl.constexpr(1)
_SAPO = tl.constexpr(2)
_POLICY_GRADIENT = tl.constexpr(3)
_K1 = tl.constexpr(1)
_K2 = tl.constexpr(2)
_NUM_PARTIALS = len(PARTIALS)

# Row kernels: tokens per loop iteration. Compiled, 1024 (sm80 and sm90 alike: the loop is
# memory-bound and holds ~10 fp32 vectors of BLOCK). Interpreted, every iteration costs Python
# time, so tiles follow the row length and stay small at test sizes (tests cross tile boundaries).
_GPU_ROW_BLOCK = 1024
# Logits kernel on a GPU: one token per program (a row of 151,936 logits is 38 tiles of 4096).
_GPU_LOGITS = dict(block_t=1, block_v=4096, num_warps=8)


def row_block(num_tokens: int, num_rows: int, target: str) -> int:
    """Tokens per iteration of the row kernels for ``target`` (``launch_target.TARGETS``)."""
    if target != "interpreter":
        return _GPU_ROW_BLOCK
    quarter = max(1, num_tokens // max(num_rows, 1) // 4)
    return min(_GPU_ROW_BLOCK, max(16, triton.next_power_of_2(quarter)))


def logits_launch(num_tokens: int, target: str) -> tuple[tuple[int], int, int, int]:
    """``(grid, BLOCK_T, BLOCK_V, num_warps)`` of ``_logits_kernel`` for a chunk of ``num_tokens``.

    On a GPU, programs on grid axis 0, whose limit is 2**31 - 1 (axes 1 and 2 stop at 65,535)."""
    if target == "interpreter":
        block_t = min(1024, max(8, triton.next_power_of_2(num_tokens // 64)))
        return (triton.cdiv(num_tokens, block_t),), block_t, 16, 1
    t = _GPU_LOGITS
    return (triton.cdiv(num_tokens, t["block_t"]),), t["block_t"], t["block_v"], t["num_warps"]


def _codes(opts: LossOptions) -> dict:
    return {
        "LOSS": LOSS_CODES[opts.loss_type],
        "HAS_DELTA": opts.delta is not None,
        "KL": KL_CODES[opts.kl_estimator] if opts.beta != 0.0 else 0,
        "KL_RATIO": opts.use_bias_correction_kl and opts.beta != 0.0,
    }


def _scalars(opts: LossOptions) -> dict:
    return {
        "eps_low": float(opts.epsilon_low),
        "eps_high": float(opts.epsilon_high),
        "delta": float(opts.delta) if opts.delta is not None else 0.0,
        "beta": float(opts.beta),
        "tau_pos": float(opts.sapo_temperature_pos),
        "tau_neg": float(opts.sapo_temperature_neg),
    }


@triton.jit
def _token_terms(logp, log_ratio, ref, adv, weight, eps_low, eps_high, delta, beta, tau_pos, tau_neg,
                 LOSS: tl.constexpr, HAS_DELTA: tl.constexpr, KL: tl.constexpr, KL_RATIO: tl.constexpr):
    """Per-token ``(loss, direct, via_ratio, kl, clip_low, clip_high, clip_delta, ratio)``; see reference.py."""
    ratio = tl.exp(log_ratio)
    zero = tl.zeros_like(ratio)
    clip_low = zero
    clip_high = zero
    clip_delta = zero
    if LOSS == _CISPO:
        coef = tl.minimum(ratio, eps_high)
        loss = -coef * adv * logp
        direct = -coef * adv
        via_ratio = zero
        clip_high = tl.where((ratio > eps_high) & (adv > 0), 1.0, 0.0)
    elif LOSS == _SAPO:
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        soft = tl.sigmoid(tau * (ratio - 1.0))
        loss = -soft * 4.0 / tau * adv
        direct = zero
        via_ratio = -4.0 * adv * soft * (1.0 - soft) * ratio
    elif LOSS == _POLICY_GRADIENT:
        loss = -adv * logp
        direct = -adv + zero
        via_ratio = zero
    else:
        lo = 1.0 - eps_low
        hi = 1.0 + eps_high
        unclipped = ratio
        unclipped_pass = zero + 1.0
        if HAS_DELTA:
            unclipped = tl.minimum(ratio, delta)
            unclipped_pass = tl.where(ratio <= delta, 1.0, 0.0)
            clip_delta = tl.where((ratio > delta) & (adv < 0), 1.0, 0.0)
        clipped = tl.minimum(tl.maximum(ratio, lo), hi)
        clipped_pass = tl.where((ratio >= lo) & (ratio <= hi), 1.0, 0.0)
        term1 = unclipped * adv
        term2 = clipped * adv
        share1 = tl.where(term1 < term2, 1.0, tl.where(term1 == term2, 0.5, 0.0))
        loss = -tl.minimum(term1, term2)
        direct = zero
        via_ratio = -adv * (share1 * unclipped_pass + (1.0 - share1) * clipped_pass) * ratio
        clip_low = tl.where((unclipped < lo) & (adv < 0), 1.0, 0.0)
        clip_high = tl.where((unclipped > hi) & (adv > 0), 1.0, 0.0)
    loss = loss * weight
    direct = direct * weight
    via_ratio = via_ratio * weight
    kl = zero
    if KL != 0:
        diff = ref - logp
        if KL == _K1:
            kl = -diff
            kl_direct = zero + 1.0
        elif KL == _K2:
            kl = 0.5 * diff * diff
            kl_direct = -diff
        else:
            e = tl.exp(diff)
            kl = e - diff - 1.0
            kl_direct = 1.0 - e
        if KL_RATIO:
            via_ratio += beta * kl * ratio
            kl = kl * ratio
            kl_direct = kl_direct * ratio
        loss += beta * kl
        direct += beta * kl_direct
    return loss, direct, via_ratio, kl, clip_low, clip_high, clip_delta, ratio


@triton.jit
def _load_tile(logp_ptr, old_ptr, ref_ptr, weight_ptr, mask_ptr, adv_ptr, offs, end, row_log_ratio,
               HAS_MASK: tl.constexpr, HAS_WEIGHT: tl.constexpr, KL: tl.constexpr, SEQUENCE: tl.constexpr):
    """Tokens ``offs`` of a row ending at ``end``: ``(valid, logp, ref, weight, adv, log_ratio)``;
    ``log_ratio`` is the token's own, or the row's (``row_log_ratio``, GSPO)."""
    inside = offs < end
    valid = inside
    if HAS_MASK:
        valid = inside & (tl.load(mask_ptr + offs, mask=inside, other=0) != 0)
    logp = tl.load(logp_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    ref = logp
    if KL != 0:
        ref = tl.load(ref_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    weight = tl.zeros_like(logp) + 1.0
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if SEQUENCE:
        log_ratio = tl.zeros_like(logp) + row_log_ratio
    else:
        log_ratio = logp - tl.load(old_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    return valid, logp, ref, weight, adv, log_ratio


@triton.jit
def _row_log_ratio(logp_ptr, old_ptr, mask_ptr, start, end, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """The row's mean log-ratio over valid tokens (GSPO), and its valid-token count."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.float32)
    for first in range(start, end, BLOCK):
        offs = first + tl.arange(0, BLOCK)
        inside = offs < end
        valid = inside
        if HAS_MASK:
            valid = inside & (tl.load(mask_ptr + offs, mask=inside, other=0) != 0)
        logp = tl.load(logp_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        total += tl.where(valid, logp - old, 0.0)
        count += tl.where(valid, 1.0, 0.0)
    n = tl.sum(count, axis=0)
    return tl.sum(total, axis=0) / tl.maximum(n, 1.0), n


@triton.jit
def _loss_forward_kernel(
    logp_ptr, old_ptr, ref_ptr, weight_ptr, mask_ptr, cu_ptr, adv_ptr, partials_ptr,
    eps_low, eps_high, delta, beta, tau_pos, tau_neg,
    LOSS: tl.constexpr, HAS_DELTA: tl.constexpr, KL: tl.constexpr, KL_RATIO: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_WEIGHT: tl.constexpr, SEQUENCE: tl.constexpr, NUM_PARTIALS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    start = tl.load(cu_ptr + row)
    end = tl.load(cu_ptr + row + 1)
    row_log_ratio = 0.0
    if SEQUENCE:
        row_log_ratio, row_count = _row_log_ratio(logp_ptr, old_ptr, mask_ptr, start, end, HAS_MASK, BLOCK)
    acc_loss = tl.zeros([BLOCK], dtype=tl.float32)
    acc_count = tl.zeros([BLOCK], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK], dtype=tl.float32)
    acc_low = tl.zeros([BLOCK], dtype=tl.float32)
    acc_high = tl.zeros([BLOCK], dtype=tl.float32)
    acc_delta = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ratio = tl.zeros([BLOCK], dtype=tl.float32)
    ratio_min = tl.full([BLOCK], float("inf"), dtype=tl.float32)
    ratio_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for first in range(start, end, BLOCK):
        offs = first + tl.arange(0, BLOCK)
        valid, logp, ref, weight, adv, log_ratio = _load_tile(
            logp_ptr, old_ptr, ref_ptr, weight_ptr, mask_ptr, adv_ptr, offs, end, row_log_ratio,
            HAS_MASK, HAS_WEIGHT, KL, SEQUENCE)
        loss, direct, via_ratio, kl, low, high, clip_delta, ratio = _token_terms(
            logp, log_ratio, ref, adv, weight, eps_low, eps_high, delta, beta, tau_pos, tau_neg,
            LOSS, HAS_DELTA, KL, KL_RATIO)
        acc_loss += tl.where(valid, loss, 0.0)
        acc_count += tl.where(valid, 1.0, 0.0)
        acc_kl += tl.where(valid, kl, 0.0)
        acc_low += tl.where(valid, low, 0.0)
        acc_high += tl.where(valid, high, 0.0)
        acc_delta += tl.where(valid, clip_delta, 0.0)
        acc_ratio += tl.where(valid, ratio, 0.0)
        ratio_min = tl.minimum(ratio_min, tl.where(valid, ratio, float("inf")))
        ratio_max = tl.maximum(ratio_max, tl.where(valid, ratio, float("-inf")))
    out = partials_ptr + row * NUM_PARTIALS
    tl.store(out + 0, tl.sum(acc_loss, axis=0))
    tl.store(out + 1, tl.sum(acc_count, axis=0))
    tl.store(out + 2, tl.sum(acc_kl, axis=0))
    tl.store(out + 3, tl.sum(acc_low, axis=0))
    tl.store(out + 4, tl.sum(acc_high, axis=0))
    tl.store(out + 5, tl.sum(acc_delta, axis=0))
    tl.store(out + 6, tl.sum(acc_ratio, axis=0))
    tl.store(out + 7, tl.min(ratio_min, axis=0))
    tl.store(out + 8, tl.max(ratio_max, axis=0))


@triton.jit
def _loss_backward_kernel(
    row_grad_ptr, logp_ptr, old_ptr, ref_ptr, weight_ptr, mask_ptr, cu_ptr, adv_ptr, dlogp_ptr,
    eps_low, eps_high, delta, beta, tau_pos, tau_neg,
    LOSS: tl.constexpr, HAS_DELTA: tl.constexpr, KL: tl.constexpr, KL_RATIO: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_WEIGHT: tl.constexpr, SEQUENCE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    start = tl.load(cu_ptr + row)
    end = tl.load(cu_ptr + row + 1)
    row_grad = tl.load(row_grad_ptr + row).to(tl.float32)
    row_log_ratio = 0.0
    row_via_ratio = 0.0
    if SEQUENCE:
        row_log_ratio, row_count = _row_log_ratio(logp_ptr, old_ptr, mask_ptr, start, end, HAS_MASK, BLOCK)
        # log s = mean of the row's log-ratios: every valid token gets (sum of via_ratio) / n.
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for first in range(start, end, BLOCK):
            offs = first + tl.arange(0, BLOCK)
            valid, logp, ref, weight, adv, log_ratio = _load_tile(
                logp_ptr, old_ptr, ref_ptr, weight_ptr, mask_ptr, adv_ptr, offs, end, row_log_ratio,
                HAS_MASK, HAS_WEIGHT, KL, SEQUENCE)
            loss, direct, via_ratio, kl, low, high, clip_delta, ratio = _token_terms(
                logp, log_ratio, ref, adv, weight, eps_low, eps_high, delta, beta, tau_pos, tau_neg,
                LOSS, HAS_DELTA, KL, KL_RATIO)
            total += tl.where(valid, via_ratio, 0.0)
        row_via_ratio = tl.sum(total, axis=0) / tl.maximum(row_count, 1.0)
    for first in range(start, end, BLOCK):
        offs = first + tl.arange(0, BLOCK)
        valid, logp, ref, weight, adv, log_ratio = _load_tile(
            logp_ptr, old_ptr, ref_ptr, weight_ptr, mask_ptr, adv_ptr, offs, end, row_log_ratio,
            HAS_MASK, HAS_WEIGHT, KL, SEQUENCE)
        loss, direct, via_ratio, kl, low, high, clip_delta, ratio = _token_terms(
            logp, log_ratio, ref, adv, weight, eps_low, eps_high, delta, beta, tau_pos, tau_neg,
            LOSS, HAS_DELTA, KL, KL_RATIO)
        if SEQUENCE:
            grad = direct + row_via_ratio
        else:
            grad = direct + via_ratio
        tl.store(dlogp_ptr + offs, tl.where(valid, row_grad * grad, 0.0), mask=offs < end)


@triton.jit
def _logits_kernel(
    logits_ptr, stride_logits, target_ptr, num_tokens, vocab, inv_temperature,
    lse_ptr, logp_ptr, entropy_ptr, grad_ptr,
    old_ptr, ref_ptr, adv_ptr, weight_ptr, token_grad_weight_ptr,
    eps_low, eps_high, delta, beta, tau_pos, tau_neg,
    STATS: tl.constexpr, TOKEN_GRAD: tl.constexpr, WRITE_GRAD: tl.constexpr, HAS_OLD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, LOSS: tl.constexpr, HAS_DELTA: tl.constexpr, KL: tl.constexpr,
    KL_RATIO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    inside = tokens < num_tokens
    # Rows past the end re-read the last token, so every row of the tile stays finite; never stored.
    tokens = tl.minimum(tokens, num_tokens - 1)
    row_base = logits_ptr + tokens.to(tl.int64)[:, None] * stride_logits
    target = tl.load(target_ptr + tokens).to(tl.int64)
    if STATS:
        running_max = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
        sum_exp = tl.zeros([BLOCK_T], dtype=tl.float32)
        sum_exp_z = tl.zeros([BLOCK_T], dtype=tl.float32)
        for first in range(0, vocab, BLOCK_V):
            cols = first + tl.arange(0, BLOCK_V)
            in_vocab = cols < vocab
            z = tl.load(row_base + cols[None, :], mask=in_vocab[None, :], other=float("-inf")).to(tl.float32)
            z = z * inv_temperature
            new_max = tl.maximum(running_max, tl.max(z, axis=1))
            scale = tl.exp(running_max - new_max)
            p = tl.exp(z - new_max[:, None])
            sum_exp = sum_exp * scale + tl.sum(p, axis=1)
            sum_exp_z = sum_exp_z * scale + tl.sum(p * tl.where(in_vocab[None, :], z, 0.0), axis=1)
            running_max = new_max
        lse = running_max + tl.log(sum_exp)
        z_target = tl.load(logits_ptr + tokens.to(tl.int64) * stride_logits + target).to(tl.float32)
        logp = z_target * inv_temperature - lse
        tl.store(lse_ptr + tokens, lse, mask=inside)
        tl.store(logp_ptr + tokens, logp, mask=inside)
        tl.store(entropy_ptr + tokens, lse - sum_exp_z / sum_exp, mask=inside)
    else:
        lse = tl.load(lse_ptr + tokens)
    if WRITE_GRAD:
        if TOKEN_GRAD:
            old = logp  # no behaviour policy given: old = logp.detach(), ratio 1
            if HAS_OLD:
                old = tl.load(old_ptr + tokens).to(tl.float32)
            ref = logp
            if KL != 0:
                ref = tl.load(ref_ptr + tokens).to(tl.float32)
            weight = tl.full([BLOCK_T], 1.0, tl.float32)
            if HAS_WEIGHT:
                weight = tl.load(weight_ptr + tokens).to(tl.float32)
            adv = tl.load(adv_ptr + tokens).to(tl.float32)
            loss, direct, via_ratio, kl, low, high, clip_delta, ratio = _token_terms(
                logp, logp - old, ref, adv, weight, eps_low, eps_high, delta, beta, tau_pos, tau_neg,
                LOSS, HAS_DELTA, KL, KL_RATIO)
            grad = tl.load(token_grad_weight_ptr + tokens).to(tl.float32) * (direct + via_ratio)
        else:
            grad = tl.load(grad_ptr + tokens).to(tl.float32)
        for first in range(0, vocab, BLOCK_V):
            cols = first + tl.arange(0, BLOCK_V)
            in_vocab = cols < vocab
            z = tl.load(row_base + cols[None, :], mask=in_vocab[None, :], other=0.0).to(tl.float32)
            p = tl.exp(z * inv_temperature - lse[:, None])
            onehot = tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
            dz = grad[:, None] * (onehot - p) * inv_temperature
            tl.store(row_base + cols[None, :], dz.to(logits_ptr.dtype.element_ty),
                     mask=inside[:, None] & in_vocab[None, :])


# ----------------------------------------------------------------------------- launchers


def _mask_bytes(mask):
    return mask.view(torch.uint8) if mask is not None and mask.dtype == torch.bool else mask


def _row_launch(logp, ref, weight, mask, cu_seqlens, opts: LossOptions) -> dict:
    """Arguments the two row kernels share (placeholders for absent tensors are never read)."""
    num_rows = cu_seqlens.numel() - 1
    return dict(
        ref_ptr=ref if ref is not None else logp, weight_ptr=weight if weight is not None else logp,
        mask_ptr=mask if mask is not None else logp, **_scalars(opts), **_codes(opts),
        HAS_MASK=mask is not None, HAS_WEIGHT=weight is not None, SEQUENCE=opts.sequence_level,
        BLOCK=row_block(logp.numel(), num_rows, tile_target(logp.device)),
    )


def loss_forward(logp, old, ref, weight, mask, cu_seqlens, advantages, opts: LossOptions) -> torch.Tensor:
    """Per-row partial sums ``(B, len(PARTIALS))`` fp32; see ``reference.loss_forward``."""
    mask = _mask_bytes(mask)
    num_rows = cu_seqlens.numel() - 1
    partials = torch.empty((num_rows, _NUM_PARTIALS), dtype=torch.float32, device=logp.device)
    if num_rows == 0:
        return partials
    _loss_forward_kernel[(num_rows,)](
        logp_ptr=logp, old_ptr=old, cu_ptr=cu_seqlens, adv_ptr=advantages, partials_ptr=partials,
        NUM_PARTIALS=_NUM_PARTIALS, **_row_launch(logp, ref, weight, mask, cu_seqlens, opts),
    )
    return partials


def loss_backward(row_grad, logp, old, ref, weight, mask, cu_seqlens, advantages, opts: LossOptions) -> torch.Tensor:
    """dL/dlogp ``(N,)`` in logp's dtype; see ``reference.loss_backward``."""
    mask = _mask_bytes(mask)
    dlogp = torch.empty_like(logp)
    num_rows = cu_seqlens.numel() - 1
    if num_rows == 0 or logp.numel() == 0:
        return dlogp.zero_()
    _loss_backward_kernel[(num_rows,)](
        row_grad_ptr=row_grad, logp_ptr=logp, old_ptr=old, cu_ptr=cu_seqlens, adv_ptr=advantages, dlogp_ptr=dlogp,
        **_row_launch(logp, ref, weight, mask, cu_seqlens, opts),
    )
    return dlogp


_STATS_ONLY = LossOptions("dapo", False, 0.2, 0.2, None, 0.0, "k3", True, 1.0, 1.05)


def _launch_logits(logits, target_ids, inv_temperature, lse, logp, entropy, grad, token_inputs, opts,
                   stats: bool, write_grad: bool):
    num_tokens, vocab = logits.shape
    if num_tokens == 0:
        return
    old, ref, advantages, weight, token_grad_weight = (
        token_inputs if token_inputs is not None else (None, None, lse, None, lse))
    options = opts if opts is not None else _STATS_ONLY
    grid, block_t, block_v, num_warps = logits_launch(num_tokens, tile_target(logits.device))
    _logits_kernel[grid](
        logits, logits.stride(0), target_ids, num_tokens, vocab, float(inv_temperature),
        lse, logp, entropy, grad if grad is not None else lse,
        lse if old is None else old, lse if ref is None else ref, advantages, lse if weight is None else weight,
        token_grad_weight, **_scalars(options), STATS=stats, TOKEN_GRAD=token_inputs is not None,
        WRITE_GRAD=write_grad, HAS_OLD=old is not None, HAS_WEIGHT=weight is not None,
        **_codes(options), BLOCK_T=block_t, BLOCK_V=block_v, num_warps=num_warps,
    )


def _stat_buffers(logits):
    return tuple(torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device) for _ in range(3))


def logits_stats(logits, target_ids, inv_temperature: float):
    """``(lse, logp, entropy)`` fp32 of each row of ``logits (C, V)``; see ``reference.logits_stats``."""
    lse, logp, entropy = _stat_buffers(logits)
    _launch_logits(logits, target_ids, inv_temperature, lse, logp, entropy, None, None, None, True, False)
    return lse, logp, entropy


def logits_backward(logits, target_ids, inv_temperature: float, lse, grad) -> torch.Tensor:
    """The logit gradient, written over ``logits`` (returned); see ``reference.logits_backward``."""
    _launch_logits(logits, target_ids, inv_temperature, lse, lse, lse, grad, None, None, False, True)
    return logits


def logits_stats_and_backward(logits, target_ids, inv_temperature, old, ref, advantages, weight, token_grad_weight,
                              opts):
    """One launch: stats, token-level GRPO gradient and the logit gradient (over ``logits``)."""
    lse, logp, entropy = _stat_buffers(logits)
    _launch_logits(logits, target_ids, inv_temperature, lse, logp, entropy, None,
                   (old, ref, advantages, weight, token_grad_weight), opts, True, True)
    return lse, logp, entropy, logits
