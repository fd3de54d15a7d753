"""The LM-head-fused GRPO ops: ``fused_linear_grpo_loss`` and ``selective_logprobs``.

* ``pyfastrl::fused_linear_grpo_loss``: LM head + loss. Token chunks: the chunk's logits are one
  matmul, the backend turns them into log-probs, entropies and (in place) the logit gradient, and
  two matmuls give the chunk's dh and its share of dW. Only one chunk of logits is ever alive. The
  gradients are computed in the forward (the loss is a scalar: backward only scales them). When a
  token's gradient needs its whole row or batch first (sequence-level ratios, the off-policy and
  entropy masks, VESPO's phi), the chunks run twice: statistics, then the loss gradient, then the
  gradient pass.
* ``pyfastrl::selective_logprobs``: the chunked log-probs and entropies alone, without gradient.

Every padded ``(B, T)`` input is flattened to tokens with row boundaries ``cu_seqlens``; the fused
op drops masked tokens before the matmuls (they contribute nothing), so padding costs no FLOPs.
Finding them is the op's one host-device sync (with ``validate=True``, the value checks share it).
"""
from __future__ import annotations

import torch

from pyfastrl._backend import require_device, resolve_backend
from pyfastrl.kernels.grpo_loss import reference
from pyfastrl.kernels.grpo_loss.reference import PARTIALS, LossOptions
from pyfastrl.ops._grpo_common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    LossSetup,
    StageOptions,
    Validation,
    aggregate,
    bool_mask,
    check_tensor,
    check_triton_dtype,
    implementation,
    loss_arguments,
    metrics,
    number,
    policy_weights,
)

# Bytes of logits one chunk may hold. The torch backend also makes fp32 copies, so it takes less.
_CHUNK_LOGIT_BYTES = {"triton": 1 << 30, "torch": 1 << 28}


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
    sampling: torch.Tensor | None,
    is_weight: torch.Tensor | None,
    vespo_log_is: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    advantages: torch.Tensor,
    row_advantages: torch.Tensor | None,
    row_weight: torch.Tensor,
    inv_temperature: float,
    chunk_size: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
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
    off_policy_mask_threshold: float | None,
    top_entropy_quantile: float,
    vespo_k_pos: float,
    vespo_lambda_pos: float,
    vespo_k_neg: float,
    vespo_lambda_neg: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """Returns ``(loss, partials, logp, entropy, phi_metric, dh, dw, db)``; the gradients are of
    ``loss`` (empty when not asked for). Every token of ``hidden (N, H)`` counts (masked ones were
    dropped); ``advantages`` are per token, ``row_advantages`` the ``(B,)`` input or None."""
    opts = LossOptions(loss_type, sequence_level, epsilon_low, epsilon_high, delta, beta, kl_estimator,
                       use_bias_correction_kl, sapo_temperature_pos, sapo_temperature_neg)
    stage = StageOptions(off_policy_mask_threshold, top_entropy_quantile, vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
                         vespo_lambda_neg)
    impl = implementation(backend)
    num_tokens = hidden.shape[0]
    stat_dtype = reference.compute_dtype(hidden.dtype)
    lse, logp, entropy = (torch.empty(num_tokens, dtype=stat_dtype, device=hidden.device) for _ in range(3))
    grads = _GradientAccumulator(hidden, weight, bias, need_grad_hidden, need_grad_weight, need_grad_bias)
    need_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    rows = reference.row_of_token(cu_seqlens, num_tokens)
    # Token-level gradients are local to a token: one pass does logits, loss gradient and dh/dW.
    # Sequence-level ratios and the logp-dependent weights need every token first.
    one_pass = need_grad and not (sequence_level or stage.needs_logprobs(loss_type))
    chunks = _chunk_ranges(num_tokens, chunk_size)
    if one_pass:
        token_grad_weight = row_weight[rows]
        for start, end in chunks:
            hidden_chunk = hidden[start:end]
            logits = _chunk_logits(hidden_chunk, weight, bias)
            token_inputs = tuple(None if t is None else t[start:end]
                                 for t in (old, ref, advantages, is_weight, token_grad_weight))
            stats = impl.logits_stats_and_backward(logits, target_ids[start:end], inv_temperature, *token_inputs, opts)
            grads.add(start, end, hidden_chunk, stats[3])
            for buffer, value in zip((lse, logp, entropy), stats):
                buffer[start:end] = value
            del logits, stats
    else:
        _stats_pass(impl, hidden, weight, bias, target_ids, inv_temperature, chunks, lse, logp, entropy)
    counts = cu_seqlens[1:] - cu_seqlens[:-1]
    policy_weight, phi_metric = policy_weights(logp, entropy, None, rows, counts, old, sampling, advantages,
                                               row_advantages, is_weight, vespo_log_is, loss_type, stage)
    old_values = logp if old is None else old
    partials = impl.loss_forward(logp, old_values, ref, policy_weight, None, cu_seqlens, advantages, opts)
    loss = aggregate(partials, row_weight)
    if need_grad and not one_pass:
        dlogp = impl.loss_backward(row_weight, logp, old_values, ref, policy_weight, None, cu_seqlens, advantages, opts)
        for start, end in chunks:
            hidden_chunk = hidden[start:end]
            logits = _chunk_logits(hidden_chunk, weight, bias)
            dlogits = impl.logits_backward(logits, target_ids[start:end], inv_temperature, lse[start:end],
                                           dlogp[start:end])
            grads.add(start, end, hidden_chunk, dlogits)
            del logits, dlogits
    phi_metric = loss.new_zeros(()) if phi_metric is None else phi_metric.to(loss.dtype)
    return (loss, partials, logp, entropy, phi_metric) + grads.results()


@_fused_op.register_fake
def _(hidden, weight, bias, target_ids, old, ref, sampling, is_weight, vespo_log_is, cu_seqlens, advantages,
      row_advantages, row_weight, inv_temperature, chunk_size, need_grad_hidden, need_grad_weight, need_grad_bias,
      *args):
    dtype = reference.compute_dtype(hidden.dtype)
    num_tokens = hidden.shape[0]
    return (
        hidden.new_empty((), dtype=dtype),
        hidden.new_empty((cu_seqlens.shape[0] - 1, len(PARTIALS)), dtype=dtype),
        hidden.new_empty(num_tokens, dtype=dtype),
        hidden.new_empty(num_tokens, dtype=dtype),
        hidden.new_empty((), dtype=dtype),
        torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_grad_weight else weight.new_empty(0),
        torch.empty_like(bias) if need_grad_bias else weight.new_empty(0),
    )


_GRAD_FLAGS = slice(15, 18)  # need_grad_hidden, need_grad_weight, need_grad_bias among the inputs


def _fused_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[5:])
    ctx.computed = inputs[_GRAD_FLAGS]
    ctx.num_inputs = len(inputs)


def _fused_backward(ctx, grad_loss, *unused):
    grads = tuple(grad * grad_loss.to(grad.dtype) if computed else None
                  for grad, computed in zip(ctx.saved_tensors, ctx.computed))
    return grads + (None,) * (ctx.num_inputs - 3)


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
    _stats_pass(implementation(backend), hidden, weight, bias, target_ids, inv_temperature,
                _chunk_ranges(num_tokens, chunk_size), lse, logp, entropy)
    return logp, entropy


@_selective_op.register_fake
def _(hidden, weight, bias, target_ids, inv_temperature, chunk_size, backend):
    dtype = reference.compute_dtype(hidden.dtype)
    return hidden.new_empty(hidden.shape[0], dtype=dtype), hidden.new_empty(hidden.shape[0], dtype=dtype)


def _lm_head_inputs(op, hidden, weight, bias, target_ids, temperature, chunk_size, backend, validation: Validation):
    """Checks shared by the fused ops; returns the resolved backend, 1/temperature and chunk size."""
    check_tensor(op, "hidden", hidden, (2, 3), FLOAT_DTYPES)
    device = hidden.device
    backend = resolve_backend(op, backend, device, check_device=False)
    check_tensor(op, "weight", weight, (2,), FLOAT_DTYPES, device)
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: hidden {tuple(hidden.shape)} must end in the hidden size H of weight (V, H) = {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{op}: hidden has dtype {hidden.dtype} but weight has {weight.dtype}; pass one dtype")
    check_triton_dtype(op, backend, "hidden/weight", hidden.dtype)
    vocab = weight.shape[0]
    if bias is not None:
        check_tensor(op, "bias", bias, (1,), (weight.dtype,), device)
        if bias.shape[0] != vocab:
            raise ValueError(f"{op}: bias has {bias.shape[0]} entries but weight has V={vocab} rows")
    check_tensor(op, "target_ids", target_ids, (hidden.dim() - 1,), INDEX_DTYPES, device)
    if target_ids.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{op}: target_ids has shape {tuple(target_ids.shape)} but hidden has {tuple(hidden.shape[:-1])} tokens"
        )
    if target_ids.numel():
        outside = (target_ids < 0) | (target_ids >= vocab)
        validation.add(outside.any(), lambda: f"target_ids holds {target_ids[outside].flatten()[0].item()}, "
                                              f"outside the vocabulary [0, {vocab})")
    number(op, "temperature", temperature, above=0.0)
    if chunk_size is None:
        chunk_size = _default_chunk_size(backend, vocab, weight.dtype)
    else:
        number(op, "chunk_size", chunk_size, above=0.0, integer=True)
    require_device(op, backend, device)  # after the argument checks: those errors come first anywhere
    return backend, 1.0 / float(temperature), int(chunk_size)


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    completion_mask: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
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
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    validate: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL's GRPO loss straight from hidden states and the LM head, never materialising all the logits.

    Equal to ``grpo_loss`` on the log-probs of ``log_softmax((hidden @ weight.T + bias) /
    temperature)`` at ``target_ids`` (with their entropies as ``entropies``), but the logits exist
    one token chunk at a time: each chunk's logits are computed (in the weight dtype, like the
    model's own LM head), reduced by an online log-sum-exp to log-probs and entropies, and turned in
    place into their gradient for the dh / dW / db matmuls. Masked tokens are dropped before any matmul.

    Args:
        hidden: ``(B, T, H)`` final hidden states at the positions that predict each completion
            token (padded form, with ``completion_mask (B, T)``), or ``(N, H)`` packed with
            ``cu_seqlens (B+1,)`` (e.g. the completion tokens of a prefix-grouped forward;
            ``completion_mask (N,)`` or None).
        weight: ``(V, H)`` LM-head weight, hidden's dtype (fp16/bf16/fp32; fp64 on torch).
        target_ids: ``(B, T)`` / ``(N,)`` int token ids in ``[0, V)``.
        completion_mask: nonzero = the token counts; None (packed form only) = all tokens count.
        bias: optional ``(V,)`` LM-head bias.
        temperature: logits are divided by it (the sampling temperature, as in TRL).
        chunk_size: tokens per chunk; default: 1 GiB of logits (256 MiB on the torch backend).
        validate: check values (``target_ids`` in range, rewards finite, ``cu_seqlens``) in the
            op's one host-device sync.
        everything else: as in ``grpo_loss`` (per-token tensors shaped like ``target_ids``; the
            entropy mask uses the op's own entropies).

    Returns:
        ``(loss, metrics)``: loss differentiable in hidden, weight and bias; metrics as in
        ``grpo_loss`` plus ``entropy`` (mean token entropy of the tempered distribution).
        Gradients are computed in the forward pass when any of hidden / weight / bias requires
        grad (and grad mode is on); backward only scales them by the incoming gradient.
    """
    op = "fused_linear_grpo_loss"
    validation = Validation(op, validate)
    backend, inv_temperature, chunk_size = _lm_head_inputs(op, hidden, weight, bias, target_ids, temperature,
                                                           chunk_size, backend, validation)
    tokens_shape = hidden.shape[:-1]
    if hidden.dim() == 3 and completion_mask is None:
        raise ValueError(f"{op}: padded (B, T, H) hidden needs completion_mask (B, T)")
    valid = (torch.ones(tokens_shape, dtype=torch.bool, device=hidden.device) if completion_mask is None
             else bool_mask(op, completion_mask, target_ids, "target_ids")).reshape(-1)
    setup = LossSetup(op, target_ids, "target_ids", valid, cu_seqlens, reference.compute_dtype(hidden.dtype),
                      validation, **loss_arguments(locals()))
    (num_kept,) = validation.read(setup.counts.sum())
    everything = num_kept == valid.numel()
    kept = None if everything else torch.nonzero_static(valid, size=num_kept).squeeze(1)

    def select(t):
        if t is None:
            return None
        t = t.reshape(-1, *t.shape[len(tokens_shape):])
        return (t if everything else t.index_select(0, kept)).contiguous()

    kept_cu = torch.cat([setup.counts.new_zeros(1), setup.counts.cumsum(0)]).to(torch.int32)
    grad_on = torch.is_grad_enabled()
    loss, partials, _, entropy, phi_metric, *_ = _fused_op(
        select(hidden), weight, bias, select(target_ids), select(setup.old), select(setup.ref), select(setup.sampling),
        select(setup.is_weight), setup.vespo_log_is, kept_cu, select(setup.advantages), setup.row_advantages,
        setup.row_weights, inv_temperature, chunk_size, grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad, grad_on and bias is not None and bias.requires_grad, *setup.opts,
        *setup.stage, backend,
    )
    out = metrics(partials, setup.opts, setup.row_advantages)
    out["entropy"] = entropy.sum() / max(entropy.numel(), 1)
    if setup.opts.loss_type == "vespo":
        out["vespo/phi_seq_mean"] = phi_metric
    return loss, out


def selective_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    validate: bool = False,
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
        validate: check that ``target_ids`` lie in ``[0, V)`` (one host-device sync; off: none).

    Returns:
        ``logprobs`` shaped like ``target_ids`` (fp32; fp64 for fp64 inputs), or ``(logprobs,
        entropy)`` with ``return_entropy=True``. Never requires grad.
    """
    op = "selective_logprobs"
    validation = Validation(op, validate)
    backend, inv_temperature, chunk_size = _lm_head_inputs(op, hidden, weight, bias, target_ids, temperature,
                                                           chunk_size, backend, validation)
    validation.read()
    with torch.no_grad():
        logp, entropy = _selective_op(hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight, bias,
                                      target_ids.reshape(-1).contiguous(), inv_temperature, chunk_size, backend)
    logp, entropy = logp.reshape(target_ids.shape), entropy.reshape(target_ids.shape)
    return (logp, entropy) if return_entropy else logp
