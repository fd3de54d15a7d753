"""Backend selection shared by every op: the one place that decides what ``"auto"`` means.

Every op has a ``"torch"`` backend (plain PyTorch: the reference) and a ``"triton"`` backend (fused
kernels); ``prefix_grouped_attention`` also has ``"flash"`` (composed from FlashAttention-style
kernels: the vendor's on CUDA, PyTorch's CPU flash kernel on CPU), and the ops of ``CUDA_OPS``
have ``"cuda"`` (the optional extension, ``csrc/``; chosen only when asked for until a lent GPU
has measured it faster). ``backend="auto"``:

* ops with a flash backend, plain attention (no soft-capping, no sliding window): ``"flash"`` on
  CPU (the fast CPU path); on CUDA the entry of ``FLASH_OR_TRITON`` for (architecture, dtype, head
  dim) when measured, else ``"flash"`` where its kernels take the inputs, else ``"triton"``;
* otherwise Triton for CUDA tensors and PyTorch on CPU.

The environment variable ``PYFASTRL_BACKEND`` (``torch`` | ``triton`` | ``flash`` | ``cuda`` |
``auto``) overrides ``"auto"`` for every op (``flash`` and ``cuda`` only for ops that have them),
e.g. to force the kernels through Triton's CPU interpreter.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton", "flash", "cuda")
BACKEND_ENV = "PYFASTRL_BACKEND"
# Ops that have a "flash" backend.
FLASH_OPS = ("prefix_grouped_attention",)
# Ops that have a "cuda" backend (the extension's kernels).
CUDA_OPS = ("grpo_loss", "local_linear_attention_decode")
# Measured "flash" or "triton" per (architecture "sm80"/"sm90", dtype, head dim), from
# `pyfastrl bench prefix-attention` on a lent GPU; where there is no entry, "auto" takes "flash"
# wherever its kernels apply. sm90 bf16 D=128: H100, torch 2.11, triton 3.6, forward + backward,
# Hq 32 / Hkv 8: triton 1.50 ms vs flash 1.66 ms (P=1024, 4 x 256), 8.23 vs 9.48 ms (P=4096, 16 x 512)
# (benchmarks/results/h100-2026-11-25).
FLASH_OR_TRITON: dict[tuple[str, torch.dtype, int], str] = {("sm90", torch.bfloat16, 128): "triton"}
# Which kernels merge the flash backend's two partial results on CUDA: "triton", or "cuda" (the
# optional extension, csrc/attention_merge) once a lent GPU has run its tests and measured it
# faster. PYFASTRL_FLASH_MERGE=cuda|triton overrides (e.g. to test the extension on a GPU).
FLASH_MERGE = "triton"
FLASH_MERGE_ENV = "PYFASTRL_FLASH_MERGE"


def flash_merge_kernels() -> str:
    """``"cuda"`` or ``"triton"``: whose merge kernels the CUDA flash path runs (see FLASH_MERGE)."""
    choice = os.environ.get(FLASH_MERGE_ENV, FLASH_MERGE)
    if choice not in ("cuda", "triton"):
        raise ValueError(f"environment variable {FLASH_MERGE_ENV} must be 'cuda' or 'triton', got {choice!r}")
    return choice


def triton_interpreting() -> bool:
    """True when Triton kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once: backend resolution runs inside torch.compile'd code, which cannot trace find_spec.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device``, or None when it can."""
    if not _TRITON_INSTALLED:
        return "the 'triton' package is not installed (pip install triton)"
    if device.type == "cuda" or triton_interpreting():
        return None
    return (
        f"Triton kernels need CUDA tensors (got device '{device}'); to run them on CPU set "
        "TRITON_INTERPRET=1 before pyfastrl is imported (slow; meant for tests)"
    )


def flash_unavailable_reason(device: torch.device) -> str | None:
    """Why the flash backend cannot run on ``device`` (no kernel to call), or None when it can."""
    from pyfastrl.kernels.prefix_attention import flash

    return flash.primitive_unavailable_reason(device)


def _flash_refusal(device, dtype, head_dim, softcap, sliding_window) -> str | None:
    """Why the flash backend cannot take these inputs and options, or None when it can."""
    reason = flash_unavailable_reason(device)
    if reason is not None:
        return reason
    if softcap is not None or sliding_window is not None:
        return "soft-capping and sliding windows are not implemented by the flash composition"
    if dtype is None:
        return None
    from pyfastrl.kernels.prefix_attention import flash

    return flash.unsupported_reason(dtype, head_dim, device)


def _auto(op, device, dtype, head_dim, softcap, sliding_window) -> str:
    triton_ok = device.type == "cuda" and triton_unavailable_reason(device) is None
    if op in FLASH_OPS and _flash_refusal(device, dtype, head_dim, softcap, sliding_window) is None:
        if device.type == "cpu" or not triton_ok:
            return "flash"
        from pyfastrl.kernels.launch_target import tile_target

        return FLASH_OR_TRITON.get((tile_target(device), dtype, head_dim), "flash")
    return "triton" if triton_ok else "torch"


def require_device(op: str, backend: str, device: torch.device) -> None:
    """RuntimeError, saying why, when the Triton backend cannot run on ``device`` (CPU tensors without
    Triton's interpreter), or the CUDA backend (extension not built, not CUDA tensors). Ops call it
    after their argument checks (``resolve_backend(..., check_device=False)``), so that a bad
    argument (dtype, head dim, 32-bit offsets) is reported as such on any machine."""
    reason = None
    if backend == "triton":
        reason = triton_unavailable_reason(device)
    elif backend == "cuda":
        from pyfastrl.kernels import cuda_extension

        reason = cuda_extension.device_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {backend!r} is not available: {reason}")


def resolve_backend(op: str, requested: str, device: torch.device, *, dtype: torch.dtype | None = None,
                    head_dim: int | None = None, softcap: float | None = None,
                    sliding_window: int | None = None, check_device: bool = True) -> str:
    """Turn ``requested`` (possibly ``"auto"``) into ``"torch"``, ``"triton"``, ``"flash"`` or
    ``"cuda"``.

    ``dtype``, ``head_dim`` and the attention options (``softcap``, ``sliding_window``; None when
    not asked for) let ``"auto"`` choose the flash backend only where it applies and let an explicit
    ``"flash"`` be refused with the reason. Raises ValueError for an unknown name or a backend the op
    does not have or cannot apply to these inputs, and RuntimeError, saying why, when the chosen
    backend cannot run on ``device``: with ``check_device=False`` only when Triton is not installed,
    the caller then making the device check itself (``require_device``) after its argument checks.
    """
    if requested not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        requested = os.environ.get(BACKEND_ENV, "auto")
        if requested not in BACKENDS:
            raise ValueError(
                f"{op}: environment variable {BACKEND_ENV} must be one of {BACKENDS}, got {requested!r}"
            )
        if (requested == "flash" and op not in FLASH_OPS) or (requested == "cuda" and op not in CUDA_OPS):
            requested = "auto"  # a global override leaves the ops without that backend on auto
    if requested == "auto":
        return _auto(op, device, dtype, head_dim, softcap, sliding_window)
    if requested == "triton" and (check_device or not _TRITON_INSTALLED):
        require_device(op, requested, device)
    if requested == "cuda":
        if op not in CUDA_OPS:
            raise ValueError(f"{op}: has no 'cuda' backend (ops with one: {', '.join(CUDA_OPS)})")
        if check_device:
            require_device(op, requested, device)
    if requested == "flash":
        if op not in FLASH_OPS:
            raise ValueError(f"{op}: has no 'flash' backend; use 'torch', 'triton' or 'auto'")
        reason = flash_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"{op}: backend 'flash' is not available: {reason}")
        reason = _flash_refusal(device, dtype, head_dim, softcap, sliding_window)
        if reason is not None:
            other = "'torch'" if device.type == "cpu" else "'triton' or 'torch'"
            raise ValueError(f"{op}: backend 'flash' cannot take these inputs: {reason}; use backend={other}")
    return requested
