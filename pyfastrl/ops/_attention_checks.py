"""Input checks shared by the attention ops (prefix-grouped and local linear attention)."""
from __future__ import annotations

import math
import operator
from numbers import Real

import torch


def check_qkv(op: str, q, k, v, q_shape: str, dtypes: tuple) -> None:
    """q, k, v are tensors of the rank ``q_shape`` names (e.g. ``"(B, T, Hq, D)"``; k and v have Hkv
    in place of Hq), of one supported dtype, on one device, and k and v agree in shape."""
    rank = q_shape.count(",") + 1
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            want = q_shape if name == "q" else q_shape.replace("Hq", "Hkv")
            raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: {dtypes}")
        if t.device != q.device:
            raise ValueError(f"{op}: q is on {q.device} but {name} is on {t.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: q has dtype {q.dtype} but {name} has {t.dtype}; pass one dtype")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")


def largest_element_offset(*tensors: torch.Tensor) -> int:
    """One past the largest element offset the tensors reach through their strides. Kernels that
    index with 32-bit offsets need it below 2**31; a view into a larger buffer (e.g. a fused QKV
    projection) reaches beyond its own numel()."""
    return max(sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1 for t in tensors)


def positive_finite(op: str, name: str, value) -> float:
    """``value`` (any real scalar: Python or numpy int/float) checked positive and finite, as a float.
    A tensor is refused: reading its value would synchronise with its device."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{op}: {name} must be a real number (int or float, numpy included), got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{op}: {name} must be a positive finite number, got {value!r}")
    return float(value)


def window_length(op: str, name: str, value) -> int:
    """``value`` (any integer: Python or numpy) checked >= 1, as an int."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be an integer >= 1, got {type(value).__name__}")
    try:
        length = operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an integer >= 1, got {type(value).__name__} {value!r}") from None
    if length < 1:
        raise ValueError(f"{op}: {name} must be an integer >= 1, got {length}")
    return length
