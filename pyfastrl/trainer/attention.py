"""Which attention ``GRPOTrainer`` runs a policy with, and the batches that attention takes.

A softmax model is switched to ``"pyfastrl_prefix"``: prefix-grouped attention on grouped batches,
transformers' SDPA on everything else (generation, repeated-prompt batches). A model switched to
local linear attention (``pyfastrl.integrations.transformers_lla.enable_local_linear_attention``)
keeps its own attention, ``"pyfastrl_lla"``, everywhere: rollouts decode through its KV-cache path
(``local_linear_attention_decode``), and the old / reference log-probs and the loss run
``local_linear_attention`` on repeated-prompt batches. Those are left-padded: the integration takes
left padding and refuses every other mask, and there is no prefix-grouped local linear attention op.
The trainer never runs a model with an attention other than its own.
"""
from __future__ import annotations

from pyfastrl.integrations import transformers as pft
from pyfastrl.integrations import transformers_lla
from pyfastrl.nn import LocalLinearAttention


def _attention_of(model, name: str) -> str:
    """``"pyfastrl_lla"`` for a model switched to local linear attention, else ``"pyfastrl_prefix"``;
    a model half switched (layers without the attention, or the attention without the layers) is
    refused, naming ``name``."""
    has_layers = any(isinstance(module, LocalLinearAttention) for module in model.modules())
    attention = getattr(model.config, "_attn_implementation", None)
    if has_layers and attention != transformers_lla.ATTN_IMPLEMENTATION:
        raise ValueError(
            f"GRPOTrainer: {name} has LocalLinearAttention layers but runs {attention!r} attention; the trainer "
            f"does not switch it to softmax: call {name}.set_attn_implementation("
            f"{transformers_lla.ATTN_IMPLEMENTATION!r}) to train it with local linear attention")
    if attention == transformers_lla.ATTN_IMPLEMENTATION and not has_layers:
        raise ValueError(f"GRPOTrainer: {name}'s attention is {attention!r} but it has no LocalLinearAttention "
                         "layers: switch it with enable_local_linear_attention")
    return transformers_lla.ATTN_IMPLEMENTATION if has_layers else pft.ATTN_IMPLEMENTATION


def policy_attention(model, ref_model=None) -> str:
    """The attention implementation the trainer runs ``model`` (and ``ref_model``, when given) with:
    ``"pyfastrl_lla"`` or ``"pyfastrl_prefix"``. A ``ref_model`` of the other kind is refused: the KL
    term would compare the policy with a model whose attention differs from the one it was given."""
    attention = _attention_of(model, "model")
    if ref_model is not None and _attention_of(ref_model, "ref_model") != attention:
        raise ValueError(
            f"GRPOTrainer: the model runs {attention!r} attention but ref_model does not; pass a ref_model with "
            "the model's attention, or none (a frozen copy of the model)")
    return attention


def batch_layout(attention: str, use_prefix_grouping: bool, *, announce: bool) -> tuple[bool, str]:
    """``(grouped, padding_side)``: whether the policy runs on prefix-grouped batches, and the
    padding side of its repeated-prompt batches. Local linear attention has no prefix-grouped op:
    it falls back to left-padded repeated batches, said once (``announce``: the first process) when
    ``use_prefix_grouping`` asked for grouping (GRPOConfig's default)."""
    if attention != transformers_lla.ATTN_IMPLEMENTATION:
        return use_prefix_grouping, "right"
    if use_prefix_grouping and announce:
        print("GRPOTrainer: local linear attention has no prefix-grouped op: the policy runs on left-padded "
              "repeated-prompt batches (use_prefix_grouping=True does not apply)", flush=True)
    return False, "left"
