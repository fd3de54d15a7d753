"""prefix_grouped_attention vs the spec's naive repeated-prefix attention (F_naive), every backend.

Without CUDA the Triton kernels run through Triton's interpreter (conftest.py), forward and backward.
"""
import pytest
import torch

from conftest import DEVICE
from pyfastrl import PrefixGroupLayout, prefix_grouped_attention
from pyfastrl._backend import BACKEND_ENV, FLASH_OR_TRITON, resolve_backend
from pyfastrl.kernels.launch_target import gpu_tiles, tile_target
from pyfastrl.kernels.prefix_attention import kernel as prefix_kernel
from pyfastrl.kernels.prefix_attention.reference import repeated_prefix_attention
from pyfastrl.ops.prefix_attention import _forward_op

LAYOUTS = {
    "one_group_one_member_len1": ([1], [[1]]),
    "prefix1": ([1], [[3, 1, 5]]),
    "suffix1": ([7], [[1, 1, 1]]),
    "ragged_many_groups": ([5, 17, 1, 9], [[3, 9], [1, 20, 4], [6], [2, 2, 2, 2, 2]]),
    "multi_block": ([40], [[33, 17]]),
}


def make_inputs(layout, num_heads, num_kv_heads, head_dim, dtype, device=DEVICE):
    shape_q = (layout.total_tokens, num_heads, head_dim)
    shape_kv = (layout.total_tokens, num_kv_heads, head_dim)
    q = torch.randn(shape_q, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(shape_kv, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(shape_kv, dtype=dtype, device=device, requires_grad=True)
    return q, k, v


def reference_and_grads(q, k, v, layout, grad_out, scale=None):
    """F_naive in float64 and autograd's dq, dk, dv of it."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = repeated_prefix_attention(q64, k64, v64, layout.to(q.device), scale)
    return (out, *torch.autograd.grad(out, (q64, k64, v64), grad_out.double()))


def grouped_and_grads(q, k, v, layout, grad_out, **kwargs):
    out = prefix_grouped_attention(q, k, v, layout, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def assert_close(got, want, atol, rtol=0.0):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_torch_backend_float64_equals_repeated_prefix(name, gqa):
    layout = PrefixGroupLayout(*LAYOUTS[name], device=DEVICE)
    q, k, v = make_inputs(layout, 4, 4 // gqa, 16, torch.float64)
    grad_out = torch.randn_like(q)
    got = grouped_and_grads(q, k, v, layout, grad_out, backend="torch")
    assert_close(got, reference_and_grads(q, k, v, layout, grad_out), atol=1e-10)


@pytest.mark.parametrize(
    "name, gqa, head_dim",
    [
        ("one_group_one_member_len1", 1, 16),
        ("prefix1", 2, 32),
        ("suffix1", 4, 16),
        ("ragged_many_groups", 2, 16),
        ("ragged_many_groups", 4, 48),  # head dim padded up to the next power of two
        ("multi_block", 1, 32),
    ],
)
def test_triton_float32_equals_repeated_prefix(name, gqa, head_dim):
    layout = PrefixGroupLayout(*LAYOUTS[name], device=DEVICE)
    q, k, v = make_inputs(layout, 4, 4 // gqa, head_dim, torch.float32)
    grad_out = torch.randn_like(q)
    got = grouped_and_grads(q, k, v, layout, grad_out, backend="triton")
    assert_close(got, reference_and_grads(q, k, v, layout, grad_out), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision_as_accurate_as_torch_backend(dtype):
    """Half-precision inputs: the kernels' error vs float64 is within the torch backend's own error
    on the same inputs plus one ulp of the dtype at the tensor's scale: both accumulate in fp32,
    but the kernels (as FlashAttention) round P and dS to the input dtype before their matmuls."""
    layout = PrefixGroupLayout(*LAYOUTS["ragged_many_groups"], device=DEVICE)
    q, k, v = make_inputs(layout, 4, 2, 32, dtype)
    grad_out = torch.randn_like(q)
    want = reference_and_grads(q, k, v, layout, grad_out)
    kernel = grouped_and_grads(q, k, v, layout, grad_out, backend="triton")
    plain = grouped_and_grads(q, k, v, layout, grad_out, backend="torch")
    for name, a, b, w in zip(("out", "dq", "dk", "dv"), kernel, plain, want):
        assert a.dtype == dtype
        kernel_err = (a.double() - w).abs().max().item()
        plain_err = (b.double() - w).abs().max().item()
        bound = 2 * plain_err + torch.finfo(dtype).eps * w.abs().max().item()
        assert kernel_err <= bound, (name, kernel_err, plain_err)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_inputs(backend):
    """Head-major projections (unit-stride head dim) are read in place; others are copied."""
    layout = PrefixGroupLayout(*LAYOUTS["ragged_many_groups"], device=DEVICE)
    T = layout.total_tokens
    q = torch.randn(4, T, 16, device=DEVICE).transpose(0, 1).requires_grad_()  # (T, H, D), not contiguous
    k = torch.randn(T, 16, 2, device=DEVICE).transpose(1, 2).requires_grad_()  # head dim stride != 1
    v = torch.randn(T, 2, 32, device=DEVICE)[:, :, ::2].requires_grad_()  # strided head dim
    grad_out = torch.randn(T, 4, 16, device=DEVICE)
    got = grouped_and_grads(q, k, v, layout, grad_out, backend=backend)
    assert_close(got, reference_and_grads(q, k, v, layout, grad_out), atol=1e-4, rtol=1e-4)


def test_custom_scale_and_gradcheck_float64():
    layout = PrefixGroupLayout([3, 2], [[2, 1], [3]], device=DEVICE)
    q, k, v = make_inputs(layout, 2, 1, 8, torch.float64)
    grad_out = torch.randn_like(q)
    got = grouped_and_grads(q, k, v, layout, grad_out, backend="torch", softmax_scale=0.7)
    assert_close(got, reference_and_grads(q, k, v, layout, grad_out, scale=0.7), atol=1e-10)
    fn = lambda q, k, v: prefix_grouped_attention(q, k, v, layout, backend="torch", softmax_scale=0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_custom_op_registration_passes_opcheck():
    layout = PrefixGroupLayout([3, 2], [[2, 1], [3]])
    q, k, v = make_inputs(layout, 2, 1, 16, torch.float32, device="cpu")
    blocks = layout.query_blocks(None)
    torch.library.opcheck(_forward_op, (q, k, v, blocks, blocks, blocks, 0.25, 0.0, 0, "torch"))


def test_torch_compile_fullgraph_matches_eager():
    layout = PrefixGroupLayout(*LAYOUTS["ragged_many_groups"])
    q, k, v = make_inputs(layout, 4, 2, 16, torch.float32, device="cpu")

    def loss(q, k, v):
        return prefix_grouped_attention(q, k, v, layout, backend="torch").square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    eager_grads = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled_grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_auto_backend_and_environment_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend("op", "auto", cpu) == "torch"  # auto never takes the interpreter
    assert resolve_backend("op", "auto", DEVICE) == ("triton" if DEVICE.type == "cuda" else "torch")
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert resolve_backend("op", "auto", DEVICE) == "triton"  # without CUDA: the interpreter this test run has on
    assert resolve_backend("op", "torch", DEVICE) == "torch"  # an explicit choice wins
    if DEVICE.type == "cuda":  # no interpreter with CUDA: CPU tensors cannot take the override
        with pytest.raises(RuntimeError, match="need CUDA tensors"):
            resolve_backend("op", "auto", cpu)
    monkeypatch.setenv(BACKEND_ENV, "gpu")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        resolve_backend("op", "auto", DEVICE)


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layout = PrefixGroupLayout([2], [[1]])
    q, k, v = make_inputs(layout, 2, 2, 16, torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="need CUDA tensors.*TRITON_INTERPRET=1"):
        prefix_grouped_attention(q, k, v, layout, backend="triton")
    # A bad argument is reported before the device: the user learns of it on any machine.
    with pytest.raises(TypeError, match="backend='torch'"):
        prefix_grouped_attention(q.double(), k.double(), v.double(), layout, backend="triton")


def _bad_input_cases():
    layout = PrefixGroupLayout([3], [[2, 1]])  # T = 6
    T = layout.total_tokens
    q = torch.randn(T, 4, 16)
    kv = torch.randn(T, 2, 16)
    return [
        ("rank", (q[0], kv, kv, layout, {}), ValueError, r"q must have shape \(T, Hq, D\)"),
        ("dtype", (q.long(), kv.long(), kv.long(), layout, {}), TypeError, "q has dtype torch.int64"),
        ("mixed dtypes", (q, kv.double(), kv, layout, {}), TypeError, "k has"),
        ("device", (q, kv.to("meta"), kv, layout, {}), ValueError, "k is on meta"),
        ("gqa", (q, torch.randn(T, 3, 16), torch.randn(T, 3, 16), layout, {}), ValueError, "multiple"),
        ("k vs v", (q, kv, torch.randn(T, 1, 16), layout, {}), ValueError, "same shape"),
        ("T", (q[:5], kv[:5], kv[:5], layout, {}), ValueError, "total_tokens is 6"),
        ("head dim", (q, torch.randn(T, 2, 8), torch.randn(T, 2, 8), layout, {}), ValueError, "in T or D"),
        ("layout type", (q, kv, kv, [3, 2, 1], {}), TypeError, "PrefixGroupLayout"),
        ("layout device", (q, kv, kv, layout.to("meta"), {}), ValueError, "layout is on meta"),
        ("scale", (q, kv, kv, layout, {"softmax_scale": -1.0}), ValueError, "softmax_scale"),
        ("backend", (q, kv, kv, layout, {"backend": "gpu"}), ValueError, "backend must be one of"),
        ("triton fp64", (q.double(), kv.double(), kv.double(), layout, {"backend": "triton"}), TypeError,
         "backend='torch'"),
        ("triton 32-bit offsets", (torch.empty(16, 2**31 // 256, 16, device="meta"),) * 3
         + (PrefixGroupLayout([15], [[1]], device="meta"), {"backend": "triton"}), ValueError, "32-bit offsets"),
        # A small view whose strides reach far into its buffer: its numel() alone would pass.
        ("triton 32-bit strides", (torch.empty(16, 2**27, 16, device="meta")[:, :4],) * 3
         + (PrefixGroupLayout([15], [[1]], device="meta"), {"backend": "triton"}), ValueError, "32-bit offsets"),
        ("triton head dim", (torch.randn(T, 4, 24), torch.randn(T, 2, 24), torch.randn(T, 2, 24), layout,
                             {"backend": "triton"}), ValueError, "multiple of 16"),
    ]


@pytest.mark.parametrize("case", _bad_input_cases(), ids=lambda c: c[0])
def test_bad_input_raises_clear_error(case):
    _, (q, k, v, layout, kwargs), error, match = case
    with pytest.raises(error, match=match):
        prefix_grouped_attention(q, k, v, layout, **kwargs)


def dense_reference(q, k, v, layout, scale, softcap=0.0, window=0):
    """Float64 attention over the grouped batch's dense T x T visibility mask, written from the
    path-position rules: a query sees a key of its own group that is a prompt key or of its own
    completion, at a path position <= its own and (window W > 0) less than W back; scores
    ``scale * q.k`` soft-capped to ``c * tanh(s / c)`` (c > 0). Returns ``(out, lse (Hq, T))``."""
    group, member = [], []
    for g, (prefix_len, suffix_lens) in enumerate(zip(layout.prefix_lens, layout.suffix_lens)):
        group += [g] * prefix_len
        member += [-1] * prefix_len
        for length in suffix_lens:
            group += [g] * length
            member += [len(set(member))] * length  # a new id per completion (-1 already in the set)
    group, member = torch.tensor(group), torch.tensor(member)
    pos = layout.position_ids.cpu()
    distance = pos[:, None] - pos[None, :]
    visible = (group[:, None] == group[None, :]) & ((member[None, :] == -1) | (member[:, None] == member[None, :]))
    visible &= distance >= 0
    if window > 0:
        visible &= distance < window
    rep = q.shape[1] // k.shape[1]
    scores = torch.einsum("thd,shd->hts", q, k.repeat_interleave(rep, 1)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible.to(q.device), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("hts,shd->thd", torch.exp(scores - lse[..., None]), v.repeat_interleave(rep, 1))
    return out, lse


def kernel_and_grads(q, k, v, layout, grad_out, scale, softcap, window):
    """The Triton entry points called as the op calls them, on the layout's block tables."""
    block_fwd, block_dq, block_dkdv = prefix_kernel.block_sizes(q.shape[2], q.device)
    out, lse = prefix_kernel.forward(q, k, v, layout.query_blocks(block_fwd), scale, softcap, window)
    grads = prefix_kernel.backward(grad_out, q, k, v, out, lse, layout.query_blocks(block_dq),
                                   layout.key_blocks(block_dkdv), scale, softcap, window)
    return out, lse, grads


def check_kernel_against_dense(layout, num_heads, num_kv_heads, head_dim, dtype, softcap, window, atol, rtol):
    q, k, v = make_inputs(layout, num_heads, num_kv_heads, head_dim, dtype)
    grad_out = torch.randn_like(q)
    scale = 0.3 * head_dim**-0.5 if softcap == 0 else 3.0 * head_dim**-0.5  # softcap: scores reach the cap
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want_out, want_lse = dense_reference(q64, k64, v64, layout, scale, softcap, window)
    want = (want_out, *torch.autograd.grad(want_out, (q64, k64, v64), grad_out.double()))
    with torch.no_grad():
        out, lse, grads = kernel_and_grads(q, k, v, layout, grad_out, scale, softcap, window)
    assert_close((out, *grads), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), want_lse, atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    "name, gqa, softcap, window",
    [
        ("ragged_many_groups", 2, 0.0, 4),  # window shorter than most prompts
        ("ragged_many_groups", 4, 30.0, 1),  # every query sees only itself
        ("ragged_many_groups", 1, 20.0, 0),
        ("ragged_many_groups", 2, 50.0, 7),
        ("multi_block", 2, 0.0, 21),  # window edge inside tiles, prefix keys split into query chunks
        ("multi_block", 4, 25.0, 100),  # window longer than prompt + completion: no effect
    ],
)
def test_triton_softcap_and_window_equal_dense_float64(name, gqa, softcap, window):
    layout = PrefixGroupLayout(*LAYOUTS[name], device=DEVICE)
    check_kernel_against_dense(layout, 4, 4 // gqa, 32, torch.float32, softcap, window, atol=1e-4, rtol=1e-4)


def test_triton_without_softcap_and_window_equals_dense_float64():
    """The dense reference agrees with the repeated-prefix one (F_naive) when both are off."""
    layout = PrefixGroupLayout(*LAYOUTS["ragged_many_groups"], device=DEVICE)
    q, k, v = make_inputs(layout, 4, 2, 16, torch.float64)
    torch.testing.assert_close(dense_reference(q, k, v, layout, 0.25)[0],
                               repeated_prefix_attention(q, k, v, layout, 0.25))
    check_kernel_against_dense(layout, 4, 2, 16, torch.float32, 0.0, 0, atol=1e-4, rtol=1e-4)


# A layout spanning >= 2 GPU tiles in every dimension (query tiles of 64-128 rows, key tiles of
# 32-64) with ragged groups; the kernels run the tile tables the GPUs would, under the interpreter.
GPU_TILE_LAYOUT = ([150, 3], [[140, 70, 1], [130]])


@pytest.mark.parametrize("target", ["sm80", "sm90"])
@pytest.mark.parametrize("dtype, softcap, window", [(torch.float32, 0.0, 0), (torch.float32, 30.0, 100),
                                                     (torch.bfloat16, 0.0, 0)])
def test_triton_gpu_tile_tables_equal_dense_float64(target, dtype, softcap, window):
    layout = PrefixGroupLayout(*GPU_TILE_LAYOUT, device=DEVICE)
    # bf16: P and dS are rounded to bf16 before their matmuls (as in FlashAttention).
    atol = 1e-4 if dtype == torch.float32 else 3e-2
    with gpu_tiles(target):
        check_kernel_against_dense(layout, 2, 1, 64, dtype, softcap, window, atol=atol, rtol=atol)


@pytest.mark.parametrize("target", ["sm80", "sm90"])
def test_triton_gpu_tile_tables_at_head_dim_128(target):
    # D=128 has its own timed tiles (sm90: dK/dV loops over 32-query tiles, 4 warps).
    layout = PrefixGroupLayout(*GPU_TILE_LAYOUT, device=DEVICE)
    with gpu_tiles(target):
        check_kernel_against_dense(layout, 2, 1, 128, torch.bfloat16, 0.0, 0, atol=3e-2, rtol=3e-2)


def test_triton_path_positions_from_block_table():
    layout = PrefixGroupLayout(*LAYOUTS["ragged_many_groups"], device=DEVICE)
    positions = prefix_kernel._path_positions(layout.query_blocks(16), layout.total_tokens)
    assert torch.equal(positions.long(), layout.position_ids)


@pytest.mark.parametrize("softcap, window, match", [(-1.0, 0, "softcap"), (float("nan"), 0, "softcap"),
                                                    (0.0, -2, "window")])
def test_triton_kernel_rejects_bad_softcap_and_window(softcap, window, match):
    layout = PrefixGroupLayout([3], [[2]], device=DEVICE)
    q, k, v = make_inputs(layout, 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match=match):
        prefix_kernel.forward(q, k, v, layout.query_blocks(16), 0.25, softcap, window)


@pytest.mark.parametrize("target", ["sm80", "sm90"])
def test_triton_fp32_without_spill_free_tiles_is_refused_with_the_way_out(target):
    """GPU tables hold fp32 (3-pass TF32) entries only where every kernel compiles without spills;
    elsewhere the kernels refuse fp32 before launching anything, naming backend='torch'."""
    layout = PrefixGroupLayout([3], [[2]], device=DEVICE)
    q, k, v = make_inputs(layout, 2, 1, 256, torch.float32)
    with gpu_tiles(target), pytest.raises(TypeError, match="backend='torch'"):
        prefix_kernel.forward(q, k, v, layout.query_blocks(128), 0.25, 0.0, 0)
    assert prefix_kernel.unsupported_reason(torch.bfloat16, 256, q.device) is None


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_compiled_kernels_at_realistic_sizes(dtype, head_dim):
    layout = PrefixGroupLayout([1000, 77], [[300, 129, 1, 450], [64] * 8], device="cuda")
    q, k, v = make_inputs(layout, 8, 2, head_dim, dtype, device="cuda")
    grad_out = torch.randn_like(q)
    want = reference_and_grads(q, k, v, layout, grad_out)
    got = grouped_and_grads(q, k, v, layout, grad_out, backend="triton")
    plain = grouped_and_grads(q, k, v, layout, grad_out, backend="torch")
    for name, a, b, w in zip(("out", "dq", "dk", "dv"), got, plain, want):
        kernel_err = (a.double() - w).abs().max().item()
        plain_err = (b.double() - w).abs().max().item()
        bound = 2 * plain_err + torch.finfo(dtype).eps * w.abs().max().item()
        assert kernel_err <= bound, (name, kernel_err, plain_err)


@pytest.mark.gpu
def test_gpu_auto_backend_follows_the_inputs_and_compiles_to_the_eager_result(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    layout = PrefixGroupLayout([256], [[128] * 4], device="cuda")
    q, k, v = make_inputs(layout, 8, 2, 128, torch.bfloat16, device="cuda")
    # bf16 at D=128: the measured FLASH_OR_TRITON entry, else flash (its kernels take these inputs).
    chosen = resolve_backend("prefix_grouped_attention", "auto", q.device, dtype=q.dtype, head_dim=128)
    assert chosen == FLASH_OR_TRITON.get((tile_target(q.device), torch.bfloat16, 128), "flash")
    fn = torch.compile(lambda q, k, v: prefix_grouped_attention(q, k, v, layout), fullgraph=True)
    eager = prefix_grouped_attention(q, k, v, layout)
    # The compiled graph calls the same custom op with the same backend (flash and triton differ by
    # more than bf16's default tolerance here).
    torch.testing.assert_close(fn(q, k, v), eager)
    torch.testing.assert_close(eager, prefix_grouped_attention(q, k, v, layout, backend=chosen))
