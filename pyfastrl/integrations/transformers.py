"""Prefix grouping as a drop-in attention for HuggingFace transformers decoders.

    from pyfastrl.integrations import transformers as pft
    pft.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="pyfastrl_prefix")
    batch = pft.build_grouped_batch(prompt_ids, completion_ids)
    logprobs, mask = pft.completion_logprobs(model, batch)

How it plugs in: ``register()`` adds ``"pyfastrl_prefix"`` to transformers' ``AttentionInterface``
and ``AttentionMaskInterface``. A grouped forward passes ``prefix_layout=`` through the model's
forward kwargs, which transformers hands to every attention call. For such a forward the mask
entry returns None, so transformers neither builds a dense mask nor splits the batch where the
position ids restart (which would cut every completion off its prompt); the attention function
then runs ``prefix_grouped_attention`` on the layout, with the layer's ``scaling``, ``softcap``
and ``sliding_window`` as transformers passes them (so Gemma2's logit soft-capping and the
sliding-window layers of Mistral, Qwen2, Gemma2/3 and Phi3 group too). Without a layout
(generation, evaluation) it is transformers' SDPA attention with transformers' own masks, or the
model's eager attention for a soft-capped layer (SDPA cannot soft-cap).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from pyfastrl import PrefixGroupLayout, prefix_grouped_attention

ATTN_IMPLEMENTATION = "pyfastrl_prefix"
LAYOUT_KWARG = "prefix_layout"
# transformers' eager attention with a float32-safe mask (see model_eager_attention).
EAGER_REFERENCE = "pyfastrl_eager"
# Model types whose tiny configs are tested for equivalence (tests/test_transformers_integration.py).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3")


def _check_model_type(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"pyfastrl prefix grouping is not verified for model type {model_type!r}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _grouped_attention(module, query, key, value, attention_mask, layout, scaling, dropout, kwargs):
    if attention_mask is not None:
        raise ValueError(
            "an attention_mask was passed together with a grouped batch (prefix_layout); the layout "
            "already defines which tokens see which: drop attention_mask"
        )
    _check_model_type(module.config)
    if query.shape[0] != 1:
        raise ValueError(f"a grouped batch packs everything in one row; got batch size {query.shape[0]}")
    if module.training and dropout > 0:
        raise NotImplementedError("attention dropout is not supported with prefix grouping; set attention_dropout=0")
    if not getattr(module, "is_causal", True):
        raise NotImplementedError(
            "bidirectional attention (e.g. use_bidirectional_attention=True) cannot be prefix-grouped: a prompt "
            "token would see its completions"
        )
    # (1, H, T, D) -> (T, H, D) views with a unit-stride head dim: read in place, no copy.
    # transformers passes the layer's own softcap (Gemma2) and window (None on full-attention layers).
    out = prefix_grouped_attention(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), layout, softmax_scale=scaling,
        softcap=kwargs.get("softcap"), sliding_window=kwargs.get("sliding_window"),
    )
    return out.unsqueeze(0), None


def _fallback_attention(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    softcap = kwargs.get("softcap")
    if attention_mask is None and q_len > 1:
        # Our mask entry returned None for a cache-free, padding-free call (see sdpa_mask_unless_plain_causal); what a
        # real mask would have carried is handled here instead.
        positions = kwargs.get("position_ids")
        if positions is not None and not torch.compiler.is_compiling():
            steps = positions.diff(dim=-1)
            if bool((steps != 1).any()):
                raise ValueError(
                    "position_ids restart inside a row but no prefix_layout was passed: packed sequences need "
                    "a grouped batch (pyfastrl.integrations.transformers.build_grouped_batch) or an attention_mask"
                )
        window = kwargs.get("sliding_window")
        if (window is not None and kv_len > window) or softcap is not None:
            rows = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
            cols = torch.arange(kv_len, device=query.device)[None, :]
            attention_mask = cols <= rows
            if window is not None:
                attention_mask &= rows - cols < window
            attention_mask = attention_mask[None, None]
    attention = sdpa_attention_forward if softcap is None else model_eager_attention  # SDPA would drop the cap
    return attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def model_eager_attention(module, query, key, value, attention_mask, **kwargs):
    """The eager attention function of the module's own transformers model file (the one that
    applies ``softcap``), registered as ``"pyfastrl_eager"``: ``verify_equivalence``'s reference for
    soft-capped models. ``attention_mask`` may be boolean (True = attend) or additive; blocked
    entries get the most negative value finite in float32, the dtype of eager attention's softmax:
    transformers' float64 mask value becomes -inf there, which turns a fully masked padding row
    into NaN."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"{type(module).__module__} has no eager attention function to soft-cap with")
    if attention_mask is not None:
        blocked = max(torch.finfo(query.dtype).min, torch.finfo(torch.float32).min)
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attention_mask, blocked)
        else:
            attention_mask = attention_mask.clamp(min=blocked)
    return eager(module, query, key, value, attention_mask, **kwargs)


def prefix_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function for ``"pyfastrl_prefix"``. ``query (B, Hq, L, D)``,
    ``key, value (B, Hkv, L, D)``; returns ``(B, L, Hq, D)`` and no attention weights."""
    layout = kwargs.pop(LAYOUT_KWARG, None)
    if layout is None:
        return _fallback_attention(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    return _grouped_attention(module, query, key, value, attention_mask, layout, scaling, dropout, kwargs)


def sdpa_mask_unless_plain_causal(*, attention_mask=None, q_offset=0, kv_offset=0, q_length=None, kv_length=None,
                                  **kwargs):
    """Mask entry of our attention registrations: None for a cache-free call without a padding mask
    (a grouped forward owns its mask; a plain causal one needs none, the op is causal), transformers'
    SDPA mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    no_cache = (q_offset == 0 or q_offset is None) and kv_offset == 0 and kv_length == q_length
    if attention_mask is None and no_cache:
        return None
    return sdpa_mask(attention_mask=attention_mask, q_offset=q_offset, kv_offset=kv_offset, q_length=q_length,
                     kv_length=kv_length, **kwargs)


def register() -> None:
    """Register ``"pyfastrl_prefix"`` (and ``"pyfastrl_eager"``, see ``model_eager_attention``) with
    transformers (idempotent). Afterwards use ``from_pretrained(..., attn_implementation="pyfastrl_prefix")``
    or ``model.set_attn_implementation("pyfastrl_prefix")``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask_unless_plain_causal)
    AttentionInterface.register(EAGER_REFERENCE, model_eager_attention)
    AttentionMaskInterface.register(EAGER_REFERENCE, eager_mask)


# ---------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------
@dataclass
class GroupedBatch:
    """Prompts packed once, each followed by its completions (see ``build_grouped_batch``).

    input_ids, position_ids: ``(1, T)``. layout: the ``PrefixGroupLayout``.
    logit_index: ``(K,)`` packed positions whose logits predict the completion tokens, completion
        by completion (a completion's first token is predicted at its prompt's last position).
    target_ids: ``(K,)`` the predicted tokens. completion_lens: ``(N,)`` tokens per completion.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    layout: PrefixGroupLayout
    logit_index: torch.Tensor
    target_ids: torch.Tensor
    completion_lens: torch.Tensor

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, LAYOUT_KWARG: self.layout}


@dataclass
class RepeatedBatch:
    """The standard batch: one padded row ``[prompt ; completion]`` per completion.

    input_ids, attention_mask, position_ids: ``(N, L)``. logit_index: ``(K,)`` flat indices into
    ``N * L`` of the positions predicting completion tokens; target_ids, completion_lens as above.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    logit_index: torch.Tensor
    target_ids: torch.Tensor
    completion_lens: torch.Tensor

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def _validated_ids(prompt_ids, completion_ids, device):
    """Checked prompts and completions on the CPU, and the batch's device (default: the prompts')."""
    if not isinstance(prompt_ids, (list, tuple)) or len(prompt_ids) == 0:
        raise ValueError("prompt_ids must be a non-empty list of 1-D LongTensors (one per prompt)")
    if not isinstance(completion_ids, (list, tuple)) or len(completion_ids) != len(prompt_ids):
        raise ValueError(
            f"completion_ids must be a list with one list of completions per prompt ({len(prompt_ids)} prompts)"
        )
    for g, prompt in enumerate(prompt_ids):
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 1 or prompt.dtype != torch.long:
            raise ValueError(f"prompt_ids[{g}] must be a 1-D LongTensor")
        if prompt.numel() == 0:
            raise ValueError(f"prompt_ids[{g}] is empty; every prompt needs at least one token")
        completions = completion_ids[g]
        if not isinstance(completions, (list, tuple)) or len(completions) == 0:
            raise ValueError(f"completion_ids[{g}] must be a non-empty list of completions")
        for i, completion in enumerate(completions):
            if not isinstance(completion, torch.Tensor) or completion.dim() != 1 or completion.dtype != torch.long:
                raise ValueError(f"completion_ids[{g}][{i}] must be a 1-D LongTensor")
            if completion.numel() == 0:
                raise ValueError(f"completion_ids[{g}][{i}] is empty (zero-length completion)")
    device = prompt_ids[0].device if device is None else torch.device(device)
    return [p.cpu() for p in prompt_ids], [[c.cpu() for c in cs] for cs in completion_ids], device


def build_grouped_batch(prompt_ids, completion_ids, *, device=None) -> GroupedBatch:
    """Pack every prompt once followed by its completions.

    Args:
        prompt_ids: list of 1-D LongTensors, one per prompt.
        completion_ids: list (per prompt) of lists of 1-D LongTensors (G ragged completions each).
        device: where the batch lives (default: the prompts' device).
    """
    prompts, completions, device = _validated_ids(prompt_ids, completion_ids, device)
    layout = PrefixGroupLayout([p.numel() for p in prompts], [[c.numel() for c in cs] for cs in completions],
                               device=device)
    pieces, logit_index, targets = [], [], []
    cursor = 0
    for prompt, group in zip(prompts, completions):
        pieces.append(prompt)
        last_prompt = cursor + prompt.numel() - 1
        cursor += prompt.numel()
        for completion in group:
            pieces.append(completion)
            # Token j of a completion is predicted at position j-1 of it; token 0 at the prompt's end.
            logit_index.append(last_prompt)
            logit_index.extend(range(cursor, cursor + completion.numel() - 1))
            targets.append(completion)
            cursor += completion.numel()
    return GroupedBatch(
        input_ids=torch.cat(pieces).to(device)[None],
        position_ids=layout.position_ids[None],
        layout=layout,
        logit_index=torch.tensor(logit_index, dtype=torch.long, device=device),
        target_ids=torch.cat(targets).to(device),
        completion_lens=torch.tensor([c.numel() for cs in completions for c in cs], device=device),
    )


def build_repeated_batch(prompt_ids, completion_ids, *, padding_side="right", pad_token_id=0,
                         device=None) -> RepeatedBatch:
    """The repeated-prompt batch for comparison: one row ``[prompt ; completion]`` per completion,
    padded on ``padding_side`` ("left" or "right") with ``pad_token_id``."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    prompts, completions, device = _validated_ids(prompt_ids, completion_ids, device)
    rows = [(p, c) for p, cs in zip(prompts, completions) for c in cs]
    width = max(p.numel() + c.numel() for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    logit_index, targets = [], []
    for r, (prompt, completion) in enumerate(rows):
        length = prompt.numel() + completion.numel()
        start = width - length if padding_side == "left" else 0
        input_ids[r, start : start + length] = torch.cat([prompt, completion])
        attention_mask[r, start : start + length] = 1
        first = start + prompt.numel() - 1  # predicts the completion's first token
        logit_index.extend(r * width + first + j for j in range(completion.numel()))
        targets.append(completion)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return RepeatedBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        logit_index=torch.tensor(logit_index, dtype=torch.long, device=device),
        target_ids=torch.cat(targets).to(device),
        completion_lens=torch.tensor([c.numel() for _, c in rows], device=device),
    )


# ---------------------------------------------------------------------------------------------------
# Log-probs
# ---------------------------------------------------------------------------------------------------
def completion_logprobs(model, batch, *, temperature: float = 1.0, return_entropy: bool = False):
    """Per-token log-probs of every completion token, for a grouped, a repeated or a tree batch.

    The LM head runs only at the positions that predict completion tokens (``logits_to_keep``),
    never on prompt positions; model-specific logit processing (e.g. Gemma2's final soft-capping)
    is kept. Log-softmax in float32 (float64 for float64 models).

    Returns:
        logprobs ``(N, S_max)`` (zero where masked), mask ``(N, S_max)`` bool, and with
        ``return_entropy`` the per-token entropy ``(N, S_max)``; N completions in the order of
        ``completion_ids``. For a ``TreeBatch`` (``build_tree_batch``): ``(N, max_completion_len)``
        with row i the log-probs of sequence i's masked tokens in token order, from one forward over
        the packed tree (``transformers_tree.tree_completion_logprobs``, no host-device sync).
    """
    from pyfastrl.integrations.transformers_tree import TreeBatch, tree_completion_logprobs

    if isinstance(batch, TreeBatch):
        return tree_completion_logprobs(model, batch, temperature=temperature, return_entropy=return_entropy)
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    config = model.config
    vocab = config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size
    if int(batch.input_ids.max()) >= vocab or int(batch.input_ids.min()) < 0:
        raise ValueError(f"token ids must lie in [0, {vocab}) (the model's vocab); got "
                         f"[{int(batch.input_ids.min())}, {int(batch.input_ids.max())}]")
    if isinstance(batch, GroupedBatch):
        if config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"a grouped batch needs the model's attention set to {ATTN_IMPLEMENTATION!r} "
                f"(it is {config._attn_implementation!r}): call register() and "
                f"model.set_attn_implementation({ATTN_IMPLEMENTATION!r})"
            )
        _check_model_type(config)
        logits = model(**batch.model_inputs(), logits_to_keep=batch.logit_index, use_cache=False).logits[0]
    elif isinstance(batch, RepeatedBatch):
        width = batch.input_ids.shape[1]
        columns, where = torch.unique(batch.logit_index % width, return_inverse=True)
        logits = model(**batch.model_inputs(), logits_to_keep=columns, use_cache=False).logits
        logits = logits[batch.logit_index // width, where]
    else:
        raise TypeError(f"batch must be a GroupedBatch, RepeatedBatch or TreeBatch, got {type(batch).__name__}")

    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    log_probs = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
    token_logprobs = log_probs.gather(-1, batch.target_ids[:, None])[:, 0]

    lens = batch.completion_lens
    mask = torch.arange(int(lens.max()), device=lens.device)[None, :] < lens[:, None]
    out = token_logprobs.new_zeros(mask.shape).masked_scatter(mask, token_logprobs)
    if not return_entropy:
        return out, mask
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return out, mask, entropy.new_zeros(mask.shape).masked_scatter(mask, entropy)


def completion_hidden_states(model, batch) -> torch.Tensor:
    """The final hidden states at the positions that predict completion tokens, ``(K, H)`` in
    completion order (as ``batch.target_ids``): what ``fused_linear_grpo_loss`` takes with the LM head
    ``model.get_output_embeddings()``, so the logits are never materialised. Works on a grouped, a
    repeated or a tree batch (``build_tree_batch``). Models that post-process logits (final
    soft-capping) are refused: the fused loss would skip that step."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "final_logit_softcapping", None) is not None:
        raise NotImplementedError(
            f"final_logit_softcapping={config.final_logit_softcapping} post-processes the logits, which the fused "
            "loss does not reproduce; use completion_logprobs and grpo_loss instead"
        )
    if isinstance(batch, GroupedBatch):
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"a grouped batch needs the model's attention set to {ATTN_IMPLEMENTATION!r}")
        hidden = model.base_model(**batch.model_inputs(), use_cache=False).last_hidden_state[0]
        return hidden.index_select(0, batch.logit_index)
    if isinstance(batch, RepeatedBatch):
        hidden = model.base_model(**batch.model_inputs(), use_cache=False).last_hidden_state
        return hidden.flatten(0, 1).index_select(0, batch.logit_index)
    from pyfastrl.integrations.transformers_tree import TreeBatch, tree_hidden_states

    if isinstance(batch, TreeBatch):
        return tree_hidden_states(model, batch)
    raise TypeError(f"batch must be a GroupedBatch, RepeatedBatch or TreeBatch, got {type(batch).__name__}")


# ---------------------------------------------------------------------------------------------------
# Model-level equivalence check
# ---------------------------------------------------------------------------------------------------
_TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
# A sliding window shorter than a tiny rollout's prompt + completion, so that windows bind.
_TINY_WINDOW = 8
# Built-in tiny randomly initialised configs (no downloads): name -> (config class, overrides). Models
# with sliding windows get a short one (Qwen2: layer 1 slides, layer 0 is full; Gemma2/3: layer 0
# slides); Gemma2 keeps its real attention and final logit soft-capping (50, 30).
TINY_CONFIGS = {
    "tiny-llama": ("LlamaConfig", {}),
    "tiny-qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": _TINY_WINDOW, "max_window_layers": 1}),
    "tiny-qwen3": ("Qwen3Config", {}),
    "tiny-mistral": ("MistralConfig", {"sliding_window": _TINY_WINDOW}),
    "tiny-gemma2": ("Gemma2Config", {"query_pre_attn_scalar": 16, "sliding_window": _TINY_WINDOW}),
    "tiny-gemma3": ("Gemma3TextConfig", {"query_pre_attn_scalar": 16, "sliding_window": _TINY_WINDOW,
                                         "layer_types": ["sliding_attention", "full_attention"]}),
    "tiny-phi3": ("Phi3Config", {"sliding_window": _TINY_WINDOW}),
}
# Relative tolerance (max |grouped - repeated| / max |repeated|) of verify_equivalence per dtype.
# Per parameter, so tiny gradients (cancellation noise) set the bar. float64 is floored near 1e-7 by
# transformers' RMSNorm, which computes in float32 whatever the model dtype.
TOLERANCES = {torch.float64: 1e-5, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def tiny_model(name: str, *, dtype=torch.float32, seed: int = 0, **overrides):
    """A built-in tiny randomly initialised causal LM (one of ``TINY_CONFIGS``) using
    ``"pyfastrl_prefix"`` attention."""
    import transformers

    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; built-in: {', '.join(TINY_CONFIGS)}")
    register()
    class_name, extra = TINY_CONFIGS[name]
    config = getattr(transformers, class_name)(**{**_TINY, **extra, **overrides})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION,
                                                         dtype=dtype)


@dataclass
class EquivalenceReport:
    """What ``verify_equivalence`` measured: relative and absolute max differences between the
    grouped and the repeated batch, for completion log-probs and every parameter gradient."""

    model: str
    dtype: str
    reference_attention: str  # transformers' attention implementation run on the repeated batch
    tolerance: float
    logprob_abs: float
    logprob_rel: float
    grad_rel: dict  # parameter name -> (max abs diff, max abs diff / max |repeated grad|)
    tokens_repeated: int
    tokens_grouped: int
    seconds_repeated: float
    seconds_grouped: float
    # "grouped" (verify_equivalence: one-level groups vs repeated prompts) or "tree"
    # (verify_tree_equivalence: a prefix tree vs one padded row per sequence).
    batch_kind: str = "grouped"

    @property
    def worst_grads(self) -> list:
        return sorted(self.grad_rel.items(), key=lambda item: item[1][1], reverse=True)

    @property
    def passed(self) -> bool:
        worst = self.worst_grads[0][1][1] if self.grad_rel else 0.0
        return self.logprob_rel <= self.tolerance and worst <= self.tolerance

    def summary(self, top: int = 5) -> str:
        kind = self.batch_kind
        ref = "repeated" if kind == "grouped" else "per-sequence"
        lines = [
            f"model {self.model} ({self.dtype}); tolerance {self.tolerance:.0e} (relative to the largest value)",
            f"{ref} batch: transformers {self.reference_attention!r} attention; {kind} batch: "
            f"{ATTN_IMPLEMENTATION!r}",
            f"tokens through the model: {ref} {self.tokens_repeated:,} -> {kind} {self.tokens_grouped:,} "
            f"({self.tokens_repeated / self.tokens_grouped:.2f}x fewer)",
            f"forward+backward wall time: {ref} {self.seconds_repeated:.3f} s, {kind} {self.seconds_grouped:.3f} s",
            f"completion log-probs: max abs diff {self.logprob_abs:.3e}, relative {self.logprob_rel:.3e}",
            f"parameter gradients ({len(self.grad_rel)} tensors), worst {min(top, len(self.grad_rel))}:",
        ]
        lines += [f"  {name:<60} abs {a:.3e}  rel {r:.3e}" for name, (a, r) in self.worst_grads[:top]]
        lines.append(f"PASS: {kind} and {ref} batches give the same log-probs and gradients" if self.passed
                     else "FAIL: differences exceed the tolerance")
        return "\n".join(lines)


def _reference_attention(config) -> str:
    """transformers' own attention for the repeated batch: SDPA, or the model's eager attention where
    a layer soft-caps its logits (transformers' SDPA path ignores ``softcap``)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return "sdpa" if getattr(text_config, "attn_logit_softcapping", None) is None else EAGER_REFERENCE


def _random_rollout(vocab: int, num_prompts: int, group_size: int, prompt_len: int, completion_len: int,
                    generator: torch.Generator):
    def ids(length):
        return torch.randint(3, vocab, (length,), generator=generator)

    def length(longest):
        return int(torch.randint(max(1, longest // 2), longest + 1, (1,), generator=generator))

    prompts = [ids(length(prompt_len)) for _ in range(num_prompts)]
    completions = [[ids(length(completion_len)) for _ in range(group_size)] for _ in range(num_prompts)]
    return prompts, completions


def verify_equivalence(model="tiny-llama", *, group_size: int = 4, num_prompts: int = 2, prompt_len: int = 64,
                       completion_len: int = 32, dtype=torch.float32, device=None, seed: int = 0,
                       padding_side: str = "left", gradient_checkpointing: bool = False,
                       tolerance: float | None = None) -> EquivalenceReport:
    """Run the repeated-prompt batch (transformers' SDPA attention; eager for a model whose attention
    logits are soft-capped) and the grouped batch (``"pyfastrl_prefix"``) on the same random rollout,
    forward and backward through a GRPO-like loss, and compare completion log-probs and every
    parameter gradient. Soft-capping and sliding windows run as the model's config sets them.

    Args:
        model: a built-in tiny config name (``TINY_CONFIGS``), a local HF model directory, or a
            loaded ``PreTrainedModel``.
        group_size, num_prompts: completions per prompt and prompts. prompt_len, completion_len:
            longest lengths; actual lengths are drawn from [len/2, len].
        dtype: model dtype when loading (ignored for a loaded model). device: default the loaded
            model's device, else CUDA if available. A loaded model gets its attention implementation,
            train/eval mode and gradient-checkpointing setting back afterwards; its gradients are cleared.
        padding_side: padding of the repeated batch. tolerance: relative, default ``TOLERANCES[dtype]``.

    ``verify_tree_equivalence`` (``transformers_tree``) is the same check for prefix trees.
    """
    if group_size < 1 or num_prompts < 1 or prompt_len < 1 or completion_len < 1:
        raise ValueError("group_size, num_prompts, prompt_len and completion_len must be >= 1")

    def batches(vocab, generator, pad_token_id, device):
        prompts, completions = _random_rollout(vocab, num_prompts, group_size, prompt_len, completion_len, generator)
        repeated = build_repeated_batch(prompts, completions, padding_side=padding_side, pad_token_id=pad_token_id,
                                        device=device)
        return repeated, build_grouped_batch(prompts, completions, device=device)

    return _compare_batches(model, batches, batch_kind="grouped", dtype=dtype, device=device, seed=seed,
                            gradient_checkpointing=gradient_checkpointing, tolerance=tolerance)


def _compare_batches(model, batches, *, batch_kind: str, dtype, device, seed: int, gradient_checkpointing: bool,
                     tolerance: float | None) -> EquivalenceReport:
    """The body of ``verify_equivalence`` and ``verify_tree_equivalence``: load ``model``, build
    ``(reference_batch, packed_batch) = batches(vocab, generator, pad_token_id, device)`` (the
    reference a ``RepeatedBatch``), draw one advantage per row of the log-probs from the same
    generator, and compare log-probs and gradients of a GRPO-like loss."""
    import time

    register()
    if device is None and not isinstance(model, str):
        device = next(model.parameters()).device
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(model, str):
        name = model
        if model in TINY_CONFIGS:
            model = tiny_model(model, dtype=dtype, seed=seed)
        else:
            import os

            import transformers

            if not os.path.isdir(model):
                raise ValueError(f"model {model!r} is neither a local directory nor a built-in tiny config "
                                 f"({', '.join(TINY_CONFIGS)})")
            model = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dtype,
                                                                      attn_implementation=ATTN_IMPLEMENTATION)
    else:
        name = type(model).__name__
    _check_model_type(model.config)
    model.to(device)
    dtype = next(model.parameters()).dtype
    tolerance = TOLERANCES[dtype] if tolerance is None else tolerance
    was_training, was_checkpointing = model.training, model.is_gradient_checkpointing
    if gradient_checkpointing and not was_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()

    generator = torch.Generator().manual_seed(seed)
    repeated, packed = batches(model.config.vocab_size, generator, model.config.pad_token_id or 0, device)
    advantages = torch.randn(repeated.completion_lens.numel(), generator=generator, dtype=torch.float64).to(device)
    original = model.config._attn_implementation
    reference = _reference_attention(model.config)

    def step(batch, implementation):
        model.set_attn_implementation(implementation)
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logprobs, mask = completion_logprobs(model, batch)
        ratio = torch.exp(logprobs - logprobs.detach())
        loss = -(advantages[:, None].to(ratio.dtype) * ratio * mask).sum() / mask.sum()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        grads = {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}
        return logprobs.detach().double(), grads, seconds

    try:
        lp_rep, grads_rep, sec_rep = step(repeated, reference)
        lp_grp, grads_grp, sec_grp = step(packed, ATTN_IMPLEMENTATION)
    finally:
        model.set_attn_implementation(original)
        model.train(was_training)
        if gradient_checkpointing and not was_checkpointing:
            model.gradient_checkpointing_disable()

    def rel(diff, ref):
        return diff / max(ref.abs().max().item(), 1e-30)

    lp_abs = (lp_grp - lp_rep).abs().max().item()
    grad_rel = {}
    for n, g in grads_rep.items():
        diff = (grads_grp[n] - g).abs().max().item()
        grad_rel[n] = (diff, rel(diff, g))
    return EquivalenceReport(
        model=name, dtype=str(dtype).replace("torch.", ""), reference_attention=reference, tolerance=tolerance,
        logprob_abs=lp_abs, logprob_rel=rel(lp_abs, lp_rep), grad_rel=grad_rel,
        tokens_repeated=repeated.input_ids.numel(), tokens_grouped=packed.input_ids.numel(),
        seconds_repeated=sec_rep, seconds_grouped=sec_grp, batch_kind=batch_kind,
    )


# Prefix trees (transformers_tree imports this module, so its names are loaded on first access).
_TREE_NAMES = ("TreeBatch", "build_tree_batch", "build_sequence_batch", "verify_tree_equivalence",
               "random_tree_sequences")


def __getattr__(name):
    if name in _TREE_NAMES:
        from pyfastrl.integrations import transformers_tree

        return getattr(transformers_tree, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
