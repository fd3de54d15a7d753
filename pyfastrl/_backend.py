"""Backend selection shared by every op.

Every op has a ``"torch"`` backend (plain PyTorch: the reference and the CPU path) and a
``"triton"`` backend (fused kernels). ``backend="auto"`` picks Triton for CUDA tensors and PyTorch
otherwise; the environment variable ``PYFASTRL_BACKEND`` (``torch`` | ``triton`` | ``auto``)
overrides ``"auto"`` for every op, e.g. to force the kernels through Triton's CPU interpreter.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "PYFASTRL_BACKEND"


def triton_interpreting() -> bool:
    """True when Triton kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device``, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed (pip install triton)"
    if device.type == "cuda" or triton_interpreting():
        return None
    return (
        f"Triton kernels need CUDA tensors (got device '{device}'); to run them on CPU set "
        "TRITON_INTERPRET=1 before pyfastrl is imported (slow; meant for tests)"
    )


def resolve_backend(op: str, requested: str, device: torch.device) -> str:
    """Turn ``requested`` (possibly ``"auto"``) into ``"torch"`` or ``"triton"``.

    Raises ValueError for an unknown name and RuntimeError, saying why, when the chosen backend
    cannot run on ``device``.
    """
    if requested not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        requested = os.environ.get(BACKEND_ENV, "auto")
        if requested not in BACKENDS:
            raise ValueError(
                f"{op}: environment variable {BACKEND_ENV} must be one of {BACKENDS}, got {requested!r}"
            )
    if requested == "auto":
        return "triton" if device.type == "cuda" and triton_unavailable_reason(device) is None else "torch"
    if requested == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"{op}: backend 'triton' is not available: {reason}")
    return requested
