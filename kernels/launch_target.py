"""Which tile table a kernel launch uses: the interpreter's, or a GPU architecture's.

Every kernel wrapper picks its tile sizes, warps and stages through ``tile_target(device)``, never by
testing ``TRITON_INTERPRET`` itself, so the configuration a GPU would run can also be chosen on a
machine without one:

* on a CUDA device: the device's architecture (``"sm90"`` for compute capability 9.x and newer,
  ``"sm80"`` below);
* under Triton's interpreter: ``"interpreter"`` (small tiles, fast on CPU);
* inside ``with gpu_tiles("sm80" | "sm90"):`` that architecture, whatever the device. The compile
  check records launches this way, and interpreter tests run the GPU path's tile sizes with it.
"""
from __future__ import annotations

import contextlib

import torch

TARGETS = ("interpreter", "sm80", "sm90")
GPU_TARGETS = ("sm80", "sm90")

_forced: str | None = None


@contextlib.contextmanager
def gpu_tiles(target: str):
    """Make every launch inside the block take ``target``'s tiles (``"sm80"`` or ``"sm90"``)."""
    global _forced
    if target not in GPU_TARGETS:
        raise ValueError(f"gpu_tiles: target must be one of {GPU_TARGETS}, got {target!r}")
    previous, _forced = _forced, target
    try:
        yield
    finally:
        _forced = previous


def tile_target(device: torch.device) -> str:
    """``"interpreter"``, ``"sm80"`` or ``"sm90"``: whose tile table a launch on ``device`` uses."""
    if _forced is not None:
        return _forced
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return "sm90" if major >= 9 else "sm80"
    return "interpreter"
