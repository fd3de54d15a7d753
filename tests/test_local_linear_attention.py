"""local_linear_attention vs the spec's dense float64 estimator, every backend; the spec's identities.

Without CUDA the Triton kernels run through Triton's interpreter (conftest.py), forward and backward.
"""
import contextlib
import math
import re
import warnings

import pytest
import torch

from conftest import DEVICE
from pyfastrl import local_linear_attention
from pyfastrl.kernels.launch_target import gpu_tiles, tile_target
from pyfastrl.kernels.local_linear_attention import kernel, reference
from pyfastrl.kernels.local_linear_attention.reference import naive_local_linear_attention
from pyfastrl.nn import LocalLinearAttention
from pyfastrl.ops.local_linear_attention import _backward_op, _deferred, _forward_op

BACKENDS = ["torch", "triton"]
# Max |got - float64 reference| / max |reference| for outputs and gradients (see assert_close).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
# The Triton backend's dtype in the checks below: fp32 through the interpreter; bf16 on a GPU, whose
# compiled kernels take 16-bit inputs only (fp32 is refused there by design: see
# test_float32_on_gpu_is_routed_to_the_torch_backend).
TRITON_DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16


def dtype_of(backend):
    """float64 for the torch backend (it computes in float64 whatever the inputs), TRITON_DTYPE for Triton."""
    return torch.float64 if backend == "torch" else TRITON_DTYPE


def make_inputs(batch, tokens, heads, kv_heads, head_dim, dtype=torch.float32, device=DEVICE, key_scale=1.0):
    q = torch.randn(batch, tokens, heads, head_dim, device=device)
    k = torch.randn(batch, tokens, kv_heads, head_dim, device=device) * key_scale
    v = torch.randn(batch, tokens, kv_heads, head_dim, device=device)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def reference_and_grads(q, k, v, ridge, grad_out, scale):
    """The dense float64 estimator and autograd's gradients of it (q, k, v and the (Hq,) lambda)."""
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v, ridge)]
    out = naive_local_linear_attention(*inputs, scale)
    return (out, *torch.autograd.grad(out, inputs, grad_out.double()))


def op_and_grads(q, k, v, ridge, grad_out, **kwargs):
    ridge = ridge.detach().requires_grad_()
    out = local_linear_attention(q, k, v, ridge_lambda=ridge, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v, ridge), grad_out))


def assert_close(got, want, tolerance):
    """Relative to the reference's largest magnitude (or to 1 where that is below 1: some
    gradients are exactly 0 in theory, e.g. dq with a single token)."""
    for name, a, b in zip(("out", "dq", "dk", "dv", "dlambda"), got, want):
        error = ((a.double() - b).abs().max() / b.abs().max().clamp(min=1.0)).item()
        assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance:.0e}"


# ----------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 21, 4, 2), (1, 35, 2, 2), (1, 1, 2, 1)], ids=["gqa", "mha_2_blocks", "one_token"])
def test_values_and_every_gradient_match_the_dense_reference(backend, shape):
    batch, tokens, heads, kv_heads = shape
    dtype = dtype_of(backend)
    q, k, v = make_inputs(batch, tokens, heads, kv_heads, 16, dtype)
    ridge = torch.linspace(0.05, 2.0, heads, dtype=reference.accumulation_dtype(dtype), device=DEVICE)
    grad_out = torch.randn_like(q)
    got = op_and_grads(q, k, v, ridge, grad_out, softmax_scale=0.3, backend=backend, tolerance=1e-7)
    assert_close(got, reference_and_grads(q, k, v, ridge, grad_out, 0.3), TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision_inputs(dtype):
    q, k, v = make_inputs(1, 19, 2, 1, 32, dtype)
    ridge = torch.tensor([0.5, 1.0], device=DEVICE)
    grad_out = torch.randn_like(q)
    got = op_and_grads(q, k, v, ridge, grad_out, backend="triton")
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_close(got, reference_and_grads(q, k, v, ridge, grad_out, 32**-0.5), TOLERANCE[dtype])


def test_float_lambda_and_default_scale_match_the_reference():
    q, k, v = make_inputs(1, 9, 2, 1, 8, torch.float64)
    out = local_linear_attention(q, k, v, ridge_lambda=0.7, backend="torch")
    torch.testing.assert_close(out, naive_local_linear_attention(q, k, v, 0.7, 8**-0.5), atol=1e-12, rtol=0)


def test_gradcheck_float64_including_lambda():
    q, k, v = make_inputs(1, 5, 2, 1, 3, torch.float64)
    ridge = torch.tensor([0.3, 2.0], dtype=torch.float64, device=DEVICE, requires_grad=True)

    def fn(q, k, v, ridge):
        return local_linear_attention(q, k, v, ridge_lambda=ridge, softmax_scale=0.8, backend="torch")

    assert torch.autograd.gradcheck(fn, (q, k, v, ridge))


def test_torch_backend_chunking_does_not_change_the_result(monkeypatch):
    q, k, v = make_inputs(2, 23, 4, 2, 4, torch.float64)
    ridge = torch.tensor([0.1, 0.5, 1.0, 3.0], dtype=torch.float64, device=DEVICE)
    grad_out = torch.randn_like(q)
    whole = op_and_grads(q, k, v, ridge, grad_out, backend="torch")
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 40)  # one query and a few keys at a time
    chunked = op_and_grads(q, k, v, ridge, grad_out, backend="torch")
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_are_read_in_place(backend):
    """(B, H, T, D) tensors transposed to (B, T, H, D), as transformers hands them over."""
    dtype = dtype_of(backend)
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
               for t in make_inputs(1, 17, 2, 1, 16, dtype))
    assert not q.is_contiguous()
    ridge = torch.tensor([0.4, 0.9], dtype=reference.accumulation_dtype(dtype), device=DEVICE)
    grad_out = torch.randn_like(q)
    got = op_and_grads(q, k, v, ridge, grad_out, backend=backend, tolerance=1e-7)
    assert_close(got, reference_and_grads(q, k, v, ridge, grad_out, 0.25), TOLERANCE[dtype])


@pytest.mark.parametrize("target, dtype", [("sm80", torch.float16), ("sm90", torch.bfloat16)])
def test_gpu_tile_sizes_match_the_dense_reference(target, dtype):
    """The three kernels with the tiles a GPU launch takes (not the interpreter's 16-row tiles), on
    a problem of two blocks and two swept tiles per kernel; bf16 and fp16 take the split products."""
    head_dim = 64
    with gpu_tiles(target):
        tiles = [kernel.tiles(name, head_dim, dtype, tile_target(torch.device(DEVICE))) for name in kernel.KERNELS]
        tokens = 2 * max(size for t in tiles for size in (t.block, t.sweep))
        assert all(tokens >= 2 * t.block and tokens >= 2 * t.sweep for t in tiles)
        q, k, v = make_inputs(1, tokens, 2, 1, head_dim, dtype)
        ridge = torch.tensor([0.3, 1.0], device=DEVICE)
        grad_out = torch.randn_like(q)
        got = op_and_grads(q, k, v, ridge, grad_out, backend="triton")
    assert_close(got, reference_and_grads(q, k, v, ridge, grad_out, head_dim**-0.5), TOLERANCE[dtype])


# ----------------------------------------------------------------------------- the spec's identities


def effective_weights(q, k, ridge, backend):
    """Row i holds the weights o_i = sum_j w_ij v_j (v = one-hot per key, T <= D)."""
    batch, tokens, _, head_dim = q.shape
    v = torch.zeros(batch, tokens, k.shape[2], head_dim, dtype=q.dtype, device=q.device)
    v[:, torch.arange(tokens), :, torch.arange(tokens)] = 1
    return local_linear_attention(q, k, v, ridge_lambda=ridge, backend=backend, tolerance=1e-7)[..., :tokens]


@pytest.mark.parametrize("backend", BACKENDS)
def test_effective_weights_sum_to_one_are_causal_and_can_be_negative(backend):
    dtype = dtype_of(backend)
    q, k, _ = (t.detach() for t in make_inputs(1, 12, 2, 2, 16, dtype))
    w = effective_weights(q, k, 0.05, backend)  # (B, T, H, T)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w[..., 0]), atol=TOLERANCE[dtype] * 10, rtol=0)
    future = torch.ones(12, 12, dtype=torch.bool, device=DEVICE).triu(1)[None, :, None, :].expand_as(w)
    assert w[future].abs().max() == 0
    assert w.min() < -1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_output_is_the_first_value(backend):
    dtype = dtype_of(backend)
    q, k, v = (t.detach() for t in make_inputs(2, 5, 2, 1, 16, dtype))
    # fp32 loses ~|eta| |k| eps in 1 + eta.k_j - eta.kbar, and eta ~ |q - kbar| / lambda.
    out = local_linear_attention(q, k, v, ridge_lambda=0.01 if backend == "torch" else 0.1, backend=backend)
    torch.testing.assert_close(out[:, 0], v[:, 0].expand_as(out[:, 0]), atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_ridge_is_softmax_attention(backend):
    dtype = dtype_of(backend)
    q, k, v = (t.detach() for t in make_inputs(1, 18, 4, 2, 16, dtype))
    out = local_linear_attention(q, k, v, ridge_lambda=1e12, backend=backend)
    softmax = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, softmax, atol=TOLERANCE[dtype], rtol=0)


def test_denominator_is_positive_and_equals_the_sherman_morrison_form():
    """1 - mu.rho computed in the spec's variables equals 1/(1 + (q - kbar).eta) with the backend's eta."""
    q, k, v = (t.detach() for t in make_inputs(1, 10, 1, 1, 4, torch.float64))
    ridge = torch.tensor([0.2], dtype=torch.float64, device=DEVICE)
    _, eta, _ = reference.forward(q, k, v, ridge, 0.5)
    q1, k1 = q[0, :, 0], k[0, :, 0]
    for i in range(10):
        p = torch.softmax(0.5 * k1[: i + 1] @ q1[i], 0)
        x = k1[: i + 1] - q1[i]
        mu = p @ x
        rho = torch.linalg.solve((p[:, None] * x).T @ x + 0.2 * torch.eye(4, dtype=torch.float64, device=DEVICE), mu)
        denominator = 1 - mu @ rho
        assert denominator > 0
        torch.testing.assert_close(denominator, 1 / (1 - mu @ eta[0, i, 0]), atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_are_max_shifted(backend):
    """Logits around +-300 overflow exp() without the running max; the result must stay exact."""
    dtype = dtype_of(backend)
    q, k, v = (t.detach() for t in make_inputs(1, 16, 2, 1, 16, dtype))
    q = q * 20
    out = local_linear_attention(q, k, v, ridge_lambda=0.5, backend=backend, tolerance=1e-7)
    want = naive_local_linear_attention(q.double(), k.double(), v.double(), 0.5, 0.25)
    assert torch.isfinite(out).all()
    assert ((out.double() - want).abs().max() / want.abs().max()) < TOLERANCE[dtype]


def test_adding_a_constant_to_a_rows_logits_changes_nothing():
    """An extra dimension (q: per-row constant c_i / tau, k: 1) shifts row i's logits by c_i."""
    q, k, v = (t.detach() for t in make_inputs(1, 11, 2, 1, 5, torch.float64))
    shift = torch.randn(1, 11, 2, 1, dtype=torch.float64, device=DEVICE) * 10
    q_shifted = torch.cat([q, shift / 0.4], -1)
    k_shifted = torch.cat([k, torch.ones_like(k[..., :1])], -1)
    v_padded = torch.cat([v, torch.zeros_like(v[..., :1])], -1)
    out = local_linear_attention(q, k, v, ridge_lambda=0.3, softmax_scale=0.4, backend="torch")
    shifted = local_linear_attention(q_shifted, k_shifted, v_padded, ridge_lambda=0.3, softmax_scale=0.4,
                                     backend="torch")
    torch.testing.assert_close(shifted[..., :5], out, atol=1e-12, rtol=0)


def test_uniform_weights_give_global_affine_ridge_regression():
    """tau -> 0: o_i is the intercept b of min (1/n) sum_j |v_j - b - W (k_j - q_i)|^2 + lambda |W|^2."""
    q, k, v = (t.detach() for t in make_inputs(1, 12, 1, 1, 3, torch.float64))
    out = local_linear_attention(q, k, v, ridge_lambda=0.1, softmax_scale=1e-9, backend="torch")
    for i in range(12):
        n = i + 1
        z = torch.cat([torch.ones(n, 1, dtype=torch.float64, device=DEVICE), k[0, :n, 0] - q[0, i, 0]], 1)
        penalty = torch.diag(torch.tensor([0.0, 0.1, 0.1, 0.1], dtype=torch.float64, device=DEVICE))
        theta = torch.linalg.solve(z.T @ z / n + penalty, z.T @ v[0, :n, 0] / n)
        torch.testing.assert_close(out[0, i, 0], theta[0], atol=1e-7, rtol=0)


def test_in_context_linear_map_is_recovered_where_softmax_cannot():
    """The spec's regression check: v_j = A k_j, 128 pairs, d = 4, lambda = 1e-3, tau = 0.5."""
    torch.manual_seed(1)
    trials, pairs, dim = 200, 128, 4
    k = torch.randn(trials, pairs + 1, 1, dim, dtype=torch.float64)
    a = torch.randn(trials, dim, dim, dtype=torch.float64) / dim**0.5
    v = torch.einsum("bij,btj->bti", a, k[:, :, 0])[:, :, None]
    q = torch.randn(trials, pairs + 1, 1, dim, dtype=torch.float64)
    target = torch.einsum("bij,bj->bi", a, q[:, -1, 0])
    lla = local_linear_attention(q, k, v, ridge_lambda=1e-3, softmax_scale=0.5, backend="torch")[:, -1, 0]
    softmax = local_linear_attention(q, k, v, ridge_lambda=1e12, softmax_scale=0.5, backend="torch")[:, -1, 0]
    lla_mse = ((lla - target) ** 2).mean().item()
    softmax_mse = ((softmax - target) ** 2).mean().item()
    assert lla_mse < 1e-4, lla_mse
    assert softmax_mse > 0.05, softmax_mse


# ----------------------------------------------------------------------------- the iterative solver


def test_solver_stops_on_convergence_and_reports_it():
    q, k, v = (t.detach() for t in make_inputs(1, 40, 2, 1, 16, TRITON_DTYPE))
    out, stats = local_linear_attention(q, k, v, ridge_lambda=torch.tensor([10.0, 0.05], device=DEVICE),
                                        backend="triton", tolerance=1e-5, return_solver_stats=True)
    assert stats.iterations.shape[:2] == (1, 2) and stats.residual.shape == (1, 2, 40)
    assert stats.residual.max() <= 1e-5
    # lambda = 10 is well conditioned: fewer iterations than the head dim, and fewer than lambda = 0.05.
    assert 0 < stats.iterations[0, 0].max() < 16
    assert stats.iterations[0, 0].max() < stats.iterations[0, 1].max()


def test_torch_backend_reports_a_direct_solve():
    q, k, v = (t.detach() for t in make_inputs(1, 6, 2, 1, 4, torch.float64))
    _, stats = local_linear_attention(q, k, v, ridge_lambda=1.0, backend="torch", return_solver_stats=True)
    assert stats.iterations.shape == (1, 2, 0) and stats.residual.abs().max() == 0


def test_iteration_cap_warns_with_the_residual_forward_and_backward():
    q, k, v = make_inputs(1, 20, 1, 1, 16, TRITON_DTYPE)
    with pytest.warns(RuntimeWarning, match=r"forward ridge solve reached max_iterations=2 with relative residual"):
        out = local_linear_attention(q, k, v, ridge_lambda=0.01, backend="triton", max_iterations=2, validate=True)
    with pytest.warns(RuntimeWarning, match=r"backward \(adjoint\) ridge solve reached max_iterations=2"):
        out.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        local_linear_attention(q, k, v, ridge_lambda=0.01, backend="triton", validate=True)


def test_by_default_an_unconverged_solve_is_reported_by_the_next_call():
    """No host synchronisation in the call: the residual summary is read on a later call."""
    q, k, v = make_inputs(1, 20, 1, 1, 16, TRITON_DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = local_linear_attention(q, k, v, ridge_lambda=0.01, backend="triton", max_iterations=2)
        out.sum().backward()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()  # the later call reports the copies that have landed by then
    with pytest.warns(RuntimeWarning) as record:
        local_linear_attention(q.detach(), k.detach(), v.detach(), ridge_lambda=1.0, backend="torch")
    messages = [str(w.message) for w in record]
    assert any("forward ridge solve reached max_iterations=2" in m for m in messages), messages
    assert any("backward (adjoint) ridge solve reached max_iterations=2" in m for m in messages), messages


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_path_never_reads_a_tensor_value_on_the_host(backend, monkeypatch):
    """Forward and backward without .item(), .tolist() or bool(tensor) (each a GPU synchronisation)."""
    dtype = dtype_of(backend)
    q, k, v = make_inputs(1, 18, 2, 1, 16, dtype)
    ridge = torch.tensor([0.5, 1.0], dtype=reference.accumulation_dtype(dtype), device=DEVICE, requires_grad=True)

    def refuse(*_args, **_kwargs):
        raise AssertionError("host synchronisation in the default path")

    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    out = local_linear_attention(q, k, v, ridge_lambda=ridge, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v, ridge), torch.ones_like(out))
    monkeypatch.undo()
    assert all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------- custom op, module


def test_custom_ops_pass_opcheck_and_compile_without_graph_breaks():
    q, k, v = make_inputs(1, 7, 2, 1, 4, torch.float64)
    ridge = torch.tensor([0.5, 1.5], dtype=torch.float64, device=DEVICE, requires_grad=True)
    torch.library.opcheck(_forward_op, (q, k, v, ridge, 0.5, 1e-5, 8, "torch", False))
    out, eta, lse, _, _ = _forward_op(q, k, v, ridge, 0.5, 1e-5, 8, "torch", False)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), ridge.detach(), eta, lse, 0.5, 1e-5, 8, "torch",
            False)
    torch.library.opcheck(_backward_op, args)

    def fn(q, k, v, ridge):
        return local_linear_attention(q, k, v, ridge_lambda=ridge, softmax_scale=0.5, backend="torch")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager = fn(q, k, v, ridge)
    got = compiled(q, k, v, ridge)
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), ridge)[0], torch.autograd.grad(eager.sum(), ridge)[0])


def test_module_learns_a_positive_per_head_lambda():
    module = LocalLinearAttention(4, ridge_lambda=2.0, backend="torch").double().to(DEVICE)
    torch.testing.assert_close(module.ridge_lambda, torch.full((4,), 2.0, dtype=torch.float64, device=DEVICE),
                               atol=1e-6, rtol=0)
    q, k, v = make_inputs(1, 9, 4, 2, 8, torch.float64)
    out = module(q, k, v)
    want = naive_local_linear_attention(q, k, v, module.ridge_lambda.detach(), 8**-0.5)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    out.pow(2).sum().backward()
    assert module.log_ridge.grad is not None and module.log_ridge.grad.abs().min() > 0
    with torch.no_grad():
        module.log_ridge -= 100  # any step keeps lambda positive
    assert (module.ridge_lambda > 0).all()
    with pytest.raises(ValueError, match="ridge_lambda must be a positive"):
        LocalLinearAttention(2, ridge_lambda=0.0)
    with pytest.raises(ValueError, match="num_heads must be"):
        LocalLinearAttention(0)


# ----------------------------------------------------------------------------- bad input


def _bad(name):
    q, k, v = (t.detach() for t in make_inputs(2, 6, 4, 2, 16))
    kwargs = dict(ridge_lambda=1.0)
    if name == "non_causal":
        kwargs["causal"] = False
    elif name == "batch_mismatch":
        k, v = k[:1], v[:1]
    elif name == "tokens_mismatch":
        k, v = k[:, :5], v[:, :5]
    elif name == "dim_mismatch":
        k, v = k[..., :8], v[..., :8]
    elif name == "kv_shapes_differ":
        v = v[:, :, :1]
    elif name == "heads_not_multiple":
        k, v = (torch.randn(2, 6, 3, 16, device=DEVICE) for _ in range(2))
    elif name == "three_dims":
        q = q[0]
    elif name == "int_dtype":
        q = q.long()
    elif name == "mixed_dtype":
        k = k.double()
    elif name in ("lambda_zero", "lambda_negative", "lambda_nan"):
        kwargs["ridge_lambda"] = {"lambda_zero": 0.0, "lambda_negative": -1.0, "lambda_nan": math.nan}[name]
    elif name == "lambda_tensor_negative":  # value checks: only with validate=True (a host sync)
        kwargs.update(ridge_lambda=torch.tensor([1.0, 1.0, -0.5, 1.0], device=DEVICE), validate=True)
    elif name == "lambda_tensor_shape":
        kwargs["ridge_lambda"] = torch.ones(2, device=DEVICE)
    elif name in ("nan_q", "nan_k", "inf_v"):
        t = {"nan_q": q, "nan_k": k, "inf_v": v}[name]
        t[0, 3, 1, 2] = math.nan if name != "inf_v" else math.inf
        kwargs["validate"] = True
    elif name == "tolerance":
        kwargs["tolerance"] = 0.0
    elif name == "max_iterations":
        kwargs["max_iterations"] = 0
    elif name == "softmax_scale":
        kwargs["softmax_scale"] = -1.0
    elif name == "triton_head_dim":
        q, k, v = (t[..., :12] for t in (q, k, v))
        kwargs["backend"] = "triton"
    elif name == "triton_float64":
        q, k, v = (t.double() for t in (q, k, v))
        kwargs["backend"] = "triton"
    elif name == "backend_name":
        kwargs["backend"] = "gpu"
    return q, k, v, kwargs


BAD = {
    "non_causal": "only causal=True",
    "batch_mismatch": "does not match q shape",
    "tokens_mismatch": "does not match q shape",
    "dim_mismatch": "does not match q shape",
    "kv_shapes_differ": "k and v must have the same shape",
    "heads_not_multiple": r"query heads \(4\) must be a multiple of the number of key/value heads \(3\)",
    "three_dims": r"q must have shape \(B, T, Hq, D\)",
    "int_dtype": "q has dtype torch.int64",
    "mixed_dtype": "q has dtype torch.float32 but k has torch.float64",
    "lambda_zero": "ridge_lambda must be a positive finite",
    "lambda_negative": "ridge_lambda must be a positive finite",
    "lambda_nan": "ridge_lambda must be a positive finite",
    "lambda_tensor_negative": "ridge_lambda must be positive and finite",
    "lambda_tensor_shape": r"ridge_lambda must be a float or a tensor of shape \(Hq,\)",
    "nan_q": "q contains NaN",
    "nan_k": "k contains NaN",
    "inf_v": "v contains NaN or infinite",
    "tolerance": "tolerance must be a number in",
    "max_iterations": "max_iterations must be an integer",
    "softmax_scale": "softmax_scale must be a positive",
    "triton_head_dim": "head dims",
    "triton_float64": "backend 'triton' supports",
    "backend_name": "backend must be one of",
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_refused_with_a_clear_error(name):
    q, k, v, kwargs = _bad(name)
    with pytest.raises((ValueError, TypeError), match=BAD[name]):
        local_linear_attention(q, k, v, **kwargs)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_float32_on_gpu_is_routed_to_the_torch_backend():
    q, k, v = (t.detach() for t in make_inputs(1, 8, 2, 1, 16, device="cuda"))
    with pytest.raises(TypeError, match="use backend='torch' for fp32"):
        local_linear_attention(q, k, v, ridge_lambda=1.0, backend="triton")
    _, stats = local_linear_attention(q, k, v, ridge_lambda=1.0, return_solver_stats=True)
    assert stats.iterations.shape[-1] == 0  # the direct (torch) solve


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_triton_matches_the_torch_backend_on_gpu(head_dim, dtype):
    q, k, v = make_inputs(2, 1000, 8, 2, head_dim, dtype, device="cuda")
    ridge = torch.linspace(0.1, 2.0, 8, device="cuda")
    grad_out = torch.randn_like(q)
    got = op_and_grads(q, k, v, ridge, grad_out, backend="triton")
    want = op_and_grads(*(t.detach().double().requires_grad_() for t in (q, k, v)), ridge.double(),
                        grad_out.double(), backend="torch")
    assert_close(got, want, TOLERANCE[dtype])


# ----------------------------------------------------------------------------- fp32 numerics


def offset_keys(k, offset):
    """Keys plus ``offset`` times one fixed unit direction: a large common component, which the
    softmax ignores (a per-row constant) but raw second moments of the keys do not."""
    direction = torch.randn(k.shape[-1], generator=torch.Generator().manual_seed(1)).to(k.device)
    return (k.detach().double() + offset * direction / direction.norm()).to(k.dtype).requires_grad_()


@contextlib.contextmanager
def solve_reports():
    """The unconverged-solve reports (messages) of the op calls inside. By default the op reports a
    solve on its next call (no host sync), so earlier calls' reports are flushed first and the
    calls' own ones at the end."""
    _deferred.report()
    messages = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        yield messages
        _deferred.report()
    messages.extend(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))


@pytest.mark.parametrize("offset, ridge_lambda", [(100.0, 1e-2), (10.0, 1e-3)])
def test_triton_fp32_is_accurate_on_keys_with_a_large_common_offset(offset, ridge_lambda):
    """The kernels centre the keys at their mean: before they did, the raw moments cancelled and the
    fp32 error grew like |eta| |k| eps: the former kernels failed both cases (out 1.7 relative at
    offset 100, 5.0e-3 at offset 10 and lambda 1e-3; about 1e-4 now)."""
    q, k, v = make_inputs(1, 32, 2, 1, 16, torch.float32)
    k = offset_keys(k, offset)
    ridge = torch.full((2,), ridge_lambda, device=DEVICE)
    grad_out = torch.randn_like(q)
    with solve_reports() as reports:
        got = op_and_grads(q, k, v, ridge, grad_out, backend="triton", tolerance=1e-7)
    assert_close(got, reference_and_grads(q, k, v, ridge, grad_out, 16**-0.5), 1e-3)
    # A few fp32 CG solves stagnate just above 1e-7 (about 8e-6 at offset 10, lambda 1e-3): reported as
    # unconverged, never as failed.
    for message in reports:
        residual = float(re.search(r"relative residual up to ([0-9.e+-]+)", message).group(1))
        assert "reached max_iterations" in message and residual < 1e-4, message


@pytest.mark.parametrize("target, dtype", [("sm80", torch.float16), ("sm90", torch.bfloat16)])
def test_triton_half_precision_gpu_tiles_are_accurate_on_offset_keys(target, dtype):
    """16-bit keys stay exact for the tensor cores; the products subtract the centre with their fp32
    operand's own hi + lo split. The former kernels: out 2.3e3 relative in bf16, 0.49 in fp16."""
    with gpu_tiles(target):
        q, k, v = make_inputs(1, 32, 2, 1, 16, dtype)
        k = offset_keys(k, 100.0)
        ridge = torch.full((2,), 1e-2, device=DEVICE)
        grad_out = torch.randn_like(q)
        with solve_reports() as reports:  # 1e-5: far below the 16-bit outputs' own error
            got = op_and_grads(q, k, v, ridge, grad_out, backend="triton", tolerance=1e-5)
    assert reports == []
    assert_close(got, reference_and_grads(q, k, v, ridge, grad_out, 16**-0.5), TOLERANCE[dtype])


def test_triton_solve_beyond_fp32_is_an_error_naming_the_head_and_the_remedy():
    """Keys x10, T = D, lambda = 1e-5: cond ~ 1e7 and C singular for every prefix shorter than D; fp32
    CG diverges (residual ~1e5). With validate=True that is an error, not a warning nor NaNs."""
    q, k, v = (t.detach() for t in make_inputs(1, 16, 2, 1, 16, TRITON_DTYPE, key_scale=10.0))
    ridge = torch.tensor([1.0, 1e-5], device=DEVICE)
    with pytest.raises(RuntimeError, match=r"local_linear_attention: the forward ridge solve failed for query "
                                           r"head\(s\) \[1\].*backend='torch' \(it solves in float64\) or a larger "
                                           r"ridge_lambda"):
        local_linear_attention(q, k, v, ridge_lambda=ridge, backend="triton", validate=True)


def test_triton_nan_solve_is_reported_not_silent():
    """A NaN residual (here from a NaN query, which only validate=True refuses) is a failed solve in
    the deferred report, with its head."""
    q, k, v = (t.detach() for t in make_inputs(1, 16, 2, 1, 16, TRITON_DTYPE))
    q_nan = q.clone()
    q_nan[0, 3, 1, 0] = float("nan")
    local_linear_attention(q_nan, k, v, ridge_lambda=1.0, backend="triton")
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    with pytest.warns(RuntimeWarning, match=r"forward ridge solve failed for query head\(s\) \[1\]"):
        local_linear_attention(q, k, v, ridge_lambda=1.0, backend="torch")


@pytest.mark.parametrize("tokens, head_dim, ridge_lambda, offset",
                         [(4, 4, 1e-5, 0.0), (64, 64, 1e-3, 0.0), (16, 16, 1e-7, 0.0), (16, 16, 1e-3, 100.0)])
def test_torch_backend_is_exact_in_fp32_on_ill_conditioned_keys(tokens, head_dim, ridge_lambda, offset):
    """Keys x10 with a small lambda: cond(C + lambda I) ~ 1e7, where an fp32 solve from raw moments
    failed in Cholesky (or lost every digit); and keys with a large common offset. The backend
    computes in float64; fp32 outputs and gradients match the float64 reference of the same
    (fp32-representable) inputs."""
    generator = torch.Generator().manual_seed(tokens)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, generator=generator).to(DEVICE) * scale
               for heads, scale in ((2, 1.0), (1, 10.0), (1, 1.0)))
    q, k, v = (t.requires_grad_() for t in (q, offset_keys(k, offset), v))
    ridge = torch.full((2,), ridge_lambda, device=DEVICE)
    grad_out = torch.randn(q.shape, generator=generator).to(DEVICE)
    got = op_and_grads(q, k, v, ridge, grad_out, backend="torch")
    want = reference_and_grads(q, k, v, ridge, grad_out, head_dim**-0.5)
    assert_close(got, want, 1e-4)


def test_a_ridge_system_below_float64_rounding_is_an_error_naming_the_head():
    # Keys 1e6 + noise: the raw second moment cancels to C with an error ~1e-4 > lambda = 1e-8. The
    # error is the CPU's (reading Cholesky's info there waits for no device): CPU tensors on any
    # machine; on a GPU the failed rows come out NaN instead (test_gpu_failed_ridge_factors_are_nan).
    q, k, v = make_inputs(1, 6, 2, 1, 4, torch.float64, device="cpu")
    with pytest.raises(RuntimeError, match=r"ridge system .* of query head \d+ at position \d+ .*larger ridge_lambda"):
        local_linear_attention(q, k.detach() + 1e6, v, ridge_lambda=1e-8, backend="torch")


@pytest.mark.gpu
def test_gpu_failed_ridge_factors_are_nan():
    """On a GPU a ridge matrix that is not numerically positive definite gives NaN factors (hence NaN
    outputs and gradients) without a host synchronisation; the other matrices factor as usual."""
    matrices = torch.stack([torch.eye(3), -torch.eye(3), torch.eye(3) * 2]).double().cuda()
    factors = reference.ridge_cholesky(matrices, lambda index: f"matrix {index}")
    assert torch.isnan(factors[1]).all()
    torch.testing.assert_close(factors[[0, 2]], torch.linalg.cholesky(matrices[[0, 2]]))
