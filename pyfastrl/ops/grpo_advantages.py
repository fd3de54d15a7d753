"""``grpo_advantages``: group-normalised advantages with TRL's conventions (plain PyTorch on B numbers,
or the CUDA extension's kernel: one block per group). The CUDA kernel is the custom op
``pyfastrl::grpo_advantages_cuda``, so ``torch.compile(fullgraph=True)`` traces it as one node."""
from __future__ import annotations

import math
from numbers import Real

import torch

from pyfastrl._backend import require_device
from pyfastrl.kernels.grpo_loss import reference
from pyfastrl.ops._grpo_common import Validation, check_tensor, number, scale_rewards_name


@torch.library.custom_op("pyfastrl::grpo_advantages_cuda", mutates_args=())
def _cuda_advantages_op(rewards: torch.Tensor, group_index: torch.Tensor | None, group_size: int, num_groups: int,
                        scale: str, eps: float) -> torch.Tensor:
    """``(B,)`` float64 advantages from the extension's kernels; ``group_size`` 0: groups by ``group_index``."""
    from pyfastrl.kernels.grpo_loss import cuda

    return cuda.group_advantages(rewards, group_size or None, group_index, num_groups, scale, eps)


@_cuda_advantages_op.register_fake
def _(rewards, group_index, group_size, num_groups, scale, eps):
    return rewards.new_empty(rewards.shape, dtype=torch.float64)


def grpo_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    scale_rewards: str | bool = "group",
    eps: float = 1e-4,
    validate: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Group-normalised advantages (GRPO), as TRL's ``GRPOTrainer`` computes them.

    Args:
        rewards: ``(B,)`` one scalar reward per completion (any real dtype). NaN marks an
            unscorable completion (TRL: every reward function returned None): it is left out of
            its group's mean and std and gets advantage 0.
        group_size: completions per prompt, the groups being consecutive runs of ``group_size``
            rewards (TRL's layout). Exactly one of ``group_size`` / ``group_ids``.
        group_ids: ``(B,)`` integer group label of each completion (ragged groups, any order).
        scale_rewards: TRL's option. ``"group"`` (or True): ``(r - mean_g) / (std_g + eps)``;
            ``"batch"``: mean per group, std over the whole batch; ``"none"`` (or False; Dr. GRPO):
            ``r - mean_g``. Standard deviations are unbiased (Bessel), as TRL's.
        eps: added to the standard deviation (TRL: 1e-4; verl: 1e-6).
        validate: check that no reward is infinite (one host-device sync). Off by default: no sync
            (``group_ids`` syncs once anyway: numbering the groups needs their count on the host).
        backend: ``"torch"``, ``"cuda"`` (the CUDA extension's kernel, ``csrc/grpo_loss``: one
            block per group, same float64 arithmetic; needs ``PYFASTRL_BUILD_CUDA=1 pip install -e .``)
            or ``"auto"`` (= ``"torch"`` until a GPU has measured the kernel faster).

    Returns:
        ``(B,)`` advantages in the rewards' dtype (float32 for integer rewards). Computed in
        float64 with a shifted two-pass mean, so a group of identical rewards gets exactly 0 (TRL's
        E-then-subtract in the rewards' dtype can leave a residue there); a group with fewer than
        two scorable completions gets 0 (TRL: NaN, then 0).

    Raises:
        ValueError for a group size that does not divide B, an unknown ``scale_rewards`` or
        ``backend``, and (``validate=True``) an infinite reward, naming the first; RuntimeError when
        the ``"cuda"`` backend cannot run (extension not built, CPU tensors).
    """
    validation = Validation("grpo_advantages", validate)
    advantages = group_advantages(rewards, group_size, group_ids, scale_rewards, eps, validation, backend)
    validation.read()
    return advantages


ADVANTAGE_BACKENDS = ("auto", "torch", "cuda")


def group_advantages(rewards, group_size, group_ids, scale_rewards, eps, validation: Validation,
                     backend: str = "torch", op: str = "grpo_advantages") -> torch.Tensor:
    """``grpo_advantages`` with its value checks added to ``validation`` (read by the caller); ``op``
    names the public function in errors."""
    if backend not in ADVANTAGE_BACKENDS:
        raise ValueError(f"{op}: backend must be one of {ADVANTAGE_BACKENDS}, got {backend!r}")
    check_tensor(op, "rewards", rewards, (1,), None)
    if rewards.is_complex() or rewards.dtype == torch.bool:
        raise TypeError(f"{op}: rewards must be real numbers, got {rewards.dtype}")
    scale = scale_rewards_name(op, scale_rewards)
    if not (isinstance(eps, Real) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    num = rewards.numel()
    if (group_size is None) == (group_ids is None):
        raise ValueError(f"{op}: pass exactly one of group_size or group_ids")
    if group_size is not None:
        number(op, "group_size", group_size, above=0.0, integer=True)
        if num % int(group_size) != 0:
            raise ValueError(
                f"{op}: {num} rewards do not split into groups of group_size={group_size} "
                f"({num % int(group_size)} left over)"
            )
        group_size, group_index = int(group_size), None
        num_groups = num // group_size
    else:
        check_tensor(op, "group_ids", group_ids, (1,), None, rewards.device)
        if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.numel() != num:
            raise ValueError(f"{op}: group_ids must be an integer tensor with one label per reward ({num})")
        labels, group_index = torch.unique(group_ids, return_inverse=True)
        num_groups = labels.numel()
    if rewards.is_floating_point():
        infinite = torch.isinf(rewards)
        validation.add(infinite.any(), lambda: f"rewards[{int(infinite.nonzero()[0])}] is "
                                               f"{rewards[infinite].flatten()[0].item()}; rewards must be finite "
                                               "(NaN marks an unscorable completion)")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if backend == "cuda":
        require_device(op, backend, rewards.device)  # after the argument checks: those errors come first anywhere
        advantages = _cuda_advantages_op(rewards, group_index, group_size or 0, num_groups, scale, float(eps))
    else:
        if group_index is None:
            group_index = torch.arange(num, device=rewards.device) // group_size
        advantages = reference.group_advantages(rewards, group_index, num_groups, scale, float(eps))
    return advantages.to(out_dtype)
