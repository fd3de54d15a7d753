"""GRPO advantages / loss / fused LM-head loss: both backends against the float64 naive reference
(TRL's formulas, differentiated by autograd). Triton runs through TRITON_INTERPRET=1 without CUDA."""
import itertools
import weakref

import pytest
import torch

from conftest import DEVICE
from pyfastrl import fused_linear_grpo_loss, grpo_advantages, grpo_loss, selective_logprobs
from pyfastrl.kernels.grpo_loss.reference import naive_advantages, naive_grpo_loss, naive_token_logprobs

BACKENDS = ("torch", "triton")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
METRICS = ("clip_ratio_low", "clip_ratio_high", "clip_ratio", "kl", "ratio_mean", "ratio_min", "ratio_max",
           "advantage_mean", "advantage_std")


def _dtype(backend):
    return torch.float64 if backend == "torch" else torch.float32


def _tol(backend):
    # torch runs the closed forms in float64; Triton computes in fp32.
    return 1e-10 if backend == "torch" else 2e-5


def _close(actual, expected, tol, what):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} x {scale:.3g}"


def _options(loss_type, level, beta, delta, kl_estimator="k3"):
    return dict(loss_type=loss_type, importance_sampling_level=level, eps_low=0.2,
                eps_high=1.2 if loss_type == "cispo" else 0.28, delta=delta, beta=beta, kl_estimator=kl_estimator)


def _token_data(rows=5, length=37, seed=0):
    """Float64 log-probs where old = logp + N(0, 0.3), mixed-sign advantages, a random mask with one
    fully masked row, and a length that is not a multiple of any tile."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, length, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(rows, length, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(rows, length, generator=g, dtype=torch.float64)
    mask = torch.rand(rows, length, generator=g) < 0.8
    mask[2] = False
    adv = torch.randn(rows, generator=g, dtype=torch.float64)
    adv[0], adv[1] = abs(adv[0]) + 0.5, -abs(adv[1]) - 0.5
    return logp, old, ref, mask, adv


def _check_metrics(metrics, expected, tol):
    for name in METRICS:
        _close(metrics[name], expected[name], tol, f"metric {name}")


def test_token_data_fires_both_clip_sides_and_delta():
    # The battery below is only meaningful if its data reaches every branch.
    logp, old, ref, mask, adv = _token_data()
    _, metrics = naive_grpo_loss(logp, mask, adv, old, **_options("dapo", "token", 0.0, None))
    assert metrics["clip_ratio_low"] > 0 and metrics["clip_ratio_high"] > 0
    ratio = torch.exp(logp - old)[mask]
    assert (ratio > 1.5).any() and (ratio < 0.8).any()


# ----------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_reference_equal_and_ragged_groups(scale):
    rewards = torch.randn(24, dtype=torch.float64)
    equal = grpo_advantages(rewards, group_size=4, scale=scale)
    _close(equal, naive_advantages(rewards, torch.arange(24) // 4, scale), 1e-12, "equal groups")
    ids = torch.tensor([3, 1, 3, 7, 1, 1, 3, 9, 7, 7, 7, 1] * 2)  # ragged, interleaved, one label per 12
    ids[7] = 42  # a singleton group
    ragged = grpo_advantages(rewards, group_ids=ids, scale=scale)
    _close(ragged, naive_advantages(rewards, ids, scale), 1e-12, "ragged groups")
    assert ragged[7] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_identical_rewards_give_exact_zero(dtype):
    values = [0.1, 0.7, 1 / 3, 123.456, -2.2]
    rewards = torch.tensor([v for v in values for _ in range(7)], dtype=dtype)
    for scale in ("group", "batch", "none"):
        adv = grpo_advantages(rewards, group_size=7, scale=scale)
        assert adv.dtype == dtype
        assert torch.equal(adv, torch.zeros_like(adv)), scale


def test_integer_rewards_and_group_of_one():
    adv = grpo_advantages(torch.tensor([1, 0, 1, 1]), group_size=1)
    assert adv.dtype == torch.float32 and torch.equal(adv, torch.zeros(4))
    adv = grpo_advantages(torch.tensor([1, 0, 0, 0]), group_size=4)
    _close(adv, naive_advantages(torch.tensor([1.0, 0, 0, 0]), torch.zeros(4, dtype=torch.long)), 1e-6, "int")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_reward_is_named(bad):
    rewards = torch.ones(8)
    rewards[5] = bad
    with pytest.raises(ValueError, match=r"rewards\[5\]"):
        grpo_advantages(rewards, group_size=4)
    with pytest.raises(ValueError, match=r"rewards\[5\]"):
        grpo_loss(torch.zeros(8, 3), torch.ones(8, 3), rewards=rewards, group_size=4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(group_size=3), "do not split into groups"),
    (dict(), "exactly one of group_size or group_ids"),
    (dict(group_size=2, group_ids=torch.zeros(8, dtype=torch.long)), "exactly one"),
    (dict(group_ids=torch.zeros(7, dtype=torch.long)), "one label per reward"),
    (dict(group_size=2, scale="std"), "scale must be one of"),
    (dict(group_size=0), "group_size must be an integer"),
])
def test_advantages_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        grpo_advantages(torch.randn(8), **kwargs)


# ----------------------------------------------------------------------------- grpo_loss


def _loss_vs_naive(backend, opts, seed=0):
    """grpo_loss on ``_token_data(seed)`` against the naive reference: loss, dlogp, every metric."""
    logp, old, ref, mask, adv = _token_data(seed=seed)
    dtype = _dtype(backend)
    x = logp.to(DEVICE, dtype).clone().requires_grad_()
    loss, metrics = grpo_loss(x, mask.to(DEVICE), advantages=adv.to(DEVICE, dtype), old_logprobs=old.to(DEVICE, dtype),
                              ref_logprobs=ref.to(DEVICE, dtype), backend=backend, **opts)
    loss.backward()
    y = logp.clone().requires_grad_()
    expected, expected_metrics = naive_grpo_loss(y, mask, adv, old, ref, **opts)
    expected.backward()
    assert torch.isfinite(loss) and loss.dtype == dtype and x.grad.dtype == dtype
    assert y.grad.abs().sum() > 0
    _close(loss, expected, _tol(backend), "loss")
    _close(x.grad, y.grad, _tol(backend), "dlogp")
    _check_metrics(metrics, expected_metrics, _tol(backend))
    assert torch.equal(x.grad[2].cpu(), torch.zeros_like(x.grad[2].cpu()))  # the fully masked row
    return metrics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type, level, beta, delta", list(itertools.product(
    LOSS_TYPES, ("token", "sequence"), (0.0, 0.04), (None, 1.5))))
def test_grpo_loss_matches_reference(backend, loss_type, level, beta, delta):
    _loss_vs_naive(backend, _options(loss_type, level, beta, delta))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3", "k3_corrected"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_kl_estimators(backend, kl_estimator, level):
    metrics = _loss_vs_naive(backend, _options("bnpo", level, 0.04, None, kl_estimator), seed=1)
    assert metrics["kl"] != 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_default_old_and_rewards_path(backend):
    logp, _, _, mask, _ = _token_data(rows=6)
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0])  # second group: identical rewards
    dtype = _dtype(backend)
    x = logp.to(DEVICE, dtype).clone().requires_grad_()
    loss, metrics = grpo_loss(x, mask.to(DEVICE), rewards=rewards.to(DEVICE), group_size=3, loss_type="grpo",
                              backend=backend)
    loss.backward()
    adv = naive_advantages(rewards, torch.arange(6) // 3)
    y = logp.clone().requires_grad_()
    expected, _ = naive_grpo_loss(y, mask, adv, loss_type="grpo")
    expected.backward()
    _close(loss, expected, _tol(backend), "loss")
    _close(x.grad, y.grad, _tol(backend), "dlogp")
    assert metrics["ratio_min"] == 1 and metrics["ratio_max"] == 1 and metrics["clip_ratio"] == 0
    assert torch.equal(x.grad[3:].cpu(), torch.zeros(3, logp.shape[1], dtype=dtype))  # zero-variance group
    assert x.grad[:2].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_ratio_exactly_at_one_plus_and_minus_eps(backend):
    # eps_low = eps_high = 0 and old = logp: r = 1 = 1 - eps_low = 1 + eps_high exactly, for both
    # advantage signs. The boundary counts as unclipped: gradient -A * w, and nothing is clipped.
    logp, _, _, mask, adv = _token_data()
    dtype = _dtype(backend)
    x = logp.to(DEVICE, dtype).clone().requires_grad_()
    loss, metrics = grpo_loss(x, mask.to(DEVICE), advantages=adv.to(DEVICE, dtype), old_logprobs=logp.to(DEVICE, dtype),
                              eps_low=0.0, eps_high=0.0, loss_type="bnpo", backend=backend)
    loss.backward()
    expected = torch.where(mask, -adv[:, None] / mask.sum(), 0.0)
    _close(x.grad, expected, _tol(backend), "dlogp at the clip boundary")
    assert metrics["clip_ratio"] == 0


def test_ratio_at_the_clip_boundary_float64():
    # r exactly 1 + eps_high and exactly 1 - eps_low (eps = r - 1 is exact in float64): the torch
    # backend's gradient equals autograd of the reference, which treats the boundary as unclipped.
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    old = logp - torch.tensor([[0.1, -0.1, 0.0]], dtype=torch.float64)
    ratio = torch.exp(logp - old)
    eps_high, eps_low = ratio[0, 0].item() - 1, 1 - ratio[0, 1].item()
    assert 1 + eps_high == ratio[0, 0].item() and 1 - eps_low == ratio[0, 1].item()
    mask = torch.ones_like(logp, dtype=torch.bool)
    for sign in (1.0, -1.0):
        adv = torch.tensor([sign], dtype=torch.float64)
        x = logp.clone().requires_grad_()
        loss, metrics = grpo_loss(x, mask, advantages=adv, old_logprobs=old, eps_low=eps_low, eps_high=eps_high,
                                  backend="torch")
        loss.backward()
        y = logp.clone().requires_grad_()
        naive_grpo_loss(y, mask, adv, old, eps_low=eps_low, eps_high=eps_high)[0].backward()
        _close(x.grad, y.grad, 1e-15, "dlogp")
        _close(x.grad, -sign * ratio / 3, 1e-15, "dlogp closed form")
        assert metrics["clip_ratio"] == 0


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, inside the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_positions_may_hold_garbage(backend):
    logp, old, ref, mask, adv = _token_data()
    dtype = _dtype(backend)
    dirty = logp.clone()
    dirty[~mask] = float("nan")
    dirty[~mask & (torch.arange(logp.shape[1]) % 2 == 0)] = -float("inf")
    results = []
    for values in (logp, dirty):
        x = values.to(DEVICE, dtype).clone().requires_grad_()
        loss, metrics = grpo_loss(x, mask.to(DEVICE), advantages=adv.to(DEVICE, dtype), old_logprobs=old.to(DEVICE, dtype),
                                  ref_logprobs=ref.to(DEVICE, dtype), beta=0.04,
                                  importance_sampling_level="sequence", backend=backend)
        loss.backward()
        results.append((loss, x.grad, metrics["ratio_mean"]))
    for clean, garbage in zip(*results):
        assert torch.equal(clean, garbage)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_everything_masked_gives_zero_not_nan(backend, loss_type):
    dtype = _dtype(backend)
    x = torch.randn(3, 5, dtype=dtype, device=DEVICE, requires_grad=True)
    loss, metrics = grpo_loss(x, torch.zeros(3, 5, device=DEVICE), advantages=torch.randn(3, dtype=dtype, device=DEVICE),
                              loss_type=loss_type, backend=backend)
    loss.backward()
    assert loss.item() == 0 and torch.equal(x.grad, torch.zeros_like(x.grad))
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_micro_batches_with_global_token_count_sum_to_full_batch(backend, loss_type):
    logp, old, ref, mask, adv = _token_data(rows=6)
    dtype = _dtype(backend)
    opts = dict(_options(loss_type, "token", 0.04, None), backend=backend)
    args = [t.to(DEVICE, dtype) for t in (logp, old, ref, adv)]
    mask = mask.to(DEVICE)
    full_x = args[0].clone().requires_grad_()
    full, _ = grpo_loss(full_x, mask, advantages=args[3], old_logprobs=args[1], ref_logprobs=args[2], **opts)
    full.backward()
    total = int(mask.sum())
    parts_x = args[0].clone().requires_grad_()
    parts = sum(
        grpo_loss(parts_x[rows], mask[rows], advantages=args[3][rows], old_logprobs=args[1][rows],
                  ref_logprobs=args[2][rows], num_items_in_batch=total, **opts)[0]
        for rows in (slice(0, 2), slice(2, 6))
    )
    parts.backward()
    _close(parts, full, _tol(backend), "sum of micro-batch losses")
    _close(parts_x.grad, full_x.grad, _tol(backend), "micro-batch gradients")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_packed_equals_padded(backend, level):
    logp, old, ref, mask, adv = _token_data()
    dtype = _dtype(backend)
    lengths = mask.sum(1)
    mask[:] = torch.arange(mask.shape[1]) < lengths[:, None]  # right-padded rows, as a packer sees them
    opts = dict(_options("dr_grpo", level, 0.04, 1.5), max_completion_length=40, backend=backend)
    padded_x = logp.to(DEVICE, dtype).clone().requires_grad_()
    padded, padded_metrics = grpo_loss(padded_x, mask.to(DEVICE), advantages=adv.to(DEVICE, dtype),
                                       old_logprobs=old.to(DEVICE, dtype), ref_logprobs=ref.to(DEVICE, dtype), **opts)
    padded.backward()
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(DEVICE)
    packed_x = logp[mask].to(DEVICE, dtype).clone().requires_grad_()
    packed, packed_metrics = grpo_loss(
        packed_x, torch.ones_like(packed_x), advantages=adv.to(DEVICE, dtype), old_logprobs=old[mask].to(DEVICE, dtype),
        ref_logprobs=ref[mask].to(DEVICE, dtype), cu_seqlens=cu, **opts)
    packed.backward()
    _close(packed, padded, _tol(backend), "loss")
    _close(packed_x.grad, padded_x.grad[mask.to(DEVICE)], _tol(backend), "dlogp")
    _check_metrics(packed_metrics, padded_metrics, _tol(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_than_65535_tokens(backend):
    # One program per row on grid axis 0: a long call launches fine and matches the reference.
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(2, 40_000, generator=g, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    mask = torch.rand(logp.shape, generator=g) < 0.9
    adv = torch.tensor([0.7, -1.3], dtype=torch.float64)
    dtype = _dtype(backend)
    x = logp.to(DEVICE, dtype).clone().requires_grad_()
    loss, _ = grpo_loss(x, mask.to(DEVICE), advantages=adv.to(DEVICE, dtype), old_logprobs=old.to(DEVICE, dtype),
                        importance_sampling_level="sequence", backend=backend)
    loss.backward()
    y = logp.clone().requires_grad_()
    expected, _ = naive_grpo_loss(y, mask, adv, old, importance_sampling_level="sequence")
    expected.backward()
    _close(loss, expected, _tol(backend), "loss")
    _close(x.grad, y.grad, _tol(backend), "dlogp")


def test_low_precision_logprobs_through_triton():
    logp, old, _, mask, adv = _token_data()
    for dtype in (torch.bfloat16, torch.float16):
        x = logp.to(DEVICE, dtype).clone().requires_grad_()
        loss, _ = grpo_loss(x, mask.to(DEVICE), advantages=adv.to(DEVICE, dtype), old_logprobs=old.to(DEVICE, dtype),
                            backend="triton")
        loss.backward()
        y = logp.to(dtype).double().requires_grad_()
        expected, _ = naive_grpo_loss(y, mask, adv.to(dtype).double(), old.to(dtype).double())
        expected.backward()
        assert loss.dtype == torch.float32 and x.grad.dtype == dtype
        _close(loss, expected, 1e-5, f"{dtype} loss")
        _close(x.grad, y.grad, 1e-2, f"{dtype} dlogp")  # one rounding of the gradient to the dtype


def test_grpo_loss_custom_op_and_compile():
    logp, old, ref, mask, adv = _token_data()
    x = logp.float().requires_grad_()

    def fn(x):
        return grpo_loss(x, mask, advantages=adv.float(), old_logprobs=old.float(), ref_logprobs=ref.float(),
                         beta=0.04, importance_sampling_level="sequence", backend="torch")[0]

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_grad = torch.autograd.grad(fn(x), x)[0]
    compiled_loss = compiled(x)
    _close(compiled_loss, fn(x), 1e-6, "compiled loss")
    _close(torch.autograd.grad(compiled_loss, x)[0], eager_grad, 1e-6, "compiled gradient")
    from pyfastrl.ops.grpo_loss import _loss_op

    cu = torch.arange(6, dtype=torch.int32) * logp.shape[1]
    args = (x.reshape(-1), old.float().reshape(-1), ref.float().reshape(-1), mask.reshape(-1), cu, adv.float(),
            torch.full((5,), 0.01), "grpo", True, 0.2, 0.28, 1.5, 0.04, "k3", "torch")
    torch.library.opcheck(_loss_op, args)


# ----------------------------------------------------------------------------- fused LM head


@pytest.mark.parametrize("sequence_level", [False, True])
def test_fused_and_selective_custom_ops_pass_opcheck(sequence_level):
    from pyfastrl.ops.grpo_loss import _fused_op, _selective_op

    h, w, b, targets, _, adv, old, ref = _lm_data()
    tokens = 30
    h = h.reshape(-1, h.shape[-1])[:tokens].float().requires_grad_()
    w, b = w.float().requires_grad_(), b.float().requires_grad_()
    targets, old, ref = targets.reshape(-1)[:tokens], old.reshape(-1)[:tokens].float(), ref.reshape(-1)[:tokens].float()
    cu = torch.tensor([0, 10, 25, tokens], dtype=torch.int32)
    args = (h, w, b, targets, old, ref, cu, adv[:3].float(), torch.full((3,), 0.03), 1 / 0.7, 7, True, True, True,
            "grpo", sequence_level, 0.2, 0.28, 1.5, 0.04, "k3", "torch")
    torch.library.opcheck(_fused_op, args)
    torch.library.opcheck(_selective_op, (h.detach(), w.detach(), None, targets, 1.0, 7, "torch"))


def _lm_data(rows=4, length=11, hidden=8, vocab=37, seed=0, temperature=1.0):
    """Old/ref log-probs are the current ones at ``temperature`` plus N(0, 0.3) noise."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, length, hidden, generator=g, dtype=torch.float64)
    w = 0.5 * torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(vocab, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (rows, length), generator=g)
    mask = torch.rand(rows, length, generator=g) < 0.8
    mask[1] = False
    adv = torch.randn(rows, generator=g, dtype=torch.float64)
    with torch.no_grad():
        logp, _ = naive_token_logprobs(h, w, targets, b, temperature)
    old = logp + 0.3 * torch.randn(rows, length, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(rows, length, generator=g, dtype=torch.float64)
    return h, w, b, targets, mask, adv, old, ref


def _fused_vs_naive(backend, opts, temperature, chunk_size=7, **data):
    h, w, b, targets, mask, adv, old, ref = _lm_data(temperature=temperature, **data)
    dtype = _dtype(backend)
    leaves = [t.to(DEVICE, dtype).clone().requires_grad_() for t in (h, w, b)]
    loss, metrics = fused_linear_grpo_loss(
        *leaves[:2], targets.to(DEVICE), mask.to(DEVICE), bias=leaves[2], temperature=temperature,
        chunk_size=chunk_size, advantages=adv.to(DEVICE, dtype), old_logprobs=old.to(DEVICE, dtype),
        ref_logprobs=ref.to(DEVICE, dtype), backend=backend, **opts)
    loss.backward()
    ref_leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    logp, entropy = naive_token_logprobs(ref_leaves[0], ref_leaves[1], targets, ref_leaves[2], temperature)
    expected, expected_metrics = naive_grpo_loss(logp, mask, adv, old, ref, **opts)
    expected.backward()
    tol = _tol(backend)
    _close(loss, expected, tol, "loss")
    for name, leaf, ref_leaf in zip(("hidden", "weight", "bias"), leaves, ref_leaves):
        assert ref_leaf.grad.abs().sum() > 0
        _close(leaf.grad, ref_leaf.grad, tol, f"d{name}")
    _check_metrics(metrics, expected_metrics, tol)
    _close(metrics["entropy"], entropy[mask].mean(), tol, "entropy")
    return loss, [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type, level, beta, delta, temperature", list(itertools.product(
    LOSS_TYPES, ("token", "sequence"), (0.0, 0.04), (None, 1.5), (0.7, 1.0))))
def test_fused_linear_matches_reference(backend, loss_type, level, beta, delta, temperature):
    _fused_vs_naive(backend, _options(loss_type, level, beta, delta, "k3_corrected"), temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_linear_on_policy_without_old_logprobs(backend, level):
    # old = logp.detach(): ratio 1 everywhere, loss -mean(A) per token, gradient -A * dlogp.
    h, w, b, targets, mask, adv, _, _ = _lm_data()
    dtype = _dtype(backend)
    x = h.to(DEVICE, dtype).clone().requires_grad_()
    loss, metrics = fused_linear_grpo_loss(x, w.to(DEVICE, dtype), targets.to(DEVICE), mask.to(DEVICE),
                                           advantages=adv.to(DEVICE, dtype), importance_sampling_level=level,
                                           chunk_size=5, backend=backend)
    loss.backward()
    y = h.clone().requires_grad_()
    logp, _ = naive_token_logprobs(y, w, targets)
    expected, _ = naive_grpo_loss(logp, mask, adv, importance_sampling_level=level)
    expected.backward()
    _close(loss, expected, _tol(backend), "loss")
    _close(x.grad, y.grad, _tol(backend), "dhidden")
    assert metrics["ratio_min"] == 1 and metrics["ratio_max"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_linear_chunk_size_invariance(backend, level):
    opts = _options("grpo", level, 0.04, 1.5)
    results = [_fused_vs_naive(backend, opts, 1.0, chunk_size=c) for c in (1, 5, 1000)]
    for loss, grads in results[1:]:
        _close(loss, results[0][0], _tol(backend), "loss across chunk sizes")
        for grad, first in zip(grads, results[0][1]):
            _close(grad, first, _tol(backend), "gradient across chunk sizes")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_linear_packed_equals_padded(backend, level):
    h, w, b, targets, mask, adv, old, ref = (t.to(DEVICE) for t in _lm_data())
    dtype = _dtype(backend)
    h, w, b, adv, old, ref = (t.to(dtype) for t in (h, w, b, adv, old, ref))
    opts = dict(_options("dr_grpo", level, 0.04, None), max_completion_length=11, backend=backend,
                temperature=0.7, advantages=adv)
    padded_h, padded_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    padded, padded_metrics = fused_linear_grpo_loss(padded_h, padded_w, targets, mask, old_logprobs=old,
                                                    ref_logprobs=ref, **opts)
    padded.backward()
    # Packed: every row's first tokens up to its last valid one, masked tokens inside kept as masked.
    lengths = torch.where(mask.any(1), mask.int().cumsum(1).argmax(1) + 1, 0)
    keep = torch.arange(mask.shape[1], device=DEVICE) < lengths[:, None]
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    packed_h = h[keep].clone().requires_grad_()
    packed_w = w.clone().requires_grad_()
    packed, packed_metrics = fused_linear_grpo_loss(packed_h, packed_w, targets[keep], mask[keep], cu_seqlens=cu,
                                                    old_logprobs=old[keep], ref_logprobs=ref[keep], **opts)
    packed.backward()
    tol = _tol(backend)
    _close(packed, padded, tol, "loss")
    _close(packed_h.grad, padded_h.grad[keep], tol, "dhidden")
    assert torch.equal(padded_h.grad[~keep], torch.zeros_like(padded_h.grad[~keep]))
    _close(packed_w.grad, padded_w.grad, tol, "dweight")
    for name in METRICS + ("entropy",):
        _close(packed_metrics[name], padded_metrics[name], tol, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_micro_batches_sum_to_full_batch(backend):
    h, w, b, targets, mask, adv, old, ref = (t.to(DEVICE) for t in _lm_data(rows=6))
    dtype = _dtype(backend)
    h, w, adv, old = (t.to(dtype) for t in (h, w, adv, old))
    full_w = w.clone().requires_grad_()
    full, _ = fused_linear_grpo_loss(h, full_w, targets, mask, advantages=adv, old_logprobs=old, backend=backend)
    full.backward()
    parts_w = w.clone().requires_grad_()
    total = int(mask.sum())
    for rows in (slice(0, 4), slice(4, 6)):
        part, _ = fused_linear_grpo_loss(h[rows], parts_w, targets[rows], mask[rows], advantages=adv[rows],
                                         old_logprobs=old[rows], num_items_in_batch=total, backend=backend)
        part.backward()
    _close(parts_w.grad, full_w.grad, _tol(backend), "accumulated dweight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_frozen_head_and_no_grad(backend):
    h, w, b, targets, mask, adv, old, _ = (t.to(DEVICE) for t in _lm_data())
    dtype = _dtype(backend)
    h, w, adv, old = (t.to(dtype) for t in (h, w, adv, old))
    x = h.clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(x, w, targets, mask, advantages=adv, old_logprobs=old, backend=backend)
    loss.backward()  # weight frozen (LoRA-style): only dh is computed
    y = h.clone().requires_grad_()
    both_w = w.clone().requires_grad_()
    expected, _ = fused_linear_grpo_loss(y, both_w, targets, mask, advantages=adv, old_logprobs=old, backend=backend)
    expected.backward()
    _close(x.grad, y.grad, 1e-12, "dh with a frozen head")
    with torch.no_grad():
        value, _ = fused_linear_grpo_loss(y, both_w, targets, mask, advantages=adv, old_logprobs=old, backend=backend)
    assert not value.requires_grad
    _close(value, expected, 1e-12, "loss under no_grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_linear_logits_exist_one_chunk_at_a_time(backend, level, monkeypatch):
    # Every logits tensor the op creates is one chunk (<= chunk_size rows of the valid tokens),
    # and each is released before the next is made.
    from pyfastrl.ops import grpo_loss as op_module

    made, earlier, original = [], [], op_module._chunk_logits

    def recording(hidden_chunk, weight, bias):
        logits = original(hidden_chunk, weight, bias)
        made.append((logits.shape, sum(ref() is not None for ref in earlier)))  # earlier chunks still alive
        earlier.append(weakref.ref(logits))
        return logits

    monkeypatch.setattr(op_module, "_chunk_logits", recording)
    h, w, b, targets, mask, adv, old, _ = (t.to(DEVICE) for t in _lm_data(rows=6, length=13))
    dtype = _dtype(backend)
    loss, _ = fused_linear_grpo_loss(h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), targets, mask,
                                     advantages=adv.to(dtype), old_logprobs=old.to(dtype), chunk_size=10,
                                     importance_sampling_level=level, backend=backend)
    valid = int(mask.sum())
    passes = 2 if level == "sequence" else 1
    assert len(made) == passes * -(-valid // 10)
    assert all(shape[0] <= 10 and shape[1] == w.shape[0] for shape, _ in made)
    assert all(previous_alive == 0 for _, previous_alive in made)


def test_fused_linear_gradcheck_float64():
    # A smooth configuration (no clip kinks) so finite differences are meaningful.
    h, w, b, targets, mask, adv, old, ref = _lm_data(rows=2, length=4, hidden=3, vocab=7)
    opts = dict(advantages=adv, old_logprobs=old, ref_logprobs=ref, eps_low=0.99, eps_high=100.0, beta=0.1,
                loss_type="grpo", importance_sampling_level="sequence", temperature=0.7, chunk_size=3,
                backend="torch")

    def fn(hidden, weight, bias):
        return fused_linear_grpo_loss(hidden, weight, targets, mask, bias=bias, **opts)[0]

    assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in (h, w, b)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_everything_masked(backend):
    h, w, b, targets, mask, adv, old, _ = (t.to(DEVICE) for t in _lm_data())
    dtype = _dtype(backend)
    x, wx = h.to(dtype).clone().requires_grad_(), w.to(dtype).clone().requires_grad_()
    loss, metrics = fused_linear_grpo_loss(x, wx, targets, torch.zeros_like(mask), advantages=adv.to(dtype),
                                           backend=backend)
    loss.backward()
    assert loss.item() == 0 and all(torch.isfinite(v) for v in metrics.values())
    assert torch.equal(x.grad, torch.zeros_like(x.grad)) and torch.equal(wx.grad, torch.zeros_like(wx.grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_more_than_65535_tokens(backend):
    # Packed tokens on grid axis 0 (limit 2**31 - 1): 70,000 tokens in one chunk and in several.
    g = torch.Generator().manual_seed(5)
    num_tokens, vocab = 70_000, 20
    dtype = _dtype(backend)
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
    _close(loss, expected, _tol(backend), "loss")
    _close(x.grad, y.grad, _tol(backend), "dhidden")
    _close(metrics["entropy"], entropy.mean(), _tol(backend), "entropy")


def test_compiled_launch_keeps_programs_on_grid_axis_0():
    # What the GPU would launch for a 1M-token chunk: one program per token, all on axis 0 (limit
    # 2**31 - 1; Liger's per-token kernel failed past 65,535 tokens on a limited axis).
    from pyfastrl.kernels.grpo_loss import kernel

    grid, block_t, block_v, _ = kernel.logits_launch(1_000_000, interpreted=False)
    assert grid == (1_000_000,) and block_t == 1 and block_v >= 1024


# ----------------------------------------------------------------------------- selective_logprobs


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_logprobs_matches_reference(backend):
    h, w, b, targets, *_ = _lm_data()
    dtype = _dtype(backend)
    hidden = h.to(DEVICE, dtype).clone().requires_grad_()
    logp, entropy = selective_logprobs(hidden, w.to(DEVICE, dtype), targets.to(DEVICE), bias=b.to(DEVICE, dtype),
                                       temperature=0.7, return_entropy=True, chunk_size=5, backend=backend)
    expected_logp, expected_entropy = naive_token_logprobs(h, w, targets, b, 0.7)
    assert logp.shape == targets.shape and not logp.requires_grad
    _close(logp, expected_logp, _tol(backend), "logprobs")
    _close(entropy, expected_entropy, _tol(backend), "entropy")
    only = selective_logprobs(hidden, w.to(DEVICE, dtype), targets.to(DEVICE), bias=b.to(DEVICE, dtype),
                              temperature=0.7, backend=backend)
    assert torch.equal(only, logp)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_logprobs_low_precision_triton(dtype):
    # Logits are rounded to the weight dtype (as the model's LM head does); all else is fp32.
    h, w, b, targets, *_ = _lm_data(vocab=300)
    h, w = h.to(DEVICE, dtype), w.to(DEVICE, dtype)
    logp, entropy = selective_logprobs(h, w, targets.to(DEVICE), return_entropy=True, backend="triton")
    expected_logp, expected_entropy = naive_token_logprobs(h.float(), w.float(), targets.to(DEVICE))
    _close(logp, expected_logp, 2e-2, "logprobs")
    _close(entropy, expected_entropy, 2e-2, "entropy")
    reference_path, _ = naive_token_logprobs(h, w, targets.to(DEVICE))  # same rounding of the logits
    _close(logp, reference_path, 1e-5, "logprobs vs the unfused path")


# ----------------------------------------------------------------------------- bad input


def _loss_call(**overrides):
    logp, old, ref, mask, adv = _token_data()
    kwargs = dict(advantages=adv, old_logprobs=old, backend="torch")
    kwargs.update(overrides)
    return lambda: grpo_loss(kwargs.pop("logprobs", logp), kwargs.pop("mask", mask), **kwargs)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(mask=torch.ones(5, 36)), ValueError, "mask has shape"),
    (dict(old_logprobs=torch.zeros(5, 36, dtype=torch.float64)), ValueError, "old_logprobs has shape"),
    (dict(ref_logprobs=torch.zeros(4, 37, dtype=torch.float64), beta=0.1), ValueError, "ref_logprobs has shape"),
    (dict(advantages=torch.zeros(4, dtype=torch.float64)), ValueError, "advantages has 4 entries"),
    (dict(advantages=None, rewards=torch.zeros(5)), ValueError, "need group_size"),
    (dict(advantages=None, rewards=torch.zeros(5), group_size=2), ValueError, "do not split"),
    (dict(rewards=torch.zeros(5), group_size=5), ValueError, "exactly one of advantages"),
    (dict(loss_type="ppo"), ValueError, "loss_type must be one of"),
    (dict(importance_sampling_level="group"), ValueError, "importance_sampling_level"),
    (dict(kl_estimator="k4", beta=0.1, ref_logprobs=torch.zeros(5, 37)), ValueError, "kl_estimator"),
    (dict(beta=0.04), ValueError, "pass ref_logprobs"),
    (dict(eps_low=1.0), ValueError, "eps_low"),
    (dict(delta=0.9), ValueError, "delta"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    (dict(logprobs=torch.zeros(5, 37, dtype=torch.int64)), TypeError, "logprobs has dtype"),
    (dict(logprobs=torch.zeros(5, 37, dtype=torch.float64), backend="triton"), TypeError, "backend 'triton' supports"),
    (dict(logprobs=torch.zeros(185), mask=torch.ones(185), old_logprobs=None), ValueError, "need cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0, 37])), ValueError, "cu_seqlens goes with the packed form"),
])
def test_grpo_loss_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        _loss_call(**overrides)()


@pytest.mark.parametrize("cu, match", [
    ([0, 5, 3, 10], "non-decreasing"),
    ([0, 5, 9], "end at the number of tokens"),
    ([1, 5, 10], "start at 0"),
])
def test_bad_cu_seqlens(cu, match):
    x = torch.zeros(10)
    with pytest.raises(ValueError, match=match):
        grpo_loss(x, torch.ones(10), advantages=torch.zeros(len(cu) - 1), cu_seqlens=torch.tensor(cu))
    with pytest.raises(ValueError, match=match):
        fused_linear_grpo_loss(torch.zeros(10, 4), torch.zeros(6, 4), torch.zeros(10, dtype=torch.long), None,
                               cu_seqlens=torch.tensor(cu), advantages=torch.zeros(len(cu) - 1))


@pytest.mark.parametrize("change, error, match", [
    (dict(targets=torch.full((2, 3), 6)), ValueError, r"holds 6, outside the vocabulary \[0, 6\)"),
    (dict(targets=torch.full((2, 3), -1)), ValueError, "holds -1"),
    (dict(targets=torch.zeros(2, 3)), TypeError, "target_ids has dtype"),
    (dict(weight=torch.zeros(6, 5)), ValueError, "hidden size H"),
    (dict(weight=torch.zeros(6, 4, dtype=torch.float64)), TypeError, "pass one dtype"),
    (dict(bias=torch.zeros(5)), ValueError, "bias has 5 entries"),
    (dict(mask=None), ValueError, "needs mask"),
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
                               advantages=torch.zeros(2), backend="torch")


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
    opts = dict(advantages=adv, old_logprobs=old, importance_sampling_level=level, loss_type="grpo")
    results = []
    for backend in ("triton", "torch"):
        x, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, metrics = fused_linear_grpo_loss(x, wx, targets, mask, chunk_size=1000, backend=backend, **opts)
        loss.backward()
        results.append((loss, x.grad, wx.grad, metrics["entropy"]))
    for got, expected in zip(*results):
        _close(got, expected, 2e-2 if dtype == torch.bfloat16 else 1e-4, "triton vs torch on GPU")
