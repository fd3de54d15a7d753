"""The CUDA extension (csrc/), checked as far as possible without a GPU.

* The merge arithmetic (csrc/attention_merge/merge_math.h) compiled for the host with g++ and called
  through ctypes on CPU tensors, against float64 torch: every run.
* ``compile``: csrc/check_resources.py compiles every kernel of the extension for sm_80/sm_90a
  (ptxas -v) and fails on spills, stack frames or missing 128-bit moves: every run where nvcc is
  present (CI has it). The GRPO loss kernels' own tests are in test_grpo_loss_cuda.py.
* ``gpu``: the built extension's kernels against float64 and the Triton merge, forward and backward.
"""
import ctypes

import pytest
import torch
from cuda_host import NVCC, build_host_check, load_csrc_module, needs_nvcc, nvcc_build

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# The kernels round once from fp32 math to the output dtype.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
              torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


# -- float64 references and inputs ------------------------------------------------------------------
def reference_merge(out, lse, cross_out, cross_lse, rows):
    """Float64 ``(out, lse)`` after merging ``cross_*`` into rows ``rows``."""
    out64, lse64 = out.double().clone(), lse.double().clone()
    l1, l2 = lse64[:, rows], cross_lse.double()
    merged = torch.logaddexp(l1, l2)
    out64[rows] = (torch.exp(l1 - merged).T[..., None] * out64[rows]
                   + torch.exp(l2 - merged).T[..., None] * cross_out.double())
    lse64[:, rows] = merged
    return out64, lse64


def merge_inputs(dtype, device, tokens=13, num_rows=7, heads=3, head_dim=64):
    """Strided views (spare head, padded LSE rows) as the kernels must accept them; LSEs far apart in
    some rows, so the shift by the larger one matters."""
    out = torch.randn(tokens, heads + 1, head_dim, device=device).to(dtype)[:, :heads]
    lse = (torch.randn(heads, tokens + 5, device=device) * 30)[:, :tokens]
    cross_out = torch.randn(num_rows, heads, head_dim, device=device).to(dtype)
    cross_lse = torch.randn(heads, num_rows, device=device) * 30
    rows = torch.randperm(tokens, device=device)[:num_rows]
    return out, lse, cross_out, cross_lse, rows


def add_rows_inputs(dtype, device, heads=4, kv_heads=2, head_dim=32):
    dq = torch.randn(11, heads, head_dim, device=device).to(dtype)
    dk, dv = (torch.randn(11, kv_heads, head_dim, device=device).to(dtype) for _ in range(2))
    cross_dq = torch.randn(5, heads, head_dim, device=device).to(dtype)
    cross_dk, cross_dv = (torch.randn(6, kv_heads, head_dim, device=device).to(dtype) for _ in range(2))
    q_rows, k_rows = torch.randperm(11, device=device)[:5], torch.randperm(11, device=device)[:6]
    return dq, cross_dq, q_rows, dk, dv, cross_dk, cross_dv, k_rows


def reference_add_rows(dst, src, rows):
    total = dst.double().clone()
    total[rows] += src.double()
    return total


# -- host build of merge_math.h ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def host_merge(tmp_path_factory):
    handle = build_host_check("attention_merge", tmp_path_factory)
    pointer, int64 = ctypes.c_size_t, ctypes.c_int64
    handle.pyfastrl_merge_host.argtypes = [ctypes.c_int] + [pointer] * 5 + [int64] * 9
    handle.pyfastrl_add_rows_host.argtypes = [ctypes.c_int] + [pointer] * 3 + [int64] * 7
    for function in (handle.pyfastrl_merge_host, handle.pyfastrl_add_rows_host):
        function.restype = ctypes.c_char_p
    return handle


def run_host_merge(host, out, lse, cross_out, cross_lse, rows, dtype_code=None):
    error = host.pyfastrl_merge_host(
        DTYPE_CODES[out.dtype] if dtype_code is None else dtype_code, out.data_ptr(), lse.data_ptr(),
        cross_out.data_ptr(), cross_lse.data_ptr(), rows.data_ptr(), cross_out.shape[0], out.shape[1], out.shape[2],
        out.stride(0), out.stride(1), lse.stride(0), cross_out.stride(0), cross_out.stride(1), cross_lse.stride(0))
    return error and error.decode()


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_merge_matches_float64(host_merge, dtype):
    out, lse, cross_out, cross_lse, rows = merge_inputs(dtype, "cpu")
    expected_out, expected_lse = reference_merge(out, lse, cross_out, cross_lse, rows)
    untouched = torch.ones(out.shape[0], dtype=torch.bool)
    untouched[rows] = False
    before = out[untouched].clone(), lse[:, untouched].clone()
    assert run_host_merge(host_merge, out, lse, cross_out, cross_lse, rows) is None
    torch.testing.assert_close(out.double(), expected_out, **TOLERANCES[dtype])
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-6, atol=1e-5)
    assert torch.equal(out[untouched], before[0]) and torch.equal(lse[:, untouched], before[1])


def test_host_merge_of_two_empty_parts_is_zero(host_merge):
    # Both LSEs -inf (no key on either side): zero output and -inf LSE, not NaN.
    out, lse, cross_out, cross_lse, rows = merge_inputs(torch.float32, "cpu", tokens=4, num_rows=2, heads=1)
    lse[:, rows] = float("-inf")
    cross_lse[:] = float("-inf")
    assert run_host_merge(host_merge, out, lse, cross_out, cross_lse, rows) is None
    assert out[rows].eq(0).all() and lse[:, rows].eq(float("-inf")).all()


def test_host_merge_rejects_unknown_dtype_code(host_merge):
    out, lse, cross_out, cross_lse, rows = merge_inputs(torch.float32, "cpu")
    assert "unknown dtype code 9" in run_host_merge(host_merge, out, lse, cross_out, cross_lse, rows, dtype_code=9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_add_rows_matches_float64(host_merge, dtype):
    dq, cross_dq, q_rows, dk, dv, cross_dk, cross_dv, k_rows = add_rows_inputs(dtype, "cpu")
    for dst, src, rows in ((dq, cross_dq, q_rows), (dk, cross_dk, k_rows), (dv, cross_dv, k_rows)):
        expected = reference_add_rows(dst, src, rows)
        error = host_merge.pyfastrl_add_rows_host(
            DTYPE_CODES[dtype], dst.data_ptr(), src.data_ptr(), rows.data_ptr(), src.shape[0], src.shape[1],
            src.shape[2], dst.stride(0), dst.stride(1), src.stride(0), src.stride(1))
        assert error is None
        torch.testing.assert_close(dst.double(), expected, **TOLERANCES[dtype])


# -- resources of the device code -------------------------------------------------------------------
@pytest.mark.compile
@needs_nvcc
def test_kernels_compile_without_spills_or_stack(capsys):
    check_resources = load_csrc_module("check_resources")
    kernels = check_resources.check(NVCC)
    with capsys.disabled():
        print("\n" + check_resources.report(kernels))
    assert {k.arch for k in kernels} == set(nvcc_build.CUBIN_ARCHS)
    for family in ("merge_kernel", "add_rows_kernel", "grad_kernel"):  # 3 dtypes x 2 archs each
        assert sum(family in k.kernel for k in kernels) == 3 * len(nvcc_build.CUBIN_ARCHS), family
    # GRPO loss: 3 segment passes x 3 dtypes, and 3 folds, per arch.
    assert sum("segment_kernel" in k.kernel for k in kernels) == 9 * len(nvcc_build.CUBIN_ARCHS)
    assert sum("fold_kernel" in k.kernel for k in kernels) == 3 * len(nvcc_build.CUBIN_ARCHS)
    # Local-linear-attention decode: 3 dtypes x 3 covariance tile sizes (head dims up to 32, 64, 128).
    assert sum("decode_kernel" in k.kernel for k in kernels) == 9 * len(nvcc_build.CUBIN_ARCHS)
    for family in ("advantage_kernel", "batch_stats_kernel"):  # GRPO advantages: fp64, one of each per arch
        assert sum(family in k.kernel for k in kernels) == len(nvcc_build.CUBIN_ARCHS), family
    assert check_resources.problems(kernels) == []


# -- the Python wrapper ------------------------------------------------------------------------------
def test_wrapper_rejects_cpu_tensors():
    from pyfastrl.kernels.prefix_attention import merge_cuda

    with pytest.raises(ValueError, match="out must be a CUDA tensor"):
        merge_cuda.merge_(*merge_inputs(torch.float16, "cpu"))
    with pytest.raises(ValueError, match="dq must be a CUDA tensor"):
        merge_cuda.add_rows_(*add_rows_inputs(torch.float16, "cpu"))


def test_info_reports_the_cuda_extension(capsys):
    from pyfastrl.cli import main
    from pyfastrl.kernels import cuda_extension

    assert main(["info"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  cuda "))
    reason = cuda_extension.unavailable_reason()
    assert line.split(None, 1)[1] == ("available" if reason is None else f"unavailable: {reason}")


# -- on a GPU, with the extension built --------------------------------------------------------------
def _merge_cuda():
    from pyfastrl.kernels.prefix_attention import merge_cuda

    if merge_cuda.unavailable_reason() is not None:
        pytest.skip(f"CUDA extension: {merge_cuda.unavailable_reason()}")
    return merge_cuda


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_merge_matches_float64_and_triton(dtype):
    from pyfastrl.kernels.prefix_attention import merge

    merge_cuda = _merge_cuda()
    inputs = merge_inputs(dtype, "cuda", tokens=3000, num_rows=2000, heads=8, head_dim=128)
    expected_out, expected_lse = reference_merge(*inputs)
    out, lse, cross_out, cross_lse, rows = inputs
    triton_out, triton_lse = out.clone(), lse.clone()
    merge_cuda.merge_(out, lse, cross_out, cross_lse, rows)
    merge.merge_(triton_out, triton_lse, cross_out, cross_lse, rows)
    torch.testing.assert_close(out.double(), expected_out, **TOLERANCES[dtype])
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out, triton_out, **TOLERANCES[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_add_rows_matches_float64(dtype):
    merge_cuda = _merge_cuda()
    dq, cross_dq, q_rows, dk, dv, cross_dk, cross_dv, k_rows = add_rows_inputs(dtype, "cuda", head_dim=128)
    expected = [reference_add_rows(dst, src, rows)
                for dst, src, rows in ((dq, cross_dq, q_rows), (dk, cross_dk, k_rows), (dv, cross_dv, k_rows))]
    merge_cuda.add_rows_(dq, cross_dq, q_rows, dk, dv, cross_dk, cross_dv, k_rows)
    for got, want in zip((dq, dk, dv), expected):
        torch.testing.assert_close(got.double(), want, **TOLERANCES[dtype])


@pytest.mark.gpu
def test_cuda_merge_rejects_misaligned_head_rows():
    merge_cuda = _merge_cuda()
    out, lse, cross_out, cross_lse, rows = merge_inputs(torch.float16, "cuda")
    shifted = torch.empty(cross_out.numel() + 1, dtype=cross_out.dtype, device="cuda")[1:].view(cross_out.shape)
    with pytest.raises(ValueError, match="cross_out must have unit stride.*16-byte aligned"):
        merge_cuda.merge_(out, lse, shifted, cross_lse, rows)


def test_flash_path_merges_with_triton_until_the_extension_is_chosen(monkeypatch):
    from pyfastrl._backend import FLASH_MERGE_ENV
    from pyfastrl.kernels.prefix_attention import flash, merge, merge_cuda

    monkeypatch.delenv(FLASH_MERGE_ENV, raising=False)
    assert flash._merge_kernels() is merge  # unmeasured on a GPU: the extension is not the default
    monkeypatch.setenv(FLASH_MERGE_ENV, "cuda")
    if merge_cuda.unavailable_reason() is None:
        assert flash._merge_kernels() is merge_cuda
    else:
        with pytest.raises(RuntimeError, match="CUDA extension's merge was asked for"):
            flash._merge_kernels()
    monkeypatch.setenv(FLASH_MERGE_ENV, "fast")
    with pytest.raises(ValueError, match=FLASH_MERGE_ENV):
        flash._merge_kernels()
