"""The flash backend's merge kernels from the CUDA extension (``csrc/attention_merge``): drop-in
replacements of ``merge.merge_`` and ``merge.add_rows_`` (same signatures and results), chosen by
``flash._merge_kernels`` when ``pyfastrl._cuda`` is built (``PYFASTRL_BUILD_CUDA=1 pip install -e .``).

The kernels move 16-byte chunks of each head-dim row (one 128-bit load per operand), so every tensor
of head dim ``D`` needs unit stride along ``D``, a 16-byte aligned address and row/head strides that
are multiples of 16 bytes: ``D`` a multiple of 8 for fp16/bf16, of 4 for fp32, at most 256 chunks.
The checks here read shapes, dtypes, strides and addresses only (no device sync); row indices are
trusted, as in the Triton kernels.
"""
from __future__ import annotations

import torch

from pyfastrl.kernels import cuda_extension

_MAX_CHUNKS = 256  # one thread per 16-byte chunk of a row, 256 threads a block (merge.cu)
unavailable_reason = cuda_extension.unavailable_reason  # callers ask this module (flash.py, info, tests)


def _check_rows(name: str, tensor: torch.Tensor, device: torch.device, count: int | None = None) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device}, got {tensor.device}")
    if tensor.dtype != torch.int64 or tensor.dim() != 1 or tensor.stride(0) != 1:
        raise ValueError(f"{name} must be a contiguous 1-D int64 tensor, got {tensor.dtype} of shape "
                         f"{tuple(tensor.shape)} and strides {tensor.stride()}")
    if count is not None and tensor.numel() != count:
        raise ValueError(f"{name} must hold {count} row indices, got {tensor.numel()}")


def _check_rows_tensor(name: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype,
                       heads: int, head_dim: int) -> None:
    """A ``(rows, heads, head_dim)`` tensor the kernels read/write in 16-byte chunks."""
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device}, got {tensor.device}")
    if tensor.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {tensor.dtype}")
    if tensor.dim() != 3 or tuple(tensor.shape[1:]) != (heads, head_dim):
        raise ValueError(f"{name} must have shape (rows, {heads}, {head_dim}), got {tuple(tensor.shape)}")
    pack = 16 // tensor.element_size()
    if (tensor.stride(2) != 1 or tensor.stride(0) % pack or tensor.stride(1) % pack
            or tensor.data_ptr() % 16):
        raise ValueError(f"{name} must have unit stride along the head dim, row/head strides that are multiples "
                         f"of {pack} elements and a 16-byte aligned address (128-bit loads), got strides "
                         f"{tensor.stride()} at address {tensor.data_ptr():#x}")


def _dtype_code(name: str, tensor: torch.Tensor) -> int:
    if tensor.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor, got device {tensor.device}")
    if tensor.dtype not in cuda_extension.DTYPE_CODES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")
    pack = 16 // tensor.element_size()
    head_dim = tensor.shape[-1] if tensor.dim() == 3 else 0
    if tensor.dim() != 3 or head_dim % pack or head_dim // pack > _MAX_CHUNKS or head_dim == 0:
        raise ValueError(f"{name} must have shape (rows, heads, head_dim) with head_dim a positive multiple of "
                         f"{pack} up to {pack * _MAX_CHUNKS} for {tensor.dtype}, got {tuple(tensor.shape)}")
    return cuda_extension.DTYPE_CODES[tensor.dtype]


def _check_lse(name: str, tensor: torch.Tensor, device: torch.device, heads: int, tokens: int) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device}, got {tensor.device}")
    if tensor.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {tensor.dtype}")
    if tuple(tensor.shape) != (heads, tokens) or tensor.stride(1) != 1:
        raise ValueError(f"{name} must have shape ({heads}, {tokens}) with unit stride along tokens, got shape "
                         f"{tuple(tensor.shape)} and strides {tensor.stride()}")


def _launch(kernel_name: str, device: torch.device, *args) -> None:
    extension = cuda_extension.module()
    if extension is None:
        raise RuntimeError(f"the CUDA merge kernels are unavailable: {unavailable_reason()}")
    with torch.cuda.device(device):
        getattr(extension, kernel_name)(*args, torch.cuda.current_stream(device).cuda_stream)


def merge_(out: torch.Tensor, lse: torch.Tensor, cross_out: torch.Tensor, cross_lse: torch.Tensor,
           rows: torch.Tensor) -> None:
    """Merge ``cross_out (N, H, D)`` / ``cross_lse (H, N)`` into rows ``rows (N,)`` (int64, distinct) of
    ``out (T, H, D)`` / ``lse (H, T)`` (float32) in place: ``l = log(e^l1 + e^l2)``,
    ``o = e^(l1-l) o1 + e^(l2-l) o2`` in fp32. ``out``/``cross_out`` fp16, bf16 or fp32 (one dtype)."""
    code = _dtype_code("out", out)
    device = out.device
    tokens, heads, head_dim = out.shape
    _check_rows_tensor("out", out, device, out.dtype, heads, head_dim)
    _check_rows_tensor("cross_out", cross_out, device, out.dtype, heads, head_dim)
    num_rows = cross_out.shape[0]
    _check_lse("lse", lse, device, heads, tokens)
    _check_lse("cross_lse", cross_lse, device, heads, num_rows)
    _check_rows("rows", rows, device, num_rows)
    if num_rows == 0:
        return
    _launch("attention_merge", device, code, out.data_ptr(), lse.data_ptr(), cross_out.data_ptr(),
            cross_lse.data_ptr(), rows.data_ptr(), num_rows, heads, head_dim, out.stride(0), out.stride(1),
            lse.stride(0), cross_out.stride(0), cross_out.stride(1), cross_lse.stride(0))


def add_rows_(dq, cross_dq, q_rows, dk, dv, cross_dk, cross_dv, k_rows) -> None:
    """``dq[q_rows] += cross_dq``, ``dk[k_rows] += cross_dk``, ``dv[k_rows] += cross_dv`` in one
    launch (rows distinct within each index; fp32 sums). ``dq (T, Hq, D)``, ``dk, dv (T, Hkv, D)``
    (same strides), ``cross_dq (Nq, Hq, D)``, ``cross_dk, cross_dv (Nk, Hkv, D)`` (same strides);
    one dtype, fp16, bf16 or fp32; indices int64."""
    code = _dtype_code("dq", dq)
    device = dq.device
    _, heads, head_dim = dq.shape
    kv_heads = dk.shape[1] if dk.dim() == 3 else -1
    for name, tensor, h in (("dq", dq, heads), ("cross_dq", cross_dq, heads), ("dk", dk, kv_heads),
                            ("dv", dv, kv_heads), ("cross_dk", cross_dk, kv_heads), ("cross_dv", cross_dv, kv_heads)):
        _check_rows_tensor(name, tensor, device, dq.dtype, h, head_dim)
    if dk.stride() != dv.stride() or cross_dk.stride() != cross_dv.stride():
        raise ValueError("add_rows_: dk/dv and cross_dk/cross_dv must share strides")
    if dv.shape[0] != dk.shape[0] or cross_dv.shape[0] != cross_dk.shape[0]:
        raise ValueError("add_rows_: dk/dv and cross_dk/cross_dv must have the same shapes")
    _check_rows("q_rows", q_rows, device, cross_dq.shape[0])
    _check_rows("k_rows", k_rows, device, cross_dk.shape[0])
    _launch("attention_merge_add_rows", device, code, dq.data_ptr(), cross_dq.data_ptr(), q_rows.data_ptr(),
            cross_dq.shape[0], heads, dk.data_ptr(), dv.data_ptr(), cross_dk.data_ptr(), cross_dv.data_ptr(),
            k_rows.data_ptr(), cross_dk.shape[0], kv_heads, head_dim, dq.stride(0), dq.stride(1),
            cross_dq.stride(0), cross_dq.stride(1), dk.stride(0), dk.stride(1), cross_dk.stride(0),
            cross_dk.stride(1))
