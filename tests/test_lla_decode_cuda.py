"""The CUDA backend of local_linear_attention_decode (csrc/lla_decode, kernels/local_linear_attention/cuda.py).

* Every run: the kernel's whole block program (csrc/lla_decode/lla_decode_math.h: the online softmax
  and kbar sweep, the centred covariance in the threads' tiles, the float64 Cholesky factorisation
  and solves, the output sweep) compiled for the host with g++ and called through ctypes on CPU
  tensors, every step for every thread index in turn, against the float64 reference: head dims
  4..128, ragged lengths over several key tiles, GQA, strided caches, fp32/bf16/fp16, keys x10 with
  a small lambda, non-positive-definite systems (NaN); its shared memory; backend selection.
* ``gpu``: the op with ``backend="cuda"`` against the float64 torch backend, without a host sync.
"""
import ctypes

import pytest
import torch
from cuda_host import build_host_check
from test_lla_decode import fp32_rounding_of_the_effective_weights

from pyfastrl import local_linear_attention_decode
from pyfastrl._backend import resolve_backend
from pyfastrl.kernels import cuda_extension
from pyfastrl.kernels.local_linear_attention import cuda as lla_cuda
from pyfastrl.kernels.local_linear_attention import reference

_OP = "local_linear_attention_decode"
SM80_MAX_SHARED_BYTES = 163 * 1024  # dynamic shared memory a block may opt into (sm_90: 227 KiB)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    handle = build_host_check("lla_decode", tmp_path_factory)
    pointer, int64 = ctypes.c_size_t, ctypes.c_int64
    handle.pyfastrl_lla_decode_host.argtypes = (
        [ctypes.c_int] + [pointer] * 6 + [int64] * 5 + [ctypes.POINTER(int64), ctypes.c_float])
    handle.pyfastrl_lla_decode_host.restype = ctypes.c_char_p
    handle.pyfastrl_lla_decode_shared_bytes.argtypes = [int64]
    handle.pyfastrl_lla_decode_shared_bytes.restype = int64
    return handle


def make_cache(head_dim, dtype=torch.float32, lengths=(70, 1, 33, 32), heads=4, kv_heads=2, key_scale=1.0,
               device="cpu", seed=0):
    """``q (B, Hq, D)`` and strided caches ``(B, T_max, Hkv, D)`` (views into a buffer with a spare
    kv head), NaN keys and inf values past each length; ``cache_seqlens`` int32."""
    gen = torch.Generator().manual_seed(seed)
    batch, max_tokens = len(lengths), max(lengths) + 3
    q = torch.randn(batch, heads, head_dim, generator=gen).to(dtype)
    k = (torch.randn(batch, max_tokens, kv_heads + 1, head_dim, generator=gen) * key_scale).to(dtype)[:, :, 1:]
    v = torch.randn(batch, max_tokens, kv_heads + 1, head_dim, generator=gen).to(dtype)[:, :, :kv_heads]
    for b, n in enumerate(lengths):
        k[b, n:] = float("nan")
        v[b, n:] = float("inf")
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    return tuple(t.to(device) for t in (q, k, v, seqlens))


def host_decode(host, q, k, v, seqlens, ridge, scale, dtype_code=None):
    """The host build's output ``(B, Hq, D)``, or the error message."""
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    strides = (ctypes.c_int64 * 10)(*lla_cuda.strides(q, k, v, out))
    ridge = ridge.to(torch.float32).contiguous()
    error = host.pyfastrl_lla_decode_host(
        cuda_extension.DTYPE_CODES[q.dtype] if dtype_code is None else dtype_code, q.data_ptr(), k.data_ptr(),
        v.data_ptr(), seqlens.data_ptr(), ridge.data_ptr(), out.data_ptr(), q.shape[0], q.shape[1], k.shape[2],
        k.shape[1], q.shape[2], strides, scale)
    return error.decode() if error else out


def want(q, k, v, seqlens, ridge, scale):
    """Float64 reference over the same (rounded) inputs."""
    return reference.decode(q.double(), k.double(), v.double(), seqlens, ridge.double(), scale)


def relative_error(got, expected):
    return ((got.double() - expected).abs().max() / expected.abs().max()).item()


RIDGE = torch.tensor([0.3, 1.0, 2.0, 0.05])


@pytest.mark.parametrize("head_dim", [4, 16, 24, 33, 64, 100, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_decode_matches_float64(host, head_dim, dtype):
    q, k, v, seqlens = make_cache(head_dim, dtype)
    got = host_decode(host, q, k, v, seqlens, RIDGE, 0.4)
    assert got.dtype == dtype
    # The Triton decode's fp32 tolerance (same fp32 sums, float64 solve); bf16 output rounding.
    assert relative_error(got, want(q, k, v, seqlens, RIDGE, 0.4)) <= max(2e-5, torch.finfo(dtype).eps)


def test_host_decode_of_fp16_caches_with_one_kv_head(host):
    q, k, v, seqlens = make_cache(32, torch.float16, lengths=(5, 64, 65), heads=3, kv_heads=1)
    got = host_decode(host, q, k, v, seqlens, RIDGE[:3], 32**-0.5)
    assert relative_error(got, want(q, k, v, seqlens, RIDGE[:3], 32**-0.5)) <= torch.finfo(torch.float16).eps


@pytest.mark.parametrize("head_dim", [16, 64])
def test_host_decode_is_accurate_to_fp32_rounding_on_ill_conditioned_keys(host, head_dim):
    """Keys x10, lambda 1e-3 (|eta| ~ 1e4): the bound of the Triton decode's test, the fp32 rounding of
    eta.(k_j - kbar), which both GPU backends accumulate in fp32."""
    q, k, v, seqlens = make_cache(head_dim, lengths=(40, 7), heads=2, kv_heads=1, key_scale=10.0)
    ridge, scale = torch.full((2,), 1e-3), head_dim**-0.5
    got = host_decode(host, q, k, v, seqlens, ridge, scale)
    bound = fp32_rounding_of_the_effective_weights(q, k, seqlens, 1e-3, scale)
    assert (got.double() - want(q, k, v, seqlens, ridge, scale)).abs().max().item() <= bound


def test_host_decode_gives_nan_for_a_system_that_is_not_positive_definite(host):
    # Head 1's ridge is negative below C's smallest eigenvalue, so a pivot is not > 0; sequence 1 has
    # no key (an invalid length): both NaN, the others untouched.
    q, k, v, seqlens = make_cache(16, lengths=(20, 0, 9), heads=2, kv_heads=2)
    ridge = torch.tensor([0.5, -1e3])
    got = host_decode(host, q, k, v, seqlens, ridge, 0.25)
    assert got[:, 1].isnan().all() and got[1].isnan().all()
    rows = [0, 2]  # head 0 of the sequences with keys, whose kv head is 0
    expected = want(q[rows, :1], k[rows, :, :1], v[rows, :, :1], seqlens[rows], ridge[:1], 0.25)
    assert relative_error(got[rows, :1], expected) <= 2e-5


def test_host_decode_reads_no_more_than_the_cache_holds(host):
    # A length past T_max is clamped to T_max (the op's documented result for it), never read beyond.
    q, k, v, seqlens = make_cache(8, lengths=(6, 6), heads=2, kv_heads=1)
    k, v = k[:, :6].clone(), v[:, :6].clone()
    got = host_decode(host, q, k, v, torch.tensor([6, 1000], dtype=torch.int32), RIDGE[:2], 0.3)
    assert relative_error(got, want(q, k, v, torch.tensor([6, 6], dtype=torch.int32), RIDGE[:2], 0.3)) <= 2e-5


def test_host_decode_rejects_what_the_kernel_cannot_take(host):
    q, k, v, seqlens = make_cache(8)
    assert "unknown dtype code 5" in host_decode(host, q, k, v, seqlens, RIDGE, 0.3, dtype_code=5)
    q, k, v, seqlens = make_cache(129, lengths=(3,))
    assert "head_dim <= 128" in host_decode(host, q, k, v, seqlens, RIDGE, 0.3)


def test_shared_memory_fits_sm80_at_every_head_dim(host):
    sizes = [host.pyfastrl_lla_decode_shared_bytes(d) for d in range(1, 129)]
    assert max(sizes) == sizes[-1] == 69_888 <= SM80_MAX_SHARED_BYTES


# -- backend selection ---------------------------------------------------------------------------------
def test_auto_never_chooses_the_cuda_kernel(monkeypatch):
    monkeypatch.delenv("PYFASTRL_BACKEND", raising=False)
    for device in ("cpu", "cuda"):
        assert resolve_backend(_OP, "auto", torch.device(device), check_device=False) != "cuda"


@pytest.mark.parametrize("case, error, message", [
    ("cpu", RuntimeError, "backend 'cuda' is not available: (the CUDA extension is|its kernels need CUDA tensors)"),
    ("fp64", TypeError, "backend 'cuda' supports .* use backend='torch'"),
    ("head_dim", ValueError, "backend 'cuda' supports head dims up to 128"),
])
def test_cuda_backend_refusals_say_why(case, error, message):
    q, k, v, seqlens = make_cache(129 if case == "head_dim" else 8, torch.float64 if case == "fp64" else torch.float32)
    with pytest.raises(error, match=message):
        local_linear_attention_decode(q, k, v, seqlens, ridge_lambda=1.0, backend="cuda")


# -- on a GPU, with the extension built ------------------------------------------------------------------
def _needs_extension():
    reason = cuda_extension.unavailable_reason()
    if reason is not None:
        pytest.skip(f"CUDA extension: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [24, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_decode_matches_float64_without_a_host_sync(head_dim, dtype, monkeypatch):
    _needs_extension()
    q, k, v, seqlens = make_cache(head_dim, dtype, lengths=(4096, 1, 1000, 3001), heads=8, kv_heads=2,
                                  device="cuda")
    ridge = torch.linspace(0.05, 2.0, 8, device="cuda")
    expected = local_linear_attention_decode(q.double(), k.double(), v.double(), seqlens, ridge_lambda=ridge,
                                             backend="torch")
    torch.cuda.synchronize()

    def refuse(*_args, **_kwargs):
        raise AssertionError("host synchronisation in the cuda decode")

    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = local_linear_attention_decode(q, k, v, seqlens, ridge_lambda=ridge, backend="cuda")
        again = local_linear_attention_decode(q, k, v, seqlens, ridge_lambda=ridge, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()
    assert torch.equal(got, again)  # one block per head, no atomics: deterministic
    assert relative_error(got, expected) <= max(2e-5, torch.finfo(dtype).eps)


@pytest.mark.gpu
def test_gpu_cuda_decode_gives_nan_for_a_system_that_is_not_positive_definite():
    _needs_extension()
    q, k, v, seqlens = make_cache(16, lengths=(20, 9), heads=2, kv_heads=2, device="cuda")
    got = local_linear_attention_decode(q, k, v, seqlens, ridge_lambda=torch.tensor([0.5, -1e3], device="cuda"),
                                        backend="cuda")
    assert got[:, 1].isnan().all() and got[:, 0].isfinite().all()
