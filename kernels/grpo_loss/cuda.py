"""CUDA kernels of the GRPO loss (the ``"cuda"`` backend, ``csrc/grpo_loss``); same contract as
``reference.py`` and ``kernel.py``: ``loss_forward`` gives each row's partial sums, ``loss_backward``
dL/dlogp in closed form.

The kernels cut the packed tokens into chunks of 2,048 (one thread block each), whatever the row
lengths, so a batch of a few long rows still fills the GPU (the Triton row kernels run one program
per row); each (chunk, row) piece writes its own partial sums and a second kernel folds each row's
pieces in order: deterministic, no atomics. Sequence-level ratios (GSPO) take one more pass for
each row's mean log-ratio. Arithmetic in fp32, as the Triton kernels; the formulas live in
``csrc/grpo_loss/grpo_math.h``, which the tests also compile for the host and check on CPU.

Inputs as the op passes them: ``logp (N,)`` fp32/fp16/bf16, ``old``, ``advantages``, ``ref`` and
``weight`` (the latter two optional) ``(N,)`` fp32, ``mask (N,)`` bool or None, ``cu_seqlens
(B+1,)`` integer. No host-device sync.

``group_advantages`` is ``reference.group_advantages`` on the device: one block per group, in
float64 like the reference, with the same shifted two-pass mean and variance (so identical rewards
get exactly 0); ``"batch"`` scaling runs a one-block kernel over the whole batch first.
"""
from __future__ import annotations

import contextlib

import torch

from pyfastrl.kernels import cuda_extension
from pyfastrl.kernels.grpo_loss.reference import ADVANTAGE_SCALES, KL_CODES, LOSS_CODES, PARTIALS, LossOptions

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CHUNK = 2048  # csrc/grpo_loss/grpo_math.h kChunk


def _params(opts: LossOptions) -> tuple:
    """The options as the binding's flat arguments (loss .. tau_neg)."""
    kl = KL_CODES[opts.kl_estimator] if opts.beta != 0.0 else 0
    return (LOSS_CODES[opts.loss_type], kl, opts.delta is not None, bool(opts.use_bias_correction_kl and kl),
            bool(opts.sequence_level), float(opts.epsilon_low), float(opts.epsilon_high),
            float(opts.delta) if opts.delta is not None else 0.0, float(opts.beta),
            float(opts.sapo_temperature_pos), float(opts.sapo_temperature_neg))


def _fp32(t):
    return None if t is None else t.to(torch.float32).contiguous()


def _inputs(logp, old, ref, weight, mask, cu_seqlens, advantages):
    """Contiguous tensors in the kernels' dtypes, and their addresses (0 for an absent one)."""
    tensors = dict(logp=logp.contiguous(), old=_fp32(old), ref=_fp32(ref), weight=_fp32(weight),
                   mask=None if mask is None else mask.contiguous().view(torch.uint8),
                   advantages=_fp32(advantages), cu=cu_seqlens.to(torch.int64).contiguous())
    return tensors, {name: 0 if t is None else t.data_ptr() for name, t in tensors.items()}


def _workspace(num_tokens: int, num_rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment partials ``(chunks + B, 9)`` and per-row scalars ``(B,)``, fp32."""
    segments = torch.empty((-(-num_tokens // CHUNK) + num_rows, len(PARTIALS)), dtype=torch.float32, device=device)
    return segments, torch.empty(num_rows, dtype=torch.float32, device=device)


@contextlib.contextmanager
def _launching_on(device):
    """The current stream of ``device``, with ``device`` the current device while the kernels launch
    (they launch on the current one, which need not be the tensors')."""
    with torch.cuda.device(device):
        yield torch.cuda.current_stream(device).cuda_stream


def loss_forward(logp, old, ref, weight, mask, cu_seqlens, advantages, opts: LossOptions) -> torch.Tensor:
    """Per-row partial sums ``(B, len(PARTIALS))`` fp32; see ``reference.loss_forward``."""
    num_rows = cu_seqlens.numel() - 1
    partials = torch.empty((num_rows, len(PARTIALS)), dtype=torch.float32, device=logp.device)
    if num_rows == 0:
        return partials
    tensors, ptr = _inputs(logp, old, ref, weight, mask, cu_seqlens, advantages)
    segments, row_log_ratio = _workspace(logp.numel(), num_rows, logp.device)
    with _launching_on(logp.device) as stream:
        cuda_extension.module().grpo_loss_forward(
            cuda_extension.DTYPE_CODES[logp.dtype], ptr["logp"], ptr["old"], ptr["ref"], ptr["weight"], ptr["mask"],
            ptr["advantages"], ptr["cu"], logp.numel(), num_rows, *_params(opts), segments.data_ptr(),
            row_log_ratio.data_ptr(), partials.data_ptr(), stream)
    return partials


def loss_backward(row_grad, logp, old, ref, weight, mask, cu_seqlens, advantages, opts: LossOptions) -> torch.Tensor:
    """dL/dlogp ``(N,)`` in logp's dtype; see ``reference.loss_backward``."""
    num_rows = cu_seqlens.numel() - 1
    tensors, ptr = _inputs(logp, old, ref, weight, mask, cu_seqlens, advantages)
    dlogp = torch.empty_like(tensors["logp"])
    if num_rows == 0 or logp.numel() == 0:
        return dlogp.zero_()
    row_grad = row_grad.to(torch.float32).contiguous()
    segments, row_log_ratio = _workspace(logp.numel(), num_rows, logp.device)
    row_via = torch.empty_like(row_log_ratio)
    with _launching_on(logp.device) as stream:
        cuda_extension.module().grpo_loss_backward(
            cuda_extension.DTYPE_CODES[logp.dtype], row_grad.data_ptr(), ptr["logp"], ptr["old"], ptr["ref"],
            ptr["weight"], ptr["mask"], ptr["advantages"], ptr["cu"], logp.numel(), num_rows, *_params(opts),
            segments.data_ptr(), row_log_ratio.data_ptr(), row_via.data_ptr(), dlogp.data_ptr(), stream)
    return dlogp


def group_order(group_index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's ragged-group layout: ``order (B,)`` the rewards' indices sorted by group and
    ``offsets (G+1,)`` where each group starts in it, both int64 (no host-device sync)."""
    order = torch.argsort(group_index, stable=True)
    sizes = torch.zeros(num_groups + 1, dtype=torch.int64, device=group_index.device)
    return order, sizes.index_add_(0, group_index + 1, torch.ones_like(group_index)).cumsum(0)


def group_advantages(rewards: torch.Tensor, group_size: int | None, group_index: torch.Tensor | None, num_groups: int,
                     scale: str, eps: float) -> torch.Tensor:
    """Advantages ``(B,)`` float64 of ``rewards (B,)`` (any real dtype; NaN = unscorable), as
    ``reference.group_advantages``. Groups are consecutive runs of ``group_size`` rewards, or (with
    ``group_size`` None) given by ``group_index (B,)`` int64 in ``[0, num_groups)``, any order;
    ``scale`` one of ``reference.ADVANTAGE_SCALES``. No host-device sync."""
    rewards = rewards.to(torch.float64).contiguous()
    out = torch.empty_like(rewards)
    order, offsets = (None, None) if group_size is not None else group_order(group_index, num_groups)
    batch_stats = torch.empty(4, dtype=torch.float64, device=rewards.device)  # RewardStats of the batch
    with _launching_on(rewards.device) as stream:
        cuda_extension.module().grpo_advantages(
            rewards.data_ptr(), 0 if order is None else order.data_ptr(), 0 if offsets is None else offsets.data_ptr(),
            group_size or 0, rewards.numel(), num_groups, ADVANTAGE_SCALES.index(scale), float(eps),
            batch_stats.data_ptr(), out.data_ptr(), stream)
    return out
