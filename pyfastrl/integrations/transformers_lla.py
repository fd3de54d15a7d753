"""Local linear attention as a drop-in attention for HuggingFace transformers decoders.

    from pyfastrl.integrations.transformers_lla import enable_local_linear_attention
    model = AutoModelForCausalLM.from_pretrained(path)
    enable_local_linear_attention(model, ridge_lambda=1.0)   # then train as usual

``enable_local_linear_attention`` gives every attention layer a ``pyfastrl.nn.LocalLinearAttention``
(its learnable per-head lambda, saved with the model's state dict as
``...self_attn.local_linear_attention.log_ridge``) and switches the model to the attention
implementation ``"pyfastrl_lla"``, registered with transformers' ``AttentionInterface``. Training,
full-sequence scoring and generation with a KV cache (``use_cache=True``, the standard
``DynamicCache``) are supported: a call whose queries cover all its keys (training, prefill) runs
``local_linear_attention``; a decode step (fewer queries than cached keys: the attention function
receives the layer's full key/value states after the cache update) runs
``local_linear_attention_decode``, each new query over the keys up to its own position. Left
padding (batched generation of unequal prompts, as ``generate()`` pads them) is supported: each row
is rotated so that its tokens come first and its padding last, which causality then keeps out of
every real token's output. Other masks (right padding, holes) are refused.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pyfastrl.nn import LocalLinearAttention
from pyfastrl.ops.local_linear_attention_decode import local_linear_attention_decode

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
    if attention_mask is not None and attention_mask.dim() != 1:
        raise NotImplementedError(
            "pyfastrl_lla: attention masks other than left padding (right padding, holes) are not supported"
        )
    if module.training and dropout > 0:
        raise NotImplementedError("pyfastrl_lla: attention dropout is not supported; set attention_dropout=0")
    for feature in ("softcap", "sliding_window"):
        if kwargs.get(feature) is not None:
            raise NotImplementedError(f"pyfastrl_lla: {feature}={kwargs[feature]} is not supported")
    # (B, H, L, D) -> (B, L, H, D) views with a unit-stride head dim: read in place.
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    num_queries, num_keys = query.shape[1], key.shape[1]
    if num_queries > num_keys:
        raise ValueError(f"pyfastrl_lla: {num_queries} queries against {num_keys} keys")
    padding = attention_mask  # (B,) left-padding lengths (lla_mask), or None
    if padding is not None:
        # Rotate each row left by its padding: its tokens first, the padding after them, which
        # causality keeps out of the tokens' outputs (the decode lengths shrink by the padding).
        key, value = (_rotate(t, padding) for t in (key, value))
    if num_queries < num_keys:
        return _decode(lla, query, key, value, padding), None
    if padding is None:
        return lla(query, key, value), None
    return _rotate(lla(_rotate(query, padding), key, value), -padding), None


def _rotate(t, shift):
    """``t (B, L, H, D)`` with row b rotated left by ``shift[b]`` positions."""
    batch, num, heads, head_dim = t.shape
    index = (torch.arange(num, device=t.device)[None, :] + shift[:, None]) % num
    return t.gather(1, index[:, :, None, None].expand(-1, -1, heads, head_dim))


def _decode(lla: LocalLinearAttention, query, key, value, padding=None):
    """Queries that are the last ``L`` of ``S`` cached positions (a KV cache's decode step, ``L = 1``,
    or a chunk): query ``l`` of row ``b`` attends to the first ``S - L + l + 1`` keys (less the row's
    ``padding``, rotated to the end). ``L`` decode problems per row, the cache repeated ``L`` times (no
    copy for ``L = 1``)."""
    batch, num_queries, num_heads, head_dim = query.shape
    num_keys = key.shape[1]
    if num_queries == 1:
        key_cache, value_cache = key, value
    else:
        key_cache, value_cache = (t[:, None].expand(-1, num_queries, -1, -1, -1).flatten(0, 1) for t in (key, value))
    lengths = torch.arange(num_keys - num_queries + 1, num_keys + 1, dtype=torch.int32, device=query.device)
    lengths = lengths.repeat(batch, 1)
    if padding is not None:
        lengths = lengths - padding[:, None].to(torch.int32)
    out = local_linear_attention_decode(
        query.reshape(batch * num_queries, num_heads, head_dim), key_cache, value_cache, lengths.flatten(),
        ridge_lambda=lla.ridge_lambda.detach(), softmax_scale=lla.softmax_scale, backend=lla.backend)
    return out.view(batch, num_queries, num_heads, head_dim)


def lla_mask(*, attention_mask=None, kv_length=None, kv_offset=0, **kwargs):
    """Mask entry of ``"pyfastrl_lla"``. Causality, with or without a cache, is built into the ops, so
    no mask is built: None without padding, the ``(B,)`` left-padding lengths for a left-padded 2-D
    mask, transformers' SDPA mask for anything else (which ``lla_attention_forward`` refuses).
    Classifying a given mask reads two values on the host, as transformers' own SDPA mask does."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    if attention_mask.dim() == 2 and kv_offset == 0 and kv_length is not None:
        mask = attention_mask[:, :kv_length].bool()
        no_padding, left_padding = torch.stack([mask.all(), (mask[:, 1:] >= mask[:, :-1]).all() & mask[:, -1].all()]).tolist()
        if no_padding:
            return None
        if left_padding:
            return (~mask).sum(-1)
    return sdpa_mask(attention_mask=attention_mask, kv_length=kv_length, kv_offset=kv_offset, **kwargs)


def register() -> None:
    """Register ``"pyfastrl_lla"`` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, lla_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, lla_mask)


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


RIDGE_KEY = f"{MODULE_ATTRIBUTE}.log_ridge"  # state-dict key suffix of a layer's per-head lambdas


def saved_ridge_lambdas(path) -> dict:
    """The LLA lambdas (``...local_linear_attention.log_ridge`` tensors) in the ``*.safetensors``
    files of the model directory ``path``, by state-dict key; empty when it has none."""
    from safetensors import safe_open

    found = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            found.update({key: handle.get_tensor(key) for key in handle.keys() if key.endswith(RIDGE_KEY)})
    return found


def load_local_linear_attention(model, path):
    """Restore the trained per-head lambdas of an LLA model saved with ``save_pretrained`` (a
    ``pyfastrl train`` checkpoint, for instance) into ``model``, in place; returns the model.

    ``from_pretrained`` builds the base architecture and drops the lambdas (they are not its
    parameters), so the way back is: ``model = AutoModelForCausalLM.from_pretrained(path)``,
    ``enable_local_linear_attention(model)``, ``load_local_linear_attention(model, path)``. Raises
    ValueError when ``path`` holds no lambdas, or when they do not match ``model``'s LLA layers one
    for one (names or head counts).
    """
    saved = saved_ridge_lambdas(path)
    if not saved:
        raise ValueError(f"load_local_linear_attention: {path} holds no '*.{RIDGE_KEY}' tensors (not saved from a "
                         "model with local linear attention)")
    wanted = {name: p for name, p in model.named_parameters() if name.endswith(RIDGE_KEY)}
    if not wanted:
        raise ValueError("load_local_linear_attention: the model has no LocalLinearAttention layers; call "
                         "enable_local_linear_attention(model) first")
    if set(saved) != set(wanted):
        missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
        raise ValueError(f"load_local_linear_attention: {path} does not match the model's LLA layers (missing: "
                         f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected: {extra[:3]}"
                         f"{'...' if len(extra) > 3 else ''})")
    with torch.no_grad():
        for name, parameter in wanted.items():
            if saved[name].shape != parameter.shape:
                raise ValueError(f"load_local_linear_attention: {name} has shape {tuple(saved[name].shape)} in "
                                 f"{path}, the model's has {tuple(parameter.shape)}")
            parameter.copy_(saved[name])
    return model
