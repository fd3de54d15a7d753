"""LM-head-fused GRPO ops (``fused_linear_grpo_loss``, ``selective_logprobs``): both backends against
the float64 reference (materialised logits, then TRL 1.16's loss, autograd). Triton runs through
TRITON_INTERPRET=1 without CUDA."""
import itertools
import weakref

import pytest
import torch

from conftest import DEVICE
from grpo_testing import (
    BACKENDS,
    LOSS_TYPES,
    SyncCounter,
    check_metrics,
    close,
    dtype_of,
    lm_data,
    loss_options,
    tol_of,
)
from pyfastrl import fused_linear_grpo_loss, selective_logprobs
from pyfastrl.kernels.grpo_loss.reference import naive_grpo_loss, naive_importance_sampling_ratio, naive_token_logprobs
from pyfastrl.kernels.launch_target import gpu_tiles


def _fused_vs_naive(backend, opts, temperature, chunk_size=7, extra=None, **data):
    """The fused op against the reference. ``extra(logp, entropy, old, mask, adv)`` -> (op kwargs,
    reference kwargs) adds inputs that depend on the data (and may replace ``advantages``)."""
    h, w, b, targets, mask, adv, old, ref = lm_data(temperature=temperature, **data)
    dtype = dtype_of(backend)
    ref_leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    logp, entropy = naive_token_logprobs(ref_leaves[0], ref_leaves[1], targets, ref_leaves[2], temperature)
    op_extra, ref_extra = extra(logp.detach(), entropy.detach(), old, mask, adv) if extra else ({}, {})
    op_extra = {k: v.to(DEVICE, dtype) if isinstance(v, torch.Tensor) else v for k, v in op_extra.items()}
    leaves = [t.to(DEVICE, dtype).clone().requires_grad_() for t in (h, w, b)]
    loss, metrics = fused_linear_grpo_loss(
        *leaves[:2], targets.to(DEVICE), mask.to(DEVICE), bias=leaves[2], temperature=temperature,
        chunk_size=chunk_size, advantages=op_extra.pop("advantages", adv.to(DEVICE, dtype)),
        old_per_token_logps=old.to(DEVICE, dtype), ref_per_token_logps=ref.to(DEVICE, dtype), backend=backend,
        **op_extra, **opts)
    loss.backward()
    expected, expected_metrics = naive_grpo_loss(logp, mask, ref_extra.pop("advantages", adv), old, ref,
                                                 entropies=entropy.detach(), **ref_extra, **opts)
    expected.backward()
    tol = tol_of(backend)
    close(loss, expected, tol, "loss")
    for name, leaf, ref_leaf in zip(("hidden", "weight", "bias"), leaves, ref_leaves):
        assert ref_leaf.grad.abs().sum() > 0
        close(leaf.grad, ref_leaf.grad, tol, f"d{name}")
    check_metrics(metrics, expected_metrics, tol)
    return loss, [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type, level, beta, delta, temperature", list(itertools.product(
    LOSS_TYPES, ("token", "sequence"), (0.0, 0.04), (None, 1.5), (0.7, 1.0))))
def test_fused_linear_matches_reference(backend, loss_type, level, beta, delta, temperature):
    _fused_vs_naive(backend, loss_options(loss_type, level, beta, delta), temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["dapo", "vespo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_linear_masks_importance_sampling_and_token_advantages(backend, loss_type, level):
    # Off-policy mask, entropy mask (on the op's own entropies), the vLLM ratio computed from the
    # engine's log-probs, and per-token advantages, all at once.
    g = torch.Generator().manual_seed(11)
    mode, clips = "token_truncate", dict(vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=2.0)

    def extra(logp, entropy, old, mask, adv):
        sampling = logp + 0.4 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
        ratio = naive_importance_sampling_ratio(old, sampling, mask, mode, 0.5, 2.0)
        token_adv = adv[:, None] + 0.3 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
        return (dict(sampling_per_token_logps=sampling, vllm_importance_sampling_mode=mode, advantages=token_adv,
                     **clips),
                dict(sampling_per_token_logps=sampling, importance_sampling_ratio=ratio, advantages=token_adv))

    opts = loss_options(loss_type, level, 0.04, None, off_policy_mask_threshold=0.05, top_entropy_quantile=0.5)
    _fused_vs_naive(backend, opts, 1.0, extra=extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_linear_on_policy_without_old_logprobs(backend, level):
    # old = logp.detach(): ratio 1 everywhere, loss -mean(A) per token, gradient -A * dlogp.
    h, w, b, targets, mask, adv, _, _ = lm_data()
    dtype = dtype_of(backend)
    x = h.to(DEVICE, dtype).clone().requires_grad_()
    loss, metrics = fused_linear_grpo_loss(x, w.to(DEVICE, dtype), targets.to(DEVICE), mask.to(DEVICE),
                                           advantages=adv.to(DEVICE, dtype), importance_sampling_level=level,
                                           chunk_size=5, backend=backend)
    loss.backward()
    y = h.clone().requires_grad_()
    logp, _ = naive_token_logprobs(y, w, targets)
    expected, _ = naive_grpo_loss(logp, mask, adv, importance_sampling_level=level)
    expected.backward()
    close(loss, expected, tol_of(backend), "loss")
    close(x.grad, y.grad, tol_of(backend), "dhidden")
    assert metrics["ratio_min"] == 1 and metrics["ratio_max"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_linear_chunk_size_invariance(backend, level):
    # Each chunking is checked against the reference (within tolerance; never bitwise).
    opts = loss_options("grpo", level, 0.04, 1.5)
    results = [_fused_vs_naive(backend, opts, 1.0, chunk_size=c) for c in (1, 5, 1000)]
    for loss, grads in results[1:]:
        close(loss, results[0][0], tol_of(backend), "loss across chunk sizes")
        for grad, first in zip(grads, results[0][1]):
            close(grad, first, tol_of(backend), "gradient across chunk sizes")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_linear_packed_equals_padded(backend, level):
    h, w, b, targets, mask, adv, old, ref = (t.to(DEVICE) for t in lm_data())
    dtype = dtype_of(backend)
    h, w, b, adv, old, ref = (t.to(dtype) for t in (h, w, b, adv, old, ref))
    opts = dict(loss_options("dr_grpo", level, 0.04, None), backend=backend, temperature=0.7, advantages=adv)
    padded_h, padded_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    padded, padded_metrics = fused_linear_grpo_loss(padded_h, padded_w, targets, mask, old_per_token_logps=old,
                                                    ref_per_token_logps=ref, **opts)
    padded.backward()
    # Packed: every row's first tokens up to its last valid one, masked tokens inside kept as masked.
    lengths = torch.where(mask.any(1), mask.int().cumsum(1).argmax(1) + 1, 0)
    keep = torch.arange(mask.shape[1], device=DEVICE) < lengths[:, None]
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    packed_h = h[keep].clone().requires_grad_()
    packed_w = w.clone().requires_grad_()
    packed, packed_metrics = fused_linear_grpo_loss(packed_h, packed_w, targets[keep], mask[keep], cu_seqlens=cu,
                                                    old_per_token_logps=old[keep], ref_per_token_logps=ref[keep],
                                                    **opts)
    packed.backward()
    tol = tol_of(backend)
    close(packed, padded, tol, "loss")
    close(packed_h.grad, padded_h.grad[keep], tol, "dhidden")
    assert torch.equal(padded_h.grad[~keep], torch.zeros_like(padded_h.grad[~keep]))
    close(packed_w.grad, padded_w.grad, tol, "dweight")
    check_metrics(packed_metrics, padded_metrics, tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_micro_batches_sum_to_full_batch(backend):
    h, w, b, targets, mask, adv, old, ref = (t.to(DEVICE) for t in lm_data(rows=6))
    dtype = dtype_of(backend)
    h, w, adv, old = (t.to(dtype) for t in (h, w, adv, old))
    full_w = w.clone().requires_grad_()
    full, _ = fused_linear_grpo_loss(h, full_w, targets, mask, advantages=adv, old_per_token_logps=old,
                                     backend=backend)
    full.backward()
    parts_w = w.clone().requires_grad_()
    total = int(mask.sum())
    for rows in (slice(0, 4), slice(4, 6)):
        part, _ = fused_linear_grpo_loss(h[rows], parts_w, targets[rows], mask[rows], advantages=adv[rows],
                                         old_per_token_logps=old[rows], num_items_in_batch=total, backend=backend)
        part.backward()
    close(parts_w.grad, full_w.grad, tol_of(backend), "accumulated dweight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_frozen_head_and_no_grad(backend):
    h, w, b, targets, mask, adv, old, _ = (t.to(DEVICE) for t in lm_data())
    dtype = dtype_of(backend)
    h, w, adv, old = (t.to(dtype) for t in (h, w, adv, old))
    x = h.clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(x, w, targets, mask, advantages=adv, old_per_token_logps=old, backend=backend)
    loss.backward()  # weight frozen (LoRA-style): only dh is computed
    y = h.clone().requires_grad_()
    both_w = w.clone().requires_grad_()
    expected, _ = fused_linear_grpo_loss(y, both_w, targets, mask, advantages=adv, old_per_token_logps=old,
                                         backend=backend)
    expected.backward()
    close(x.grad, y.grad, 1e-12, "dh with a frozen head")
    with torch.no_grad():
        value, _ = fused_linear_grpo_loss(y, both_w, targets, mask, advantages=adv, old_per_token_logps=old,
                                          backend=backend)
    assert not value.requires_grad
    close(value, expected, 1e-12, "loss under no_grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_linear_logits_exist_one_chunk_at_a_time(backend, level, monkeypatch):
    # Every logits tensor the op creates is one chunk (<= chunk_size rows of the valid tokens),
    # and each is released before the next is made.
    from pyfastrl.ops import fused_linear_grpo_loss as op_module

    made, earlier, original = [], [], op_module._chunk_logits

    def recording(hidden_chunk, weight, bias):
        logits = original(hidden_chunk, weight, bias)
        made.append((logits.shape, sum(ref() is not None for ref in earlier)))  # earlier chunks still alive
        earlier.append(weakref.ref(logits))
        return logits

    monkeypatch.setattr(op_module, "_chunk_logits", recording)
    h, w, b, targets, mask, adv, old, _ = (t.to(DEVICE) for t in lm_data(rows=6, length=13))
    dtype = dtype_of(backend)
    fused_linear_grpo_loss(h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), targets, mask,
                           advantages=adv.to(dtype), old_per_token_logps=old.to(dtype), chunk_size=10,
                           importance_sampling_level=level, backend=backend)
    valid = int(mask.sum())
    passes = 2 if level == "sequence" else 1
    assert len(made) == passes * -(-valid // 10)
    assert all(shape[0] <= 10 and shape[1] == w.shape[0] for shape, _ in made)
    assert all(previous_alive == 0 for _, previous_alive in made)


def test_fused_linear_gradcheck_float64():
    # A smooth configuration (no clip kinks) so finite differences are meaningful.
    h, w, b, targets, mask, adv, old, ref = lm_data(rows=2, length=4, hidden=3, vocab=7)
    opts = dict(advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref, epsilon=0.99, epsilon_high=100.0,
                beta=0.1, loss_type="grpo", importance_sampling_level="sequence", temperature=0.7, chunk_size=3,
                backend="torch")

    def fn(hidden, weight, bias):
        return fused_linear_grpo_loss(hidden, weight, targets, mask, bias=bias, **opts)[0]

    assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in (h, w, b)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_everything_masked(backend):
    h, w, b, targets, mask, adv, old, _ = (t.to(DEVICE) for t in lm_data())
    dtype = dtype_of(backend)
    x, wx = h.to(dtype).clone().requires_grad_(), w.to(dtype).clone().requires_grad_()
    loss, metrics = fused_linear_grpo_loss(x, wx, targets, torch.zeros_like(mask), advantages=adv.to(dtype),
                                           num_items_in_batch=torch.tensor(0), backend=backend)
    loss.backward()
    assert loss.item() == 0 and all(torch.isfinite(v) for k, v in metrics.items() if not k.endswith(("_min", "_max")))
    assert torch.equal(x.grad, torch.zeros_like(x.grad)) and torch.equal(wx.grad, torch.zeros_like(wx.grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_more_than_65535_tokens(backend):
    # Packed tokens on grid axis 0 (limit 2**31 - 1): 70,000 tokens in one chunk and in several.
    g = torch.Generator().manual_seed(5)
    num_tokens, vocab = 70_000, 20
    dtype = dtype_of(backend)
    h = torch.randn(num_tokens, 16, generator=g, dtype=torch.float64)
    w = 0.3 * torch.randn(vocab, 16, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (num_tokens,), generator=g)
    cu = torch.tensor([0, 30_000, num_tokens])
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64)
    x = h.to(DEVICE, dtype).clone().requires_grad_()
    loss, metrics = fused_linear_grpo_loss(x, w.to(DEVICE, dtype), targets.to(DEVICE), None, cu_seqlens=cu.to(DEVICE),
                                           advantages=adv.to(DEVICE, dtype), chunk_size=40_000, backend=backend)
    loss.backward()
    y = h.clone().requires_grad_()
    logp, entropy = naive_token_logprobs(y, w, targets)
    # dapo sums token losses over the whole batch, so the reference can run row by row.
    expected = sum(
        naive_grpo_loss(logp[start:end][None], torch.ones(1, end - start), adv[row:row + 1],
                        num_items_in_batch=num_tokens)[0]
        for row, (start, end) in enumerate([(0, 30_000), (30_000, num_tokens)])
    )
    expected.backward()
    close(loss, expected, tol_of(backend), "loss")
    close(x.grad, y.grad, tol_of(backend), "dhidden")
    close(metrics["entropy"], entropy.mean(), tol_of(backend), "entropy")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_logits_kernel_with_gpu_tiles(level):
    # The GPU's logits tiles (one token per program, vocab tiles of 4096): through the interpreter
    # without CUDA, compiled on a GPU. V = 8,300 spans three vocab tiles, the last one partial.
    h, w, b, targets, mask, adv, old, ref = lm_data(rows=2, length=3, hidden=8, vocab=8_300, seed=2)
    opts = loss_options("dapo", level, 0.04, 1.5)
    leaves = [t.to(DEVICE, torch.float32).clone().requires_grad_() for t in (h, w, b)]
    with gpu_tiles("sm90"):
        loss, metrics = fused_linear_grpo_loss(
            *leaves[:2], targets.to(DEVICE), mask.to(DEVICE), bias=leaves[2], temperature=0.7,
            advantages=adv.to(DEVICE, torch.float32), old_per_token_logps=old.to(DEVICE, torch.float32),
            ref_per_token_logps=ref.to(DEVICE, torch.float32), backend="triton", **opts)
        loss.backward()
        logp = selective_logprobs(*(t.detach() for t in leaves[:2]), targets.to(DEVICE), bias=leaves[2].detach(),
                                  temperature=0.7, backend="triton")
    ref_leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    expected_logp, entropy = naive_token_logprobs(*ref_leaves[:2], targets, ref_leaves[2], 0.7)
    expected, expected_metrics = naive_grpo_loss(expected_logp, mask, adv, old, ref, entropies=entropy.detach(), **opts)
    expected.backward()
    close(loss, expected, 2e-5, "loss")
    for name, leaf, ref_leaf in zip(("hidden", "weight", "bias"), leaves, ref_leaves):
        close(leaf.grad, ref_leaf.grad, 2e-5, f"d{name}")
    check_metrics(metrics, expected_metrics, 2e-5)
    close(logp, expected_logp, 2e-5, "selective logprobs")


def test_launch_tables():
    # What a GPU launches for a 1M-token chunk: one program per token, all on axis 0 (limit
    # 2**31 - 1; Liger's per-token kernel failed past 65,535 tokens on a limited axis).
    from pyfastrl.kernels.grpo_loss import kernel

    for target in ("sm80", "sm90"):
        grid, block_t, block_v, _ = kernel.logits_launch(1_000_000, target)
        assert grid == (1_000_000,) and block_t == 1 and block_v >= 1024
        assert kernel.row_block(10, 1, target) == 1024
    assert kernel.row_block(37 * 5, 5, "interpreter") == 16


@pytest.mark.parametrize("sequence_level", [False, True])
def test_fused_and_selective_custom_ops_pass_opcheck(sequence_level):
    from pyfastrl.ops.fused_linear_grpo_loss import _fused_op, _selective_op

    h, w, b, targets, _, adv, old, ref = lm_data()
    tokens = 30
    h = h.reshape(-1, h.shape[-1])[:tokens].float().requires_grad_()
    w, b = w.float().requires_grad_(), b.float().requires_grad_()
    targets, old, ref = targets.reshape(-1)[:tokens], old.reshape(-1)[:tokens].float(), ref.reshape(-1)[:tokens].float()
    cu = torch.tensor([0, 10, 25, tokens], dtype=torch.int32)
    token_adv = adv[:3].float().repeat_interleave(torch.tensor([10, 15, 5]))
    args = (h, w, b, targets, old, ref, old - 0.1, torch.rand(tokens), None, cu, token_adv, adv[:3].float(),
            torch.full((3,), 0.03), 1 / 0.7, 7, True, True, True, "grpo", sequence_level, 0.2, 0.28, 1.5, 0.04, "k3",
            True, 1.0, 1.05, 0.1, 0.5, 2.0, 3.0, 3.0, 2.0, "torch")
    torch.library.opcheck(_fused_op, args)
    torch.library.opcheck(_selective_op, (h.detach(), w.detach(), None, targets, 1.0, 7, "torch"))


def test_fused_linear_makes_one_host_sync(monkeypatch):
    # Finding the valid tokens is the one sync; validate=True adds its checks to it.
    h, w, b, targets, mask, adv, old, ref = lm_data()
    x = h.clone().requires_grad_()
    counter = SyncCounter(monkeypatch)
    for validate in (False, True):
        counter.count = 0
        loss, _ = fused_linear_grpo_loss(x, w, targets, mask, advantages=adv, old_per_token_logps=old,
                                         ref_per_token_logps=ref, beta=0.04, validate=validate, backend="torch",
                                         off_policy_mask_threshold=0.1, importance_sampling_level="sequence")
        loss.backward()
        assert counter.count == 1, validate
    counter.count = 0
    selective_logprobs(h, w, targets, backend="torch")
    assert counter.count == 0


# ----------------------------------------------------------------------------- selective_logprobs


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_logprobs_matches_reference(backend):
    h, w, b, targets, *_ = lm_data()
    dtype = dtype_of(backend)
    hidden = h.to(DEVICE, dtype).clone().requires_grad_()
    expected_logp, expected_entropy = naive_token_logprobs(h, w, targets, b, 0.7)
    for chunk_size in (5, None):  # each chunking against the reference, never against each other bitwise
        logp, entropy = selective_logprobs(hidden, w.to(DEVICE, dtype), targets.to(DEVICE), bias=b.to(DEVICE, dtype),
                                           temperature=0.7, return_entropy=True, chunk_size=chunk_size,
                                           backend=backend)
        assert logp.shape == targets.shape and not logp.requires_grad
        close(logp, expected_logp, tol_of(backend), "logprobs")
        close(entropy, expected_entropy, tol_of(backend), "entropy")
        only = selective_logprobs(hidden, w.to(DEVICE, dtype), targets.to(DEVICE), bias=b.to(DEVICE, dtype),
                                  temperature=0.7, chunk_size=chunk_size, backend=backend)
        assert torch.equal(only, logp)  # the same computation, with and without entropies returned


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_logprobs_low_precision_triton(dtype):
    # Logits are rounded to the weight dtype (as the model's LM head does); all else is fp32.
    h, w, b, targets, *_ = lm_data(vocab=300)
    h, w = h.to(DEVICE, dtype), w.to(DEVICE, dtype)
    logp, entropy = selective_logprobs(h, w, targets.to(DEVICE), return_entropy=True, backend="triton")
    expected_logp, expected_entropy = naive_token_logprobs(h.float(), w.float(), targets.to(DEVICE))
    close(logp, expected_logp, 2e-2, "logprobs")
    close(entropy, expected_entropy, 2e-2, "entropy")
    reference_path, _ = naive_token_logprobs(h, w, targets.to(DEVICE))  # same rounding of the logits
    close(logp, reference_path, 1e-5, "logprobs vs the unfused path")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("cu, match", [
    ([0, 5, 3, 10], "non-decreasing"),
    ([0, 5, 9], "end at the number of tokens"),
    ([1, 5, 10], "start at 0"),
])
def test_bad_cu_seqlens_when_validating(cu, match):
    with pytest.raises(ValueError, match=match):
        fused_linear_grpo_loss(torch.zeros(10, 4), torch.zeros(6, 4), torch.zeros(10, dtype=torch.long), None,
                               cu_seqlens=torch.tensor(cu), advantages=torch.zeros(len(cu) - 1), validate=True)


@pytest.mark.parametrize("change, error, match", [
    (dict(targets=torch.full((2, 3), 6)), ValueError, r"holds 6, outside the vocabulary \[0, 6\)"),
    (dict(targets=torch.full((2, 3), -1)), ValueError, "holds -1"),
    (dict(targets=torch.zeros(2, 3)), TypeError, "target_ids has dtype"),
    (dict(weight=torch.zeros(6, 5)), ValueError, "hidden size H"),
    (dict(weight=torch.zeros(6, 4, dtype=torch.float64)), TypeError, "pass one dtype"),
    (dict(bias=torch.zeros(5)), ValueError, "bias has 5 entries"),
    (dict(mask=None), ValueError, "needs completion_mask"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
])
def test_fused_linear_bad_input(change, error, match):
    args = dict(hidden=torch.zeros(2, 3, 4), weight=torch.zeros(6, 4), targets=torch.zeros(2, 3, dtype=torch.long),
                mask=torch.ones(2, 3), bias=None, temperature=1.0, chunk_size=None)
    args.update(change)
    with pytest.raises(error, match=match):
        fused_linear_grpo_loss(args["hidden"], args["weight"], args["targets"], args["mask"], bias=args["bias"],
                               temperature=args["temperature"], chunk_size=args["chunk_size"],
                               advantages=torch.zeros(2), validate=True, backend="torch")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gpu_fused_linear_realistic(dtype, level):
    torch.manual_seed(0)
    rows, length, hidden, vocab = 8, 512, 1024, 32_003
    h = torch.randn(rows, length, hidden, device="cuda", dtype=dtype)
    w = (0.02 * torch.randn(vocab, hidden, device="cuda")).to(dtype)
    targets = torch.randint(0, vocab, (rows, length), device="cuda")
    mask = torch.rand(rows, length, device="cuda") < 0.9
    adv = torch.randn(rows, device="cuda")
    old = selective_logprobs(h, w, targets) + 0.1 * torch.randn(rows, length, device="cuda")
    opts = dict(advantages=adv, old_per_token_logps=old, importance_sampling_level=level, loss_type="grpo")
    results = []
    for backend in ("triton", "torch"):
        x, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, metrics = fused_linear_grpo_loss(x, wx, targets, mask, chunk_size=1000, backend=backend, **opts)
        loss.backward()
        results.append((loss, x.grad, wx.grad, metrics["entropy"]))
    for got, expected in zip(*results):
        close(got, expected, 2e-2 if dtype == torch.bfloat16 else 1e-4, "triton vs torch on GPU")


@pytest.mark.gpu
def test_gpu_grpo_loss_does_not_synchronise():
    from pyfastrl import grpo_loss

    logp = -torch.rand(8, 256, device="cuda")
    mask = torch.rand(8, 256, device="cuda") < 0.9
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, metrics = grpo_loss(logp.requires_grad_(), mask, advantages=torch.randn(8, device="cuda"),
                                  old_per_token_logps=logp.detach() - 0.1, importance_sampling_level="sequence")
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)
