"""The optional CUDA extension ``pyfastrl._cuda`` (``csrc/``, built with ``PYFASTRL_BUILD_CUDA=1 pip
install -e .``): whether it is there, and why not."""
from __future__ import annotations

import functools
import shutil

import torch

# Element dtype codes of csrc/common/element.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.cache
def module():
    """The built module, or None."""
    try:
        from pyfastrl import _cuda
    except ImportError:
        return None
    return _cuda


@functools.cache
def unavailable_reason() -> str | None:
    """Why the extension's kernels cannot run here, or None when they can."""
    if module() is None:
        how = "PYFASTRL_BUILD_CUDA=1 pip install -e ."
        if shutil.which("nvcc") is None:
            return f"not built, and nvcc is not on PATH (install the CUDA toolkit, then {how})"
        return f"not built (install with {how})"
    if not torch.cuda.is_available():
        return "built, but no CUDA device is visible"
    return None


def device_unavailable_reason(device: torch.device) -> str | None:
    """Why a ``"cuda"`` backend cannot run on ``device``'s tensors (extension missing, no GPU, not
    CUDA tensors), or None: the device check of every op with one (``_backend.require_device``)."""
    reason = unavailable_reason()
    if reason is not None:
        return f"the CUDA extension is {reason}"
    if device.type != "cuda":
        return f"its kernels need CUDA tensors (got device '{device}')"
    return None
