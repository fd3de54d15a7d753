# TEMP until grpo-parity merges: delete this file and import fused_linear_grpo_loss from pyfastrl
# (its two users: pyfastrl/trainer/trainer.py and pyfastrl/integrations/trl.py).
"""``fused_linear_grpo_loss`` under TRL's argument names, on top of the op that still takes the old
ones (mask, old_logprobs, ref_logprobs, eps_low, eps_high, kl_estimator)."""
from __future__ import annotations

from pyfastrl.ops.grpo_loss import fused_linear_grpo_loss as _op


def fused_linear_grpo_loss(hidden, lm_head_weight, completion_ids, completion_mask, *, advantages,
                           old_per_token_logps=None, ref_per_token_logps=None, beta=0.0, epsilon=0.2,
                           epsilon_high=None, loss_type="dapo", importance_sampling_level="token",
                           max_completion_length=None, use_bias_correction_kl=True, delta=None,
                           num_items_in_batch=None, **rest):
    return _op(hidden, lm_head_weight, completion_ids, completion_mask, advantages=advantages,
               old_logprobs=old_per_token_logps, ref_logprobs=ref_per_token_logps, beta=beta, eps_low=epsilon,
               eps_high=epsilon if epsilon_high is None else epsilon_high, loss_type=loss_type,
               importance_sampling_level=importance_sampling_level, max_completion_length=max_completion_length,
               kl_estimator="k3_corrected" if use_bias_correction_kl else "k3", delta=delta,
               num_items_in_batch=num_items_in_batch, **rest)
