"""A drop-in for TRL's ``GRPOTrainer`` whose policy, old and reference log-probs and loss run on
prefix-grouped batches.

    from pyfastrl.integrations.trl import GRPOTrainer   # instead of: from trl import GRPOTrainer

Same constructor, TRL's own ``GRPOConfig``; TRL's loop (generation, rewards, advantages, logging,
accelerate / DeepSpeed / FSDP) is untouched. Two methods change:

* ``_get_per_token_logps_and_entropies`` (old and reference log-probs, no gradient): the rows of
  each chunk are grouped by prompt, each prompt packed once followed by its completions, run through
  the ``"pyfastrl_prefix"`` attention, and ``selective_logprobs`` scores the completion tokens.
* ``_compute_loss``: the same grouping, then ``fused_linear_grpo_loss`` on the final hidden states
  and the LM head (logits never materialised; the gradients of hidden, weight and bias come out of
  the op's forward), with TRL's normalisation and TRL's metrics.

Both run inside the model's ``forward`` (a ``pyfastrl_grouped=`` mode added to it, like TRL's own
``fused_lm_head=``), so the hooks of DDP / FSDP / DeepSpeed wrappers around ``forward`` apply.

What cannot be grouped falls back to TRL's own code, with one warning per reason: model types the
grouped attention is not verified for, soft-capped or scaled final logits, attention dropout, an LM
head that is not a plain ``nn.Linear`` (e.g. a PEFT adapter on it), multimodal inputs, MoE auxiliary
losses, masks that are not left/right-padded runs, and loss options this trainer does not pass to the
fused op yet (loss types other than grpo, bnpo, dr_grpo, dapo and cispo, ``top_entropy_quantile < 1``,
``off_policy_mask_threshold``, vLLM importance-sampling correction, the entropy bonus, per-token
advantages).
"""
from __future__ import annotations

import functools
import types
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import trl
from accelerate.utils import is_peft_model
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from trl.trainer.utils import maybe_gather_lm_head_ctx, nanmax, nanmin

from pyfastrl import PrefixGroupLayout, selective_logprobs
from pyfastrl.ops.fused_linear_grpo_loss import fused_linear_grpo_loss
from pyfastrl.integrations.transformers import (
    ATTN_IMPLEMENTATION,
    SUPPORTED_MODEL_TYPES,
    GroupedBatch,
    completion_hidden_states,
    register,
)

# TRL versions whose GRPOTrainer internals this module was checked against (setup.py's "trl" extra).
SUPPORTED_TRL = ">=1.16,<1.17"
if Version(trl.__version__) not in SpecifierSet(SUPPORTED_TRL):
    warnings.warn(f"pyfastrl.integrations.trl is tested with trl{SUPPORTED_TRL}; found trl {trl.__version__}: the "
                  "methods it overrides may have changed", stacklevel=2)
# Loss types whose TRL options all reach fused_linear_grpo_loss.
FUSED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
# Inputs of TRL's multimodal models; a batch carrying any of them is not grouped.
_MULTIMODAL_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                      "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
# Config fields that scale the logits after the LM head (TRL's fused head reads the same ones).
_LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
_FORWARD_KWARG = "pyfastrl_grouped"


def _unsupported_model_reason(model) -> str | None:
    """Why ``model`` (a transformers causal LM) cannot run grouped, or None."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return (f"model type {config.model_type!r} is not verified with prefix grouping "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if getattr(text, "final_logit_softcapping", None) is not None:
        return "final_logit_softcapping post-processes the logits, which the fused loss does not reproduce"
    for name in _LOGIT_SCALES:
        if getattr(text, name, None) not in (None, 1, 1.0):
            return f"{name}={getattr(text, name)} scales the logits, which the fused loss does not reproduce"
    if getattr(text, "attention_dropout", 0.0):
        return f"attention dropout ({text.attention_dropout}) is not supported by the grouped attention"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return (f"the LM head is a {type(head).__name__}, not a plain nn.Linear (e.g. a PEFT adapter on it); the "
                "fused loss reads its weight directly")
    return None


def _add_grouped_forward(model) -> None:
    """Give ``model.forward`` a mode ``model(pyfastrl_grouped=fn)`` that returns ``fn(model)``: the grouped
    computations then run inside the forward that DDP / FSDP / DeepSpeed wrap (as TRL's ``fused_lm_head=``
    does). Without the keyword the forward is unchanged, so generation is too."""
    if getattr(model, "_pyfastrl_grouped_forward", False):
        return
    inner = model.forward

    @functools.wraps(type(model).forward)  # keep the signature: generate() validates its kwargs against it
    def forward(self, *args, pyfastrl_grouped=None, **kwargs):
        if pyfastrl_grouped is None:
            return inner(*args, **kwargs)
        return pyfastrl_grouped(self)

    model.forward = types.MethodType(forward, model)
    model._pyfastrl_grouped_forward = True


# --------------------------------------------------------------------------------------- grouping
@dataclass
class _Grouping:
    """Rows of a padded TRL batch regrouped by prompt.

    batch: the packed model input (each distinct prompt once, then its completions).
    order: ``(N,)`` the row of each packed completion. cu_seqlens: ``(N+1,)`` int32 offsets of the
    packed completion tokens. token_index: ``(K,)`` flat index into the ``(B, T)`` completion matrices
    of each packed completion token. A completion whose mask is all zero (TRL's
    ``mask_truncated_completions``) keeps its first token so that every row has one; its mask stays 0.
    """

    batch: GroupedBatch
    order: torch.Tensor
    cu_seqlens: torch.Tensor
    token_index: torch.Tensor

    def packed(self, per_token: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` -> the packed completion tokens ``(K,)``."""
        return per_token.reshape(-1)[self.token_index]

    def unpacked(self, packed: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        """Packed ``(K,)`` values -> ``(B, T)``, zero where ``completion_mask`` is 0 (as TRL returns them)."""
        out = packed.new_zeros(completion_mask.numel()).index_put_((self.token_index,), packed)
        return torch.where(completion_mask != 0, out.view(completion_mask.shape), 0.0)


def _group_rows(prompt_ids, prompt_mask, completion_ids, completion_mask) -> _Grouping | str:
    """Group TRL's left-padded prompts ``(B, P)`` and right-padded completions ``(B, T)`` by identical prompt;
    a string says why they cannot be. One host synchronisation (the lengths and group labels)."""
    prompt_width, width = prompt_ids.shape[1], completion_ids.shape[1]
    if prompt_width == 0 or width == 0:
        return "the batch has no prompt or no completion columns"
    device = prompt_ids.device
    prompt_on, completion_on = prompt_mask != 0, completion_mask != 0
    prompt_lens, completion_lens = prompt_on.sum(1), completion_on.sum(1)
    runs = ((prompt_on == (torch.arange(prompt_width, device=device) >= prompt_width - prompt_lens[:, None])).all(1)
            & (completion_on == (torch.arange(width, device=device) < completion_lens[:, None])).all(1))
    _, group_of_row = torch.unique(torch.where(prompt_on, prompt_ids, -1), dim=0, return_inverse=True)
    host = torch.stack([prompt_lens, completion_lens, group_of_row, runs.long()]).cpu()
    if not bool(host[3].all()):
        return "a prompt mask is not one left-padded run or a completion mask not one right-padded run"
    if bool((host[0] == 0).any()):
        return "a prompt is empty"
    groups: dict[int, list[int]] = {}
    for row, group in enumerate(host[2].tolist()):
        groups.setdefault(group, []).append(row)
    prompt_lens, lengths = host[0].tolist(), host[1].clamp(min=1).tolist()

    full_width = prompt_width + width
    source, logit_index, token_index, order, suffix_lens = [], [], [], [], []
    cursor = 0
    for members in groups.values():
        length = prompt_lens[members[0]]
        source.append(members[0] * full_width + prompt_width - length + torch.arange(length))
        last_prompt_position = cursor + length - 1
        cursor += length
        for row in members:
            size = lengths[row]
            source.append(row * full_width + prompt_width + torch.arange(size))
            # Token j of a completion is predicted at its position j-1; token 0 at the prompt's end.
            logit_index += [torch.tensor([last_prompt_position]), torch.arange(cursor, cursor + size - 1)]
            token_index.append(row * width + torch.arange(size))
            cursor += size
            order.append(row)
        suffix_lens.append([lengths[row] for row in members])
    layout = PrefixGroupLayout([prompt_lens[m[0]] for m in groups.values()], suffix_lens, device=device)
    token_index = torch.cat(token_index).to(device)
    packed_sizes = torch.tensor([lengths[row] for row in order])
    batch = GroupedBatch(
        input_ids=torch.cat([prompt_ids, completion_ids], 1).reshape(-1)[torch.cat(source).to(device)][None],
        position_ids=layout.position_ids[None],
        layout=layout,
        logit_index=torch.cat(logit_index).to(device),
        target_ids=completion_ids.reshape(-1)[token_index],
        completion_lens=packed_sizes.to(device),
    )
    cu_seqlens = torch.nn.functional.pad(packed_sizes.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
    return _Grouping(batch, torch.tensor(order, device=device), cu_seqlens, token_index)


def _hidden_and_head(model, batch: GroupedBatch):
    """Final hidden states at the positions predicting completion tokens, and the LM head's weight and bias,
    in one dtype (the head's: with ``cast_lm_head_to_fp32`` TRL keeps it in float32)."""
    hidden = completion_hidden_states(model, batch)
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):  # FSDP2 DTensor: gather the head once, as TRL's fused head does
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    return hidden.to(weight.dtype), weight, bias


def _lm_head_context(weight, bias):
    """ZeRO-3 gathers the head for direct access; the fused ops do their own precision (no autocast)."""
    autocast_off = torch.autocast(weight.device.type, enabled=False) if weight.device.type in ("cuda", "cpu") \
        else nullcontext()
    return maybe_gather_lm_head_ctx(weight, bias), autocast_off


# --------------------------------------------------------------------------------------- trainer
class GRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with prefix-grouped log-probs and the fused GRPO loss (see the module doc).

    Same constructor and ``trl.GRPOConfig``. After TRL's set-up, the policy (and the reference model)
    get the ``"pyfastrl_prefix"`` attention (a forward without a grouped layout is transformers' SDPA,
    so generation is unchanged) and the grouped forward mode. Falls back to TRL's path, warning once
    per reason, for what it cannot group.
    """

    @functools.wraps(trl.GRPOTrainer.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fallbacks_warned: set[str] = set()
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        models = [m for m in (policy, self.ref_model) if m is not None]
        self._model_reason = next((r for r in map(_unsupported_model_reason, models) if r is not None), None)
        if self._model_reason is None:
            register()
            for model in models:
                model.set_attn_implementation(ATTN_IMPLEMENTATION)
                _add_grouped_forward(model)
        self._loss_reason = self._model_reason or self._unsupported_loss_reason()

    def _unsupported_loss_reason(self) -> str | None:
        if self.loss_type not in FUSED_LOSS_TYPES:
            return f"loss_type={self.loss_type!r} is not in the fused loss ({', '.join(FUSED_LOSS_TYPES)})"
        if self.top_entropy_quantile < 1.0:
            return "top_entropy_quantile < 1 masks tokens by their entropy before the loss"
        if self.off_policy_mask_threshold is not None:
            return "off_policy_mask_threshold masks sequences by their KL before the loss"
        if self.use_vllm and self.vllm_importance_sampling_correction:
            return "vLLM importance-sampling correction weights the token losses"
        if self._entropy_bonus_enabled:
            return "the entropy bonus adds an entropy term to the loss"
        if self.aux_loss_enabled:
            return "the MoE router auxiliary loss needs the model's router logits"
        return None

    def _fall_back(self, reason: str) -> None:
        if reason not in self._fallbacks_warned:
            self._fallbacks_warned.add(reason)
            warnings.warn(f"pyfastrl GRPOTrainer: {reason}; TRL's own (ungrouped) path is used for it", stacklevel=3)

    # ----------------------------------------------------------------------------------- log-probs
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        # With gradients on, this is the policy pass of TRL's own loss: that path already fell back.
        reason = None if torch.is_grad_enabled() else self._logps_reason(compute_aux_loss, multimodal)
        if torch.is_grad_enabled() or reason is not None:
            if reason is not None:
                self._fall_back(reason)
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            out = self._grouped_logps(model, input_ids[rows], attention_mask[rows], logits_to_keep)
            if isinstance(out, str):
                self._fall_back(out)
                out = super()._get_per_token_logps_and_entropies(
                    model, input_ids[rows], attention_mask[rows], logits_to_keep, compute_entropy=compute_entropy)[:2]
            logps.append(out[0])
            entropies.append(out[1])
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def _logps_reason(self, compute_aux_loss, multimodal) -> str | None:
        if self._model_reason is not None:
            return self._model_reason
        if compute_aux_loss:
            return "the MoE router auxiliary loss needs the model's router logits"
        present = sorted(name for name, value in multimodal.items() if value is not None)
        if present:
            return f"multimodal inputs ({', '.join(present)}) are not grouped"
        return None

    def _grouped_logps(self, model, input_ids, attention_mask, logits_to_keep):
        """``(logps, entropies)`` ``(B, T)`` of one chunk, or why it cannot be grouped."""
        completion_mask = attention_mask[:, -logits_to_keep:]
        grouping = _group_rows(input_ids[:, :-logits_to_keep], attention_mask[:, :-logits_to_keep],
                               input_ids[:, -logits_to_keep:], completion_mask)
        if isinstance(grouping, str):
            return grouping

        def score(module):
            hidden, weight, bias = _hidden_and_head(module, grouping.batch)
            gather, autocast_off = _lm_head_context(weight, bias)
            with gather, autocast_off:
                return selective_logprobs(hidden, weight, grouping.batch.target_ids, bias=bias,
                                          temperature=self.temperature, return_entropy=True)

        with self.accelerator.autocast():
            logps, entropies = model(**{_FORWARD_KWARG: score})
        return grouping.unpacked(logps, completion_mask), grouping.unpacked(entropies, completion_mask)

    # ----------------------------------------------------------------------------------- loss
    def _compute_loss(self, model, inputs):
        reason = self._loss_reason or self._inputs_reason(inputs)
        grouping = None
        if reason is None:
            grouping = _group_rows(inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
                                   inputs["completion_mask"])
            reason = grouping if isinstance(grouping, str) else None
        if reason is not None:
            self._fall_back(reason)
            return super()._compute_loss(model, inputs)

        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        old = inputs.get("old_per_token_logps")
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        options = dict(
            advantages=inputs["advantages"][grouping.order], beta=self.beta, epsilon=self.epsilon_low,
            epsilon_high=self.epsilon_high, loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length,
            use_bias_correction_kl=self.args.use_bias_correction_kl, delta=self.args.delta,
            old_per_token_logps=None if old is None else grouping.packed(old),
            ref_per_token_logps=grouping.packed(inputs["ref_per_token_logps"]) if self.beta != 0.0 else None,
        )
        if self.loss_type in ("dapo", "cispo"):
            # TRL: num_items_in_batch spans the generation batch; rescaled to one accumulation window.
            normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normaliser = normaliser * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            options["num_items_in_batch"] = normaliser

        def loss_and_logps(module):
            hidden, weight, bias = _hidden_and_head(module, grouping.batch)
            gather, autocast_off = _lm_head_context(weight, bias)
            with gather, autocast_off:
                loss, metrics = fused_linear_grpo_loss(
                    hidden, weight, grouping.batch.target_ids, grouping.packed(mask), bias=bias,
                    temperature=self.temperature, cu_seqlens=grouping.cu_seqlens, **options)
                # The clip metrics need the current log-probs when the rollout is off-policy (on-policy the
                # ratio is exactly 1).
                logps = None if old is None else selective_logprobs(
                    hidden.detach(), weight.detach(), grouping.batch.target_ids, bias=bias,
                    temperature=self.temperature)
            return loss, metrics, logps

        with self.accelerator.autocast():
            loss, metrics, logps = model(**{_FORWARD_KWARG: loss_and_logps})
        if self.loss_type not in ("dapo", "cispo"):
            loss = loss / accumulation
        logps = None if logps is None else grouping.unpacked(logps, completion_mask)
        self._log_loss_metrics(mode, metrics, mask, inputs["advantages"], logps, old)
        return loss

    def _inputs_reason(self, inputs) -> str | None:
        if inputs["advantages"].dim() != 1:
            return "per-token (B, T) advantages are not taken by the fused loss"
        present = sorted(name for name in _MULTIMODAL_INPUTS if inputs.get(name) is not None)
        if present:
            return f"multimodal inputs ({', '.join(present)}) are not grouped"
        return None

    def _log_loss_metrics(self, mode, metrics, mask, advantages, logps, old) -> None:
        """TRL's loss metrics (its formulas, reduced over processes the same way)."""
        def global_masked_mean(x):
            if x.shape[1] == 1:  # sequence level: one value per sequence
                local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
            else:
                local = torch.stack([(x * mask).sum(), mask.sum().float()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def masked_seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        def global_token_mean(local_mean):  # the op's means over this process's tokens
            count = mask.sum().float()
            totals = self.accelerator.reduce(torch.stack([local_mean.float() * count, count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(global_token_mean(metrics["kl"]))
        self._metrics[mode]["entropy"].append(global_token_mean(metrics["entropy"]))

        advantages = advantages.unsqueeze(1)
        log_ratio = torch.zeros_like(mask, dtype=torch.float32) if logps is None else logps - old
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        ratio = torch.exp(log_ratio)
        if self.loss_type == "cispo":
            clipped = (ratio > self.epsilon_high) & (advantages > 0)
            self._metrics[mode]["cispo_clip_ratio"].append(global_masked_mean(clipped.float()))
            return
        if self.args.delta is not None:
            ratio = torch.clamp(ratio, max=self.args.delta)
        low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(low))
        self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(high))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
        self._metrics[mode]["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
        self._metrics[mode]["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
