"""Local linear attention as a drop-in attention for HuggingFace transformers decoders.

    from pyfastrl.integrations.transformers_lla import enable_local_linear_attention
    model = AutoModelForCausalLM.from_pretrained(path)
    enable_local_linear_attention(model, ridge_lambda=1.0)   # then train as usual

``enable_local_linear_attention`` gives every attention layer a ``pyfastrl.nn.LocalLinearAttention``
(its learnable per-head lambda, saved with the model's state dict as
``...self_attn.local_linear_attention.log_ridge``) and switches the model to the attention
implementation ``"pyfastrl_lla"``, registered with transformers' ``AttentionInterface``. Training and
full-sequence scoring are supported; a KV cache (incremental decoding) is not: generate with
``use_cache=False``.
"""
from __future__ import annotations

import torch

from pyfastrl.integrations.transformers import sdpa_mask_unless_plain_causal
from pyfastrl.nn import LocalLinearAttention

ATTN_IMPLEMENTATION = "pyfastrl_lla"
MODULE_ATTRIBUTE = "local_linear_attention"


def lla_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function for ``"pyfastrl_lla"``. ``query (B, Hq, L, D)``,
    ``key, value (B, Hkv, L, D)``; returns ``(B, L, Hq, D)`` and no attention weights."""
    lla = getattr(module, MODULE_ATTRIBUTE, None)
    if not isinstance(lla, LocalLinearAttention):
        raise RuntimeError(
            f"{type(module).__name__} has no LocalLinearAttention: switch models to 'pyfastrl_lla' with "
            "pyfastrl.integrations.transformers_lla.enable_local_linear_attention(model)"
        )
    if attention_mask is not None:
        raise NotImplementedError(
            "pyfastrl_lla: attention masks (padding, or a KV cache) are not supported; pass unpadded rows "
            "(one sequence per row, or equal lengths) and use_cache=False"
        )
    if query.shape[2] != key.shape[2]:
        raise NotImplementedError(
            f"pyfastrl_lla: {query.shape[2]} queries against {key.shape[2]} cached keys: incremental decoding "
            "is not implemented; generate with use_cache=False"
        )
    if module.training and dropout > 0:
        raise NotImplementedError("pyfastrl_lla: attention dropout is not supported; set attention_dropout=0")
    for feature in ("softcap", "sliding_window"):
        if kwargs.get(feature) is not None:
            raise NotImplementedError(f"pyfastrl_lla: {feature}={kwargs[feature]} is not supported")
    # (B, H, L, D) -> (B, L, H, D) views with a unit-stride head dim: read in place.
    out = lla(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out, None


def register() -> None:
    """Register ``"pyfastrl_lla"`` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, lla_attention_forward)
    # Causality is built into the op: a cache-free, padding-free call needs no mask; any other mask
    # reaches lla_attention_forward, which refuses it.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask_unless_plain_causal)


def _attention_layers(model: torch.nn.Module):
    # transformers decoders' attention layers carry their layer index, head dim and score scale.
    return [m for m in model.modules() if all(hasattr(m, a) for a in ("layer_idx", "head_dim", "scaling", "config"))]


def enable_local_linear_attention(model, *, ridge_lambda: float = 1.0, **options):
    """Switch a transformers causal LM to local linear attention, in place; returns the model.

    Every attention layer gets a ``LocalLinearAttention(num_attention_heads, ridge_lambda=ridge_lambda,
    softmax_scale=<the layer's scaling>, **options)`` (options: ``tolerance``, ``max_iterations``,
    ``backend``) on the device of its query projection. The lambdas are trainable parameters: build
    the optimizer after this call.
    """
    register()
    layers = _attention_layers(model)
    if not layers:
        raise ValueError(f"enable_local_linear_attention: found no attention layers in {type(model).__name__}")
    for layer in layers:
        if isinstance(getattr(layer, MODULE_ATTRIBUTE, None), LocalLinearAttention):
            continue
        device = next(layer.parameters()).device
        lla = LocalLinearAttention(layer.config.num_attention_heads, ridge_lambda=ridge_lambda,
                                   softmax_scale=layer.scaling, **options)
        setattr(layer, MODULE_ATTRIBUTE, lla.to(device))
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model
