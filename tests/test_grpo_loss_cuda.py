"""The CUDA backend of grpo_loss (csrc/grpo_loss, kernels/grpo_loss/cuda.py).

* Every run: the kernels' arithmetic and chunk/segment/fold walk (csrc/grpo_loss/grpo_math.h)
  compiled for the host with g++ and called through ctypes, against the float64 reference, forward
  partials and backward, on rows that span several 2,048-token chunks, empty rows, masks, every
  token formula and KL estimator, token and sequence level; backend selection and its errors.
* Every run: the advantages' arithmetic and group walk (same header) against
  ``reference.group_advantages``: groups of 2..64, consecutive and ragged in any order, every
  scaling, NaN rewards, identical rewards (exactly 0), rewards near 1e6.
* ``gpu``: ``grpo_loss(..., backend="cuda")`` against the float64 torch backend (loss, metrics,
  gradient), padded and packed, fp32 and bf16 log-probs, long rows, rewards normalised by the
  kernel; ``grpo_advantages(..., backend="cuda")`` against ``"torch"``; no host sync.
"""
import contextlib
import ctypes

import pytest
import torch
from cuda_host import build_host_check

from pyfastrl import grpo_advantages, grpo_loss
from pyfastrl.kernels import cuda_extension
from pyfastrl.kernels.grpo_loss import cuda as grpo_cuda
from pyfastrl.kernels.grpo_loss import reference
from pyfastrl.kernels.grpo_loss.reference import PARTIALS, LossOptions

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Row lengths: one row across two chunk boundaries, an empty row, a one-token row, rows sharing chunks.
ROW_LENGTHS = [1, 2500, 0, 700, 2100, 5, 64]
# (loss_type, sequence_level, delta, beta, kl_estimator, use_bias_correction_kl)
CASES = [
    ("dapo", False, None, 0.0, "k3", True),
    ("grpo", True, None, 0.04, "k3", True),
    ("dapo", False, 1.5, 0.1, "k3", False),
    ("cispo", False, None, 0.05, "k1", False),
    ("sapo", False, None, 0.02, "k2", True),
    ("vespo", False, None, 0.0, "k3", True),
    ("luspo", True, 1.3, 0.0, "k3", True),
]


class LossParams(ctypes.Structure):  # csrc/grpo_loss/grpo_math.h
    _fields_ = [("loss", ctypes.c_int), ("kl", ctypes.c_int), ("has_delta", ctypes.c_bool),
                ("kl_ratio", ctypes.c_bool), ("sequence_level", ctypes.c_bool)] + [
        (name, ctypes.c_float) for name in ("eps_low", "eps_high", "delta", "beta", "tau_pos", "tau_neg")]


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    handle = build_host_check("grpo_loss", tmp_path_factory)
    pointer, int64 = ctypes.c_size_t, ctypes.c_int64
    handle.pyfastrl_grpo_forward_host.argtypes = (
        [ctypes.c_int] + [pointer] * 7 + [int64] * 2 + [ctypes.POINTER(LossParams)] + [pointer] * 3)
    handle.pyfastrl_grpo_backward_host.argtypes = (
        [ctypes.c_int] + [pointer] * 8 + [int64] * 2 + [ctypes.POINTER(LossParams)] + [pointer] * 4)
    handle.pyfastrl_grpo_advantages_host.argtypes = [pointer] * 3 + [int64] * 3 + [ctypes.c_int, ctypes.c_double,
                                                                                    pointer]
    for function in (handle.pyfastrl_grpo_forward_host, handle.pyfastrl_grpo_backward_host,
                     handle.pyfastrl_grpo_advantages_host):
        function.restype = ctypes.c_char_p
    return handle


def options(case) -> LossOptions:
    loss_type, sequence_level, delta, beta, kl_estimator, kl_ratio = case
    eps_high = 4.0 if loss_type == "cispo" else 0.28  # cispo: epsilon_high is the cap itself
    return LossOptions(loss_type, sequence_level, 0.2, eps_high, delta, beta, kl_estimator, kl_ratio, 1.0, 1.05)


def loss_inputs(lengths, device="cpu", weighted=True, seed=0):
    """Flat float64 (logp, old, ref, weight, mask, cu_seqlens, advantages) as the op passes them."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    logp = -torch.rand(n, generator=gen, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)  # ratios on both sides of the clip
    ref = logp + 0.2 * torch.randn(n, generator=gen, dtype=torch.float64)
    weight = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64) if weighted else None
    mask = torch.rand(n, generator=gen) < 0.85
    cu = torch.tensor([0] + lengths).cumsum(0)
    row_adv = torch.randn(len(lengths), generator=gen, dtype=torch.float64)
    advantages = row_adv.repeat_interleave(torch.tensor(lengths))
    tensors = (logp, old, ref, weight, mask, cu, advantages)
    return tuple(None if t is None else t.to(device) for t in tensors)


def _params(opts) -> LossParams:
    return LossParams(*grpo_cuda._params(opts))


def host_forward(host, dtype, logp, old, ref, weight, mask, cu, advantages, opts):
    (num_rows, n), f32 = (cu.numel() - 1, logp.numel()), torch.float32
    logp_t = logp.to(dtype)
    inputs = [logp_t, old.to(f32), ref.to(f32), None if weight is None else weight.to(f32), mask.to(torch.uint8),
              advantages.to(f32), cu.to(torch.int64)]
    segments, row_log_ratio = grpo_cuda._workspace(n, num_rows, "cpu")
    partials = torch.full((num_rows, len(PARTIALS)), float("nan"))
    error = host.pyfastrl_grpo_forward_host(DTYPE_CODES[dtype], *(0 if t is None else t.data_ptr() for t in inputs),
                                            n, num_rows, ctypes.byref(_params(opts)), segments.data_ptr(),
                                            row_log_ratio.data_ptr(), partials.data_ptr())
    assert error is None, error.decode()
    return partials


def host_backward(host, dtype, row_grad, logp, old, ref, weight, mask, cu, advantages, opts):
    (num_rows, n), f32 = (cu.numel() - 1, logp.numel()), torch.float32
    inputs = [row_grad.to(f32), logp.to(dtype), old.to(f32), ref.to(f32), None if weight is None else weight.to(f32),
              mask.to(torch.uint8), advantages.to(f32), cu.to(torch.int64)]
    segments, row_log_ratio = grpo_cuda._workspace(n, num_rows, "cpu")
    row_via = torch.empty_like(row_log_ratio)
    dlogp = torch.full((n,), float("nan"), dtype=dtype)
    error = host.pyfastrl_grpo_backward_host(DTYPE_CODES[dtype], *(0 if t is None else t.data_ptr() for t in inputs),
                                             n, num_rows, ctypes.byref(_params(opts)), segments.data_ptr(),
                                             row_log_ratio.data_ptr(), row_via.data_ptr(), dlogp.data_ptr())
    assert error is None, error.decode()
    return dlogp


def _upcast(dtype, logp):
    """The log-probs the kernel actually reads, in float64 (bf16 inputs are rounded first)."""
    return logp.to(dtype).double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'seq' if c[1] else 'tok'}-kl{c[3]}")
def test_host_forward_partials_match_float64(host, case, dtype):
    opts = options(case)
    logp, old, ref, weight, mask, cu, advantages = loss_inputs(ROW_LENGTHS, weighted=case[0] != "sapo")
    got = host_forward(host, dtype, logp, old, ref, weight, mask, cu, advantages, opts)
    want = reference.loss_forward(_upcast(dtype, logp), old, ref, weight, mask, cu, advantages, opts)
    empty = torch.tensor(ROW_LENGTHS) == 0
    assert torch.equal(got[empty, :7], torch.zeros_like(got[empty, :7]))  # a row without tokens sums nothing
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'seq' if c[1] else 'tok'}-kl{c[3]}")
def test_host_backward_matches_float64(host, case, dtype):
    opts = options(case)
    logp, old, ref, weight, mask, cu, advantages = loss_inputs(ROW_LENGTHS, seed=1)
    row_grad = torch.randn(len(ROW_LENGTHS), dtype=torch.float64)
    got = host_backward(host, dtype, row_grad, logp, old, ref, weight, mask, cu, advantages, opts)
    want = reference.loss_backward(row_grad, _upcast(dtype, logp), old, ref, weight, mask, cu, advantages, opts)
    assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))  # masked tokens: exactly 0, never NaN
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.double(), want, **tolerance)


def test_host_rejects_unknown_dtype_code(host):
    logp, old, ref, weight, mask, cu, advantages = loss_inputs([3, 4])
    segments, row_log_ratio = grpo_cuda._workspace(7, 2, "cpu")
    partials = torch.empty(2, len(PARTIALS))
    error = host.pyfastrl_grpo_forward_host(
        7, *(t.float().data_ptr() if t.is_floating_point() else t.data_ptr() for t in
             (logp, old, ref, weight, mask, cu, advantages)), 7, 2, ctypes.byref(_params(options(CASES[0]))),
        segments.data_ptr(), row_log_ratio.data_ptr(), partials.data_ptr())
    assert "unknown dtype code 7" in error.decode()


# -- advantages on the host ------------------------------------------------------------------------------
def host_advantages(host, rewards, scale, group_size=None, group_index=None, eps=1e-4):
    """The kernels' advantages ``(B,)`` float64 of float64 ``rewards``, as grpo_cuda.group_advantages
    lays the groups out."""
    num_groups = rewards.numel() // group_size if group_size else int(group_index.max()) + 1
    order, offsets = (None, None) if group_size else grpo_cuda.group_order(group_index, num_groups)
    out = torch.full_like(rewards, float("nan"))
    error = host.pyfastrl_grpo_advantages_host(
        rewards.data_ptr(), 0 if order is None else order.data_ptr(), 0 if offsets is None else offsets.data_ptr(),
        group_size or 0, rewards.numel(), num_groups, reference.ADVANTAGE_SCALES.index(scale), eps, out.data_ptr())
    assert error is None, error.decode()
    return out, num_groups


def _grouped_rewards(sizes, seed):
    """Float64 rewards in groups of ``sizes``, shuffled (group labels (B,) int64): one group of
    identical rewards, NaNs (unscorable), a group with one scorable reward, one with none."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    rewards = torch.randn(labels.numel(), generator=gen, dtype=torch.float64)
    rewards[labels == 0] = 0.7
    rewards[torch.rand(labels.numel(), generator=gen) < 0.1] = float("nan")
    rewards[labels == 1] = float("nan")
    rewards[(labels == 2).nonzero()[1:, 0]] = float("nan")
    shuffle = torch.randperm(labels.numel(), generator=gen)
    return rewards[shuffle], labels[shuffle]


@pytest.mark.parametrize("scale", reference.ADVANTAGE_SCALES)
def test_host_advantages_of_ragged_groups_match_float64(host, scale):
    sizes = [5, 3, 4, 2, 64, 17, 2, 33, 9]
    rewards, labels = _grouped_rewards(sizes, seed=0)
    got, num_groups = host_advantages(host, rewards, scale, group_index=labels)
    want = reference.group_advantages(rewards, labels, num_groups, scale, 1e-4)
    assert torch.equal(got[labels == 0], torch.zeros(sizes[0], dtype=torch.float64))  # identical: exactly 0
    assert torch.equal(got[torch.isnan(rewards)], torch.zeros_like(got[torch.isnan(rewards)]))
    assert torch.equal(got[labels == 2], torch.zeros(sizes[2], dtype=torch.float64))  # one scorable: 0
    assert got.abs().max() > 0.5  # the other groups are normalised, not zeroed
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("group_size", [2, 7, 64])
@pytest.mark.parametrize("scale", reference.ADVANTAGE_SCALES)
def test_host_advantages_of_consecutive_groups_near_1e6_match_float64(host, group_size, scale):
    gen = torch.Generator().manual_seed(group_size)
    rewards = 1e6 + 1e-3 * torch.randn(6 * group_size, generator=gen, dtype=torch.float64)
    rewards[:group_size] = 1e6 + 0.1  # identical rewards, far from 0
    got, num_groups = host_advantages(host, rewards, scale, group_size=group_size)
    want = reference.group_advantages(rewards, torch.arange(rewards.numel()) // group_size, num_groups, scale, 1e-4)
    assert torch.equal(got[:group_size], torch.zeros(group_size, dtype=torch.float64))
    # r - max is exact here (Sterbenz), so only the sums' rounding order may differ.
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    if scale == "group":  # 1e-3 deviations over std ~1e-3 + eps: unit-scale advantages
        assert 0.5 < got[group_size:].abs().max() < 10


@pytest.fixture
def host_binding(host, monkeypatch):
    """The extension's ``grpo_advantages`` binding replaced by the host build (CPU tensors)."""
    def launch(rewards, order, offsets, group_size, num_rewards, num_groups, scale_code, eps, batch_stats, out,
               stream):
        error = host.pyfastrl_grpo_advantages_host(rewards, order, offsets, group_size, num_rewards, num_groups,
                                                   scale_code, eps, out)
        assert error is None, error.decode()

    monkeypatch.setattr(grpo_cuda.cuda_extension, "module", lambda: type("Host", (), {"grpo_advantages": launch}))
    monkeypatch.setattr(grpo_cuda.cuda_extension, "device_unavailable_reason", lambda device: None)
    monkeypatch.setattr(grpo_cuda, "_launching_on", lambda device: contextlib.nullcontext(0))


@pytest.mark.parametrize("scale", reference.ADVANTAGE_SCALES)
def test_cuda_advantages_wrapper_on_the_host_build(host_binding, scale):
    """grpo_advantages(backend="cuda") through kernels/grpo_loss/cuda.py (dtype conversion, ragged
    group order and offsets, scale code), with the binding replaced by the host build."""
    rewards, labels = _grouped_rewards([4, 6, 3, 9, 2, 6], seed=4)  # 30 rewards
    for kwargs, values in ((dict(group_ids=100 - 7 * labels), rewards.float()), (dict(group_size=3), rewards)):
        want = grpo_advantages(values, scale_rewards=scale, backend="torch", **kwargs)
        got = grpo_advantages(values, scale_rewards=scale, backend="cuda", **kwargs)
        assert got.dtype == values.dtype and got.abs().max() > 0.5
        torch.testing.assert_close(got, want, rtol=1e-9 if values.dtype == torch.float64 else 1.3e-6, atol=1e-12)


def test_cuda_advantages_custom_op_and_compile(host_binding):
    """The CUDA advantages are one custom op (``pyfastrl::grpo_advantages_cuda``): opcheck passes and
    ``torch.compile(fullgraph=True)`` traces grpo_advantages(backend="cuda") without a graph break."""
    from pyfastrl.ops.grpo_advantages import _cuda_advantages_op

    rewards, labels = _grouped_rewards([4, 6, 3, 9, 2, 6], seed=5)
    order = torch.unique(labels, return_inverse=True)[1]
    torch.library.opcheck(_cuda_advantages_op, (rewards, order, 0, 6, "group", 1e-4))
    torch.library.opcheck(_cuda_advantages_op, (rewards, None, 3, 10, "batch", 1e-4))

    def fn(r):
        return grpo_advantages(r, group_size=3, scale_rewards="group", backend="cuda")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(rewards), grpo_advantages(rewards, group_size=3, backend="torch"),
                               rtol=1e-9, atol=1e-12)

def test_advantages_launcher_rejects_bad_sizes_and_scale_codes_before_launching():
    module = grpo_cuda.cuda_extension.module()
    if module is None:
        pytest.skip("the CUDA extension is not built")
    for group_size, scale in ((3, 0), (2, 3)):  # 3 does not divide 4 rewards; no scale code 3
        with pytest.raises(ValueError, match="grpo advantages: need"):
            module.grpo_advantages(0, 0, 0, group_size, 4, 2, scale, 1e-4, 0, 0, 0)

# -- backend selection ---------------------------------------------------------------------------------
def test_cuda_backend_is_refused_with_the_reason_where_it_cannot_run():
    logp = -torch.rand(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: (the CUDA extension is|its kernels "
                                           "need CUDA tensors)"):
        grpo_loss(logp, mask, advantages=torch.randn(2), backend="cuda")


def test_ops_without_a_cuda_backend_say_so():
    from pyfastrl import PrefixGroupLayout, prefix_grouped_attention

    layout = PrefixGroupLayout([3], [[2, 2]])
    q = torch.randn(layout.total_tokens, 2, 8)
    with pytest.raises(ValueError, match="has no 'cuda' backend"):
        prefix_grouped_attention(q, q, q, layout, backend="cuda")


def test_cuda_backend_refuses_float64_naming_torch():
    # An argument error, so it comes before the device check: the same message on any machine.
    logp = -torch.rand(2, 5, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match="backend 'cuda' supports .* use backend='torch'"):
        grpo_loss(logp, mask, advantages=torch.randn(2, dtype=torch.float64), backend="cuda")


def test_grpo_advantages_backends_are_checked():
    rewards = torch.randn(4)
    with pytest.raises(ValueError, match="backend must be one of"):
        grpo_advantages(rewards, group_size=2, backend="triton")
    with pytest.raises(RuntimeError, match="grpo_advantages: backend 'cuda' is not available"):
        grpo_advantages(rewards, group_size=2, backend="cuda")
    with pytest.raises(ValueError, match="do not split into groups"):  # argument errors first, on any machine
        grpo_advantages(rewards, group_size=3, backend="cuda")
    logp, mask = -torch.rand(4, 5), torch.ones(4, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="grpo_loss: backend 'cuda' is not available"):
        grpo_loss(logp, mask, rewards=rewards, group_size=2, backend="cuda")

# -- on a GPU, with the extension built ------------------------------------------------------------------
def _needs_extension():
    reason = cuda_extension.device_unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(f"CUDA backend: {reason}")


def _old_and_ref(logp):
    """Behaviour and reference log-probs near ``logp``, rounded to its dtype: pass ``.double()`` of
    them to the float64 run, so both backends see the same values."""
    old = (logp.double() + 0.3 * torch.randn_like(logp, dtype=torch.float64)).to(logp.dtype)
    ref = (logp.double() + 0.2 * torch.randn_like(logp, dtype=torch.float64)).to(logp.dtype)
    return old, ref


def _call(logp, mask, backend, case, old, ref, **extra):
    loss_type, sequence_level, delta, beta, kl_estimator, kl_ratio = case
    old, ref = old.to(logp.dtype), ref.to(logp.dtype)
    return grpo_loss(logp, mask, old_per_token_logps=old, ref_per_token_logps=ref, loss_type=loss_type,
                     importance_sampling_level="sequence" if sequence_level else "token", delta=delta, beta=beta,
                     kl_estimator=kl_estimator, use_bias_correction_kl=kl_ratio, backend=backend,
                     max_completion_length=logp.shape[-1], **extra)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "vespo"], ids=lambda c: f"{c[0]}-{c[1]}-{c[3]}")
def test_gpu_cuda_backend_matches_float64(case, dtype):
    _needs_extension()
    torch.manual_seed(0)
    rows, width = 12, 3000  # rows of 3,000 padded tokens: each spans two or three chunks
    logp = (-torch.rand(rows, width, device="cuda", dtype=torch.float64) * 3).to(dtype)
    mask = torch.rand(rows, width, device="cuda") < 0.8
    mask[3] = False  # a fully masked row
    advantages = torch.randn(rows, device="cuda")
    old, ref = _old_and_ref(logp)
    results = {}
    for backend, inputs in (("cuda", logp), ("torch", logp.double())):
        leaf = inputs.clone().requires_grad_()
        loss, metrics = _call(leaf, mask, backend, case, old, ref, advantages=advantages.to(leaf.dtype))
        loss.backward()
        results[backend] = (loss, metrics, leaf.grad)
    (loss, metrics, grad), (want_loss, want_metrics, want_grad) = results["cuda"], results["torch"]
    assert torch.isfinite(grad).all() and torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    tolerance = dict(rtol=2e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(loss.double(), want_loss, **tolerance)
    torch.testing.assert_close(grad.double(), want_grad, **tolerance)
    assert metrics.keys() == want_metrics.keys()
    for name in metrics:
        torch.testing.assert_close(metrics[name].double(), want_metrics[name].double(), rtol=1e-3, atol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.gpu
def test_gpu_cuda_backend_packed_long_rows_and_no_sync():
    _needs_extension()
    torch.manual_seed(0)
    lengths = [300_000, 1, 0, 4096, 777]  # one row over 147 chunks; an empty row
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0)
    n = sum(lengths)
    logp = (-torch.rand(n, device="cuda") * 3).to(torch.bfloat16)
    mask = torch.rand(n, device="cuda") < 0.9
    advantages = torch.randn(len(lengths), device="cuda")
    old, ref = _old_and_ref(logp)
    want = None
    for backend in ("torch", "cuda"):
        leaf = (logp.double() if backend == "torch" else logp).clone().requires_grad_()
        if backend == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss, metrics = _call(leaf, mask, backend, CASES[1], old, ref, advantages=advantages.to(leaf.dtype),
                                  cu_seqlens=cu)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if want is None:
            want = (loss, leaf.grad)
    torch.testing.assert_close(loss.double(), want[0], rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(leaf.grad.double(), want[1], rtol=2e-2, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("scale", reference.ADVANTAGE_SCALES)
def test_gpu_cuda_advantages_match_torch_without_sync(scale):
    _needs_extension()
    rewards, labels = _grouped_rewards([5, 3, 4, 2, 64, 17, 2, 33, 9], seed=3)
    rewards, labels = rewards.cuda(), labels.cuda()
    consecutive = 1e6 + 1e-3 * torch.randn(64 * 16, device="cuda", dtype=torch.float64)
    consecutive[:16] = 3.0
    for kwargs, values in ((dict(group_ids=labels), rewards), (dict(group_size=16), consecutive),
                           (dict(group_size=16), (1e3 * (consecutive - 1e6)).float())):
        want = grpo_advantages(values, scale_rewards=scale, backend="torch", **kwargs)
        torch.cuda.synchronize()
        if "group_size" in kwargs:  # group_ids are numbered with torch.unique, which syncs
            torch.cuda.set_sync_debug_mode("error")
        try:
            got = grpo_advantages(values, scale_rewards=scale, backend="cuda", **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert got.dtype == values.dtype
        # float64 sums in another order, then (float32 rewards) one rounding that may land an ulp apart.
        tolerance = dict(rtol=1e-9, atol=1e-12) if values.dtype == torch.float64 else {}
        torch.testing.assert_close(got, want, **tolerance)
    assert torch.equal(got[:16], torch.zeros_like(got[:16]))  # identical rewards: exactly 0


@pytest.mark.gpu
@pytest.mark.parametrize("scale", reference.ADVANTAGE_SCALES)
def test_gpu_cuda_backend_normalises_rewards_on_the_device(scale):
    _needs_extension()
    torch.manual_seed(0)
    rows, width = 16, 700
    logp = (-torch.rand(rows, width, device="cuda") * 3)
    mask = torch.rand(rows, width, device="cuda") < 0.8
    rewards = torch.randint(0, 3, (rows,), device="cuda").float()
    rewards[:4] = 1.0  # a group of identical rewards
    old, ref = _old_and_ref(logp)
    results = {}
    for backend, inputs in (("torch", logp.double()), ("cuda", logp)):
        leaf = inputs.clone().requires_grad_()
        torch.cuda.synchronize()
        if backend == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss, metrics = _call(leaf, mask, backend, CASES[0], old, ref, rewards=rewards.to(leaf.dtype),
                                  group_size=4, scale_rewards=scale)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results[backend] = (loss, metrics, leaf.grad)
    (loss, metrics, grad), (want_loss, want_metrics, want_grad) = results["cuda"], results["torch"]
    assert torch.equal(grad[:4], torch.zeros_like(grad[:4]))  # advantage exactly 0, no KL term (beta 0)
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=2e-4, atol=1e-6)
    for name in metrics:
        torch.testing.assert_close(metrics[name].double(), want_metrics[name].double(), rtol=1e-3, atol=1e-4)
