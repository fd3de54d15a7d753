"""GRPO advantages and token loss (``grpo_advantages``, ``grpo_loss``): both backends against the
float64 reference of TRL 1.16's formulas (``reference.naive_*``), differentiated by autograd.
Triton runs through TRITON_INTERPRET=1 without CUDA."""
import itertools
import math

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
    loss_options,
    token_data,
    tol_of,
)
from pyfastrl import grpo_advantages, grpo_loss
from pyfastrl.kernels.grpo_loss.reference import (
    naive_advantages,
    naive_grpo_loss,
    naive_importance_sampling_ratio,
)
from pyfastrl.kernels.launch_target import gpu_tiles


def test_token_data_fires_both_clip_sides_and_delta():
    # The battery below is only meaningful if its data reaches every branch.
    logp, old, ref, mask, adv = token_data()
    _, metrics = naive_grpo_loss(logp, mask, adv, old, **loss_options("dapo", "token", 0.0, None))
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
    ratio = torch.exp(logp - old)[mask]
    assert (ratio > 1.5).any() and (ratio < 0.8).any()


# ----------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none", True, False])
def test_advantages_match_reference_equal_and_ragged_groups(scale):
    name = {True: "group", False: "none"}.get(scale, scale)
    rewards = torch.randn(24, dtype=torch.float64)
    equal = grpo_advantages(rewards, group_size=4, scale_rewards=scale)
    close(equal, naive_advantages(rewards, torch.arange(24) // 4, name), 1e-12, "equal groups")
    ids = torch.tensor([3, 1, 3, 7, 1, 1, 3, 9, 7, 7, 7, 1] * 2)  # ragged, interleaved, one label per 12
    ids[7] = 42  # a singleton group
    ragged = grpo_advantages(rewards, group_ids=ids, scale_rewards=scale)
    close(ragged, naive_advantages(rewards, ids, name), 1e-12, "ragged groups")
    assert ragged[7] == 0


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_unscorable_nan_rewards_as_trl(scale):
    # TRL: NaN rewards (every reward function returned None) are left out of the group statistics
    # and get advantage 0; a group left with one scorable reward gets 0 throughout.
    rewards = torch.tensor([1.0, float("nan"), 0.0, 2.0, float("nan"), float("nan"), 3.0, 0.5], dtype=torch.float64)
    adv = grpo_advantages(rewards, group_size=4, scale_rewards=scale)
    expected = naive_advantages(rewards, torch.arange(8) // 4, scale)
    close(adv, expected, 1e-12, "advantages")
    assert adv[1] == 0 and adv[4] == 0 and adv[2] != 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_identical_rewards_give_exact_zero(dtype):
    values = [0.1, 0.7, 1 / 3, 123.456, -2.2]
    rewards = torch.tensor([v for v in values for _ in range(7)], dtype=dtype)
    for scale in ("group", "batch", "none"):
        adv = grpo_advantages(rewards, group_size=7, scale_rewards=scale)
        assert adv.dtype == dtype
        assert torch.equal(adv, torch.zeros_like(adv)), scale


def test_integer_rewards_and_group_of_one():
    adv = grpo_advantages(torch.tensor([1, 0, 1, 1]), group_size=1)
    assert adv.dtype == torch.float32 and torch.equal(adv, torch.zeros(4))
    adv = grpo_advantages(torch.tensor([1, 0, 0, 0]), group_size=4)
    close(adv, naive_advantages(torch.tensor([1.0, 0, 0, 0]), torch.zeros(4, dtype=torch.long)), 1e-6, "int")


@pytest.mark.parametrize("bad", [float("inf"), -float("inf")])
def test_infinite_reward_is_named_when_validating(bad):
    rewards = torch.ones(8)
    rewards[5] = bad
    with pytest.raises(ValueError, match=r"rewards\[5\]"):
        grpo_advantages(rewards, group_size=4, validate=True)
    with pytest.raises(ValueError, match=r"rewards\[5\]"):
        grpo_loss(torch.zeros(8, 3), torch.ones(8, 3), rewards=rewards, group_size=4, validate=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(group_size=3), "do not split into groups"),
    (dict(), "exactly one of group_size or group_ids"),
    (dict(group_size=2, group_ids=torch.zeros(8, dtype=torch.long)), "exactly one"),
    (dict(group_ids=torch.zeros(7, dtype=torch.long)), "one label per reward"),
    (dict(group_size=2, scale_rewards="std"), "scale_rewards must be one of"),
    (dict(group_size=0), "group_size must be an integer"),
])
def test_advantages_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        grpo_advantages(torch.randn(8), **kwargs)


# ----------------------------------------------------------------------------- grpo_loss


def _loss_vs_naive(backend, opts, seed=0, token_advantages=False, extra_inputs=None):
    """grpo_loss on ``token_data(seed)`` against the naive reference: loss, dlogp, every metric.
    ``extra_inputs(dtype)`` -> (op kwargs, reference kwargs) for tensors beyond the usual ones."""
    logp, old, ref, mask, adv = token_data(seed=seed)
    if token_advantages:  # per-token advantages: the row's, perturbed per token
        adv = adv[:, None] + 0.5 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(9),
                                               dtype=torch.float64)
    dtype = dtype_of(backend)
    op_extra, ref_extra = extra_inputs(dtype) if extra_inputs else ({}, {})
    x = logp.to(DEVICE, dtype).clone().requires_grad_()
    loss, metrics = grpo_loss(x, mask.to(DEVICE), advantages=adv.to(DEVICE, dtype),
                              old_per_token_logps=old.to(DEVICE, dtype), ref_per_token_logps=ref.to(DEVICE, dtype),
                              backend=backend, **op_extra, **opts)
    loss.backward()
    y = logp.clone().requires_grad_()
    expected, expected_metrics = naive_grpo_loss(y, mask, adv, old, ref, **ref_extra, **opts)
    expected.backward()
    assert torch.isfinite(loss) and loss.dtype == dtype and x.grad.dtype == dtype
    assert y.grad.abs().sum() > 0
    tol = tol_of(backend)
    close(loss, expected, tol, "loss")
    close(x.grad, y.grad, tol, "dlogp")
    check_metrics(metrics, expected_metrics, tol)
    assert torch.equal(x.grad[2].cpu(), torch.zeros_like(x.grad[2].cpu()))  # the fully masked row
    return metrics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type, level, beta, delta", list(itertools.product(
    LOSS_TYPES, ("token", "sequence"), (0.0, 0.04), (None, 1.5))))
def test_grpo_loss_matches_reference(backend, loss_type, level, beta, delta):
    _loss_vs_naive(backend, loss_options(loss_type, level, beta, delta))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_per_token_advantages(backend, loss_type, level):
    metrics = _loss_vs_naive(backend, loss_options(loss_type, level, 0.04, 1.5), token_advantages=True)
    assert metrics["ratio_max"] > metrics["ratio_min"] or level == "sequence"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_estimator, bias_correction", list(itertools.product(["k1", "k2", "k3"], [True, False])))
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_kl_estimators(backend, kl_estimator, bias_correction, level):
    metrics = _loss_vs_naive(backend, loss_options("bnpo", level, 0.04, None, kl_estimator=kl_estimator,
                                                   use_bias_correction_kl=bias_correction), seed=1)
    assert metrics["kl"] != 0


def test_default_kl_is_trl_bias_corrected_k3():
    # TRL 1.16: use_bias_correction_kl defaults to True (k3 times the ratio, gradient through it).
    logp, old, ref, mask, adv = token_data()
    x, y = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    loss, metrics = grpo_loss(x, mask, advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref, beta=0.04,
                              backend="torch")
    loss.backward()
    ratio = torch.exp(logp - old)
    k3 = torch.exp(ref - y) - (ref - y) - 1
    pg = -torch.min(torch.exp(y - old) * adv[:, None], torch.exp(y - old).clamp(0.8, 1.2) * adv[:, None])
    expected = ((pg + 0.04 * k3 * torch.exp(y - old)) * mask).sum() / mask.sum()
    expected.backward()
    close(loss, expected, 1e-12, "loss")
    close(x.grad, y.grad, 1e-12, "dlogp")
    close(metrics["kl"], (k3 * ratio * mask).sum() / mask.sum(), 1e-12, "kl")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type, mode", list(itertools.product(
    ("dapo", "grpo"), ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")))
    + [("vespo", "token_truncate"), ("vespo", "token_mask")])  # TRL: vespo takes token-level modes only
def test_vllm_importance_sampling_from_sampling_logprobs(backend, loss_type, mode):
    logp, old, *_ = token_data()
    sampling = old + 0.2 * torch.randn(old.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sampling[0, 3] = float("nan")  # a token the engine could not score: ratio 1 (TRL)
    mask = token_data()[3]
    clips = dict(vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=1.5)
    ratio = naive_importance_sampling_ratio(old, sampling, mask, mode, 0.5, 1.5)
    assert ratio.min() == 0 if mode.endswith("mask") else ratio.min() >= 0.5

    def inputs(dtype):
        return (dict(sampling_per_token_logps=sampling.to(DEVICE, dtype), vllm_importance_sampling_mode=mode, **clips),
                dict(importance_sampling_ratio=ratio, sampling_per_token_logps=sampling))

    _loss_vs_naive(backend, loss_options(loss_type, "token", 0.04, None), extra_inputs=inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sequence", [False, True])
def test_given_importance_sampling_ratio(backend, per_sequence):
    # TRL's inputs["importance_sampling_ratio"] (Liger's vllm_is_ratio, verl's rollout_is_weights).
    g = torch.Generator().manual_seed(6)
    ratio = torch.rand((5, 1) if per_sequence else (5, 37), generator=g, dtype=torch.float64) + 0.5

    def inputs(dtype):
        return dict(importance_sampling_ratio=ratio.to(DEVICE, dtype)), dict(importance_sampling_ratio=ratio)

    _loss_vs_naive(backend, loss_options("grpo", "sequence", 0.04, 1.5), extra_inputs=inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["dapo", "vespo", "sapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_off_policy_mask_and_entropy_mask(backend, loss_type, level):
    logp, old, _, mask, adv = token_data()
    g = torch.Generator().manual_seed(7)
    sampling = old + 0.5 * torch.rand(old.shape, generator=g, dtype=torch.float64)
    entropies = 3 * torch.rand(old.shape, generator=g, dtype=torch.float64)

    def inputs(dtype):
        tensors = dict(sampling_per_token_logps=sampling, entropies=entropies)
        # The mask's behaviour policy only: no importance-sampling correction from these log-probs.
        return ({k: v.to(DEVICE, dtype) for k, v in tensors.items()} | dict(vllm_importance_sampling_correction=False),
                tensors)

    opts = loss_options(loss_type, level, 0.04, None, off_policy_mask_threshold=0.1, top_entropy_quantile=0.6)
    ref = token_data()[2]
    with_masks, _ = naive_grpo_loss(logp, mask, adv, old, ref, **inputs(torch.float64)[1], **opts)
    without, _ = naive_grpo_loss(logp, mask, adv, old, ref, **loss_options(loss_type, level, 0.04, None))
    assert with_masks != without  # the masks change the loss on this data
    metrics = _loss_vs_naive(backend, opts, extra_inputs=inputs)
    assert "entropy" in metrics


def test_entropy_quantile_keeps_the_top_share():
    logp, old, _, mask, adv = token_data()
    entropies = torch.rand(logp.shape, dtype=torch.float64)
    x = logp.clone().requires_grad_()
    grpo_loss(x, mask, advantages=adv, top_entropy_quantile=0.25, entropies=entropies,  # on-policy: nothing clipped
              backend="torch")[0].backward()
    kept = (x.grad != 0) & mask
    share = kept.sum() / mask.sum()
    assert 0.2 < share <= 0.3 and entropies[kept].min() >= entropies[mask & ~kept].max()


def test_sequence_level_clip_metrics_count_sequences():
    # Two rows, one clipped high (A > 0, ratio 1.5) with 3 tokens, one unclipped with 1 token, and
    # a fully masked row: TRL counts sequences (1 of 3), not tokens (3 of 4).
    logp = torch.zeros(3, 3, dtype=torch.float64)
    old = torch.tensor([[-math.log(1.5)] * 3, [0.0] * 3, [0.0] * 3], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    for backend in BACKENDS:
        dtype = dtype_of(backend)
        _, metrics = grpo_loss(logp.to(DEVICE, dtype), mask.to(DEVICE), advantages=adv.to(DEVICE, dtype),
                               old_per_token_logps=old.to(DEVICE, dtype), importance_sampling_level="sequence",
                               backend=backend)
        close(metrics["clip_ratio/high_mean"], torch.tensor(1 / 3), 1e-6, "per-sequence high clip")
        close(metrics["clip_ratio/high_max"], torch.tensor(1.0), 1e-6, "high_max")
        close(metrics["clip_ratio/low_min"], torch.tensor(0.0), 1e-6, "low_min")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_clamp_on_log_ratios(backend):
    # TRL does not clamp log-ratios: a log-ratio of 25 gives ratio e^25 and its gradient (A < 0).
    logp = torch.tensor([[0.0, -1.0]], dtype=torch.float64)
    old = torch.tensor([[-25.0, -1.0]], dtype=torch.float64)
    adv = torch.tensor([-1.0], dtype=torch.float64)
    dtype = dtype_of(backend)
    x = logp.to(DEVICE, dtype).clone().requires_grad_()
    loss, metrics = grpo_loss(x, torch.ones(1, 2, device=DEVICE), advantages=adv.to(DEVICE, dtype),
                              old_per_token_logps=old.to(DEVICE, dtype), backend=backend)
    loss.backward()
    y = logp.clone().requires_grad_()
    expected, _ = naive_grpo_loss(y, torch.ones(1, 2), adv, old)
    expected.backward()
    close(loss, expected, 1e-6, "loss")
    close(x.grad, y.grad, 1e-6, "dlogp")
    assert x.grad[0, 0] > 1e10 and metrics["ratio_max"] > 1e10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "vespo"])
def test_num_items_in_batch_zero_tensor_is_clamped(backend, loss_type):
    dtype = dtype_of(backend)
    x = torch.randn(3, 5, dtype=dtype, device=DEVICE, requires_grad=True)
    loss, _ = grpo_loss(x, torch.zeros(3, 5, device=DEVICE), advantages=torch.randn(3, dtype=dtype, device=DEVICE),
                        loss_type=loss_type, num_items_in_batch=torch.tensor(0, device=DEVICE), backend=backend,
                        epsilon_high=1.2 if loss_type == "cispo" else None)
    loss.backward()
    assert loss.item() == 0 and torch.equal(x.grad, torch.zeros_like(x.grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_default_old_and_rewards_path(backend):
    logp, _, _, mask, _ = token_data(rows=6)
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0])  # second group: identical rewards
    dtype = dtype_of(backend)
    x = logp.to(DEVICE, dtype).clone().requires_grad_()
    loss, metrics = grpo_loss(x, mask.to(DEVICE), rewards=rewards.to(DEVICE), group_size=3, loss_type="grpo",
                              backend=backend)
    loss.backward()
    adv = naive_advantages(rewards, torch.arange(6) // 3)
    y = logp.clone().requires_grad_()
    expected, _ = naive_grpo_loss(y, mask, adv, loss_type="grpo")
    expected.backward()
    close(loss, expected, tol_of(backend), "loss")
    close(x.grad, y.grad, tol_of(backend), "dlogp")
    assert metrics["ratio_min"] == 1 and metrics["ratio_max"] == 1 and metrics["clip_ratio/region_mean"] == 0
    assert torch.equal(x.grad[3:].cpu(), torch.zeros(3, logp.shape[1], dtype=dtype))  # zero-variance group
    assert x.grad[:2].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_ratio_exactly_at_one_plus_and_minus_eps(backend):
    # epsilon = epsilon_high = 0 and old = logp: r = 1 = 1 - eps = 1 + eps_high exactly, for both
    # advantage signs. The boundary counts as unclipped: gradient -A * w, and nothing is clipped.
    logp, _, _, mask, adv = token_data()
    dtype = dtype_of(backend)
    x = logp.to(DEVICE, dtype).clone().requires_grad_()
    loss, metrics = grpo_loss(x, mask.to(DEVICE), advantages=adv.to(DEVICE, dtype),
                              old_per_token_logps=logp.to(DEVICE, dtype), epsilon=0.0, epsilon_high=0.0,
                              loss_type="bnpo", backend=backend)
    loss.backward()
    expected = torch.where(mask, -adv[:, None] / mask.sum(), 0.0)
    close(x.grad, expected, tol_of(backend), "dlogp at the clip boundary")
    assert metrics["clip_ratio/region_mean"] == 0


def test_ratio_at_the_clip_boundary_float64():
    # r exactly 1 + eps_high and exactly 1 - eps (eps = r - 1 is exact in float64): the torch
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
        loss, metrics = grpo_loss(x, mask, advantages=adv, old_per_token_logps=old, epsilon=eps_low,
                                  epsilon_high=eps_high, backend="torch")
        loss.backward()
        y = logp.clone().requires_grad_()
        naive_grpo_loss(y, mask, adv, old, epsilon=eps_low, epsilon_high=eps_high)[0].backward()
        close(x.grad, y.grad, 1e-15, "dlogp")
        close(x.grad, -sign * ratio / 3, 1e-15, "dlogp closed form")
        assert metrics["clip_ratio/region_mean"] == 0


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, inside the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_positions_may_hold_garbage(backend):
    logp, old, ref, mask, adv = token_data()
    dtype = dtype_of(backend)
    dirty = logp.clone()
    dirty[~mask] = float("nan")
    dirty[~mask & (torch.arange(logp.shape[1]) % 2 == 0)] = -float("inf")
    results = []
    for values in (logp, dirty):
        x = values.to(DEVICE, dtype).clone().requires_grad_()
        loss, metrics = grpo_loss(x, mask.to(DEVICE), advantages=adv.to(DEVICE, dtype),
                                  old_per_token_logps=old.to(DEVICE, dtype), ref_per_token_logps=ref.to(DEVICE, dtype),
                                  beta=0.04, importance_sampling_level="sequence", backend=backend)
        loss.backward()
        results.append((loss, x.grad, metrics["ratio_mean"]))
    for clean, garbage in zip(*results):
        assert torch.equal(clean, garbage)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_everything_masked_gives_zero_not_nan(backend, loss_type):
    dtype = dtype_of(backend)
    x = torch.randn(3, 5, dtype=dtype, device=DEVICE, requires_grad=True)
    loss, metrics = grpo_loss(x, torch.zeros(3, 5, device=DEVICE), advantages=torch.randn(3, dtype=dtype, device=DEVICE),
                              **loss_options(loss_type, "token", 0.0, None), backend=backend)
    loss.backward()
    assert loss.item() == 0 and torch.equal(x.grad, torch.zeros_like(x.grad))
    # TRL's nanmin / nanmax over no sequences are NaN; every other metric is finite.
    assert all(torch.isfinite(v) for k, v in metrics.items() if k not in ("clip_ratio/low_min", "clip_ratio/high_max"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "vespo"])
def test_micro_batches_with_global_token_count_sum_to_full_batch(backend, loss_type):
    logp, old, ref, mask, adv = token_data(rows=6)
    dtype = dtype_of(backend)
    opts = dict(loss_options(loss_type, "token", 0.04, None), backend=backend)
    args = [t.to(DEVICE, dtype) for t in (logp, old, ref, adv)]
    mask = mask.to(DEVICE)
    full_x = args[0].clone().requires_grad_()
    full, _ = grpo_loss(full_x, mask, advantages=args[3], old_per_token_logps=args[1], ref_per_token_logps=args[2],
                        **opts)
    full.backward()
    total = int(mask.sum())
    parts_x = args[0].clone().requires_grad_()
    parts = sum(
        grpo_loss(parts_x[rows], mask[rows], advantages=args[3][rows], old_per_token_logps=args[1][rows],
                  ref_per_token_logps=args[2][rows], num_items_in_batch=total, **opts)[0]
        for rows in (slice(0, 2), slice(2, 6))
    )
    parts.backward()
    close(parts, full, tol_of(backend), "sum of micro-batch losses")
    close(parts_x.grad, full_x.grad, tol_of(backend), "micro-batch gradients")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_packed_equals_padded(backend, level):
    logp, old, ref, mask, adv = token_data()
    dtype = dtype_of(backend)
    lengths = mask.sum(1)
    mask[:] = torch.arange(mask.shape[1]) < lengths[:, None]  # right-padded rows, as a packer sees them
    opts = dict(loss_options("dr_grpo", level, 0.04, 1.5), backend=backend)
    padded_x = logp.to(DEVICE, dtype).clone().requires_grad_()
    padded, padded_metrics = grpo_loss(padded_x, mask.to(DEVICE), advantages=adv.to(DEVICE, dtype),
                                       old_per_token_logps=old.to(DEVICE, dtype),
                                       ref_per_token_logps=ref.to(DEVICE, dtype), **opts)
    padded.backward()
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(DEVICE)
    packed_x = logp[mask].to(DEVICE, dtype).clone().requires_grad_()
    packed, packed_metrics = grpo_loss(
        packed_x, torch.ones_like(packed_x), advantages=adv.to(DEVICE, dtype),
        old_per_token_logps=old[mask].to(DEVICE, dtype), ref_per_token_logps=ref[mask].to(DEVICE, dtype),
        cu_seqlens=cu, **opts)
    packed.backward()
    close(packed, padded, tol_of(backend), "loss")
    close(packed_x.grad, padded_x.grad[mask.to(DEVICE)], tol_of(backend), "dlogp")
    check_metrics(packed_metrics, padded_metrics, tol_of(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_than_65535_tokens(backend):
    # One program per row on grid axis 0: a long call launches fine and matches the reference.
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(2, 40_000, generator=g, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    mask = torch.rand(logp.shape, generator=g) < 0.9
    adv = torch.tensor([0.7, -1.3], dtype=torch.float64)
    dtype = dtype_of(backend)
    x = logp.to(DEVICE, dtype).clone().requires_grad_()
    loss, _ = grpo_loss(x, mask.to(DEVICE), advantages=adv.to(DEVICE, dtype), old_per_token_logps=old.to(DEVICE, dtype),
                        importance_sampling_level="sequence", backend=backend)
    loss.backward()
    y = logp.clone().requires_grad_()
    expected, _ = naive_grpo_loss(y, mask, adv, old, importance_sampling_level="sequence")
    expected.backward()
    close(loss, expected, tol_of(backend), "loss")
    close(x.grad, y.grad, tol_of(backend), "dlogp")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_row_kernels_with_gpu_tiles(level):
    # The row kernels at the GPU's tile size (1024 tokens per iteration): rows of 2,100+ tokens
    # cross two tile boundaries, through the interpreter.
    g = torch.Generator().manual_seed(8)
    logp = -torch.rand(2, 2_200, generator=g, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    mask = torch.rand(logp.shape, generator=g) < 0.9
    adv = torch.tensor([0.7, -1.3], dtype=torch.float64)
    opts = loss_options("grpo", level, 0.04, 1.5)
    x = logp.float().to(DEVICE).requires_grad_()
    with gpu_tiles("sm90"):
        loss, metrics = grpo_loss(x, mask.to(DEVICE), advantages=adv.float().to(DEVICE),
                                  old_per_token_logps=old.float().to(DEVICE), ref_per_token_logps=ref.float().to(DEVICE),
                                  backend="triton", **opts)
        loss.backward()
    y = logp.clone().requires_grad_()
    expected, expected_metrics = naive_grpo_loss(y, mask, adv, old, ref, **opts)
    expected.backward()
    close(loss, expected, 2e-5, "loss")
    close(x.grad, y.grad, 2e-5, "dlogp")
    check_metrics(metrics, expected_metrics, 2e-5)


def test_low_precision_logprobs_through_triton():
    logp, old, _, mask, adv = token_data()
    for dtype in (torch.bfloat16, torch.float16):
        x = logp.to(DEVICE, dtype).clone().requires_grad_()
        loss, _ = grpo_loss(x, mask.to(DEVICE), advantages=adv.to(DEVICE, dtype),
                            old_per_token_logps=old.to(DEVICE, dtype), backend="triton")
        loss.backward()
        y = logp.to(dtype).double().requires_grad_()
        expected, _ = naive_grpo_loss(y, mask, adv.to(dtype).double(), old.to(dtype).double())
        expected.backward()
        assert loss.dtype == torch.float32 and x.grad.dtype == dtype
        close(loss, expected, 1e-5, f"{dtype} loss")
        close(x.grad, y.grad, 1e-2, f"{dtype} dlogp")  # one rounding of the gradient to the dtype


def test_grpo_loss_custom_op_and_compile():
    logp, old, ref, mask, adv = token_data()
    x = logp.float().requires_grad_()

    def fn(x):
        return grpo_loss(x, mask, advantages=adv.float(), old_per_token_logps=old.float(),
                         ref_per_token_logps=ref.float(), beta=0.04, importance_sampling_level="sequence",
                         backend="torch")[0]

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_grad = torch.autograd.grad(fn(x), x)[0]
    compiled_loss = compiled(x)
    close(compiled_loss, fn(x), 1e-6, "compiled loss")
    close(torch.autograd.grad(compiled_loss, x)[0], eager_grad, 1e-6, "compiled gradient")
    from pyfastrl.ops.grpo_loss import _loss_op

    cu = torch.arange(6, dtype=torch.int32) * logp.shape[1]
    args = (x.reshape(-1), old.float().reshape(-1), ref.float().reshape(-1), torch.rand(185), mask.reshape(-1), cu,
            adv.float().repeat_interleave(37), torch.full((5,), 0.01), "grpo", True, 0.2, 0.28, 1.5, 0.04, "k3", True,
            1.0, 1.05, "torch")
    torch.library.opcheck(_loss_op, args)


def test_grpo_loss_makes_no_host_sync(monkeypatch):
    # Default: no sync at all (the op can be captured in a CUDA graph); validate=True: one.
    logp, old, ref, mask, adv = token_data()
    sampling = old + 0.1
    entropies = torch.rand(logp.shape, dtype=torch.float64)
    kwargs = dict(advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref, beta=0.04,
                  sampling_per_token_logps=sampling, off_policy_mask_threshold=0.1, top_entropy_quantile=0.5,
                  entropies=entropies, loss_type="vespo", vllm_importance_sampling_mode="token_mask", backend="torch")
    packed_logp, packed_mask = logp[mask], torch.ones(int(mask.sum()))
    cu = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])
    x = logp.clone().requires_grad_()
    counter = SyncCounter(monkeypatch)
    loss, _ = grpo_loss(x, mask, **kwargs)
    loss.backward()
    assert counter.count == 0
    grpo_loss(packed_logp, packed_mask, advantages=adv, cu_seqlens=cu, validate=True, backend="torch")
    assert counter.count == 1
    counter.count = 0
    grpo_advantages(torch.randn(8), group_size=4)
    assert counter.count == 0


def _loss_call(**overrides):
    logp, old, ref, mask, adv = token_data()
    kwargs = dict(advantages=adv, old_per_token_logps=old, backend="torch")
    kwargs.update(overrides)
    return lambda: grpo_loss(kwargs.pop("per_token_logps", logp), kwargs.pop("completion_mask", mask), **kwargs)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(completion_mask=torch.ones(5, 36)), ValueError, "completion_mask has shape"),
    (dict(old_per_token_logps=torch.zeros(5, 36, dtype=torch.float64)), ValueError, "old_per_token_logps has shape"),
    (dict(ref_per_token_logps=torch.zeros(4, 37, dtype=torch.float64), beta=0.1), ValueError, "ref_per_token_logps"),
    (dict(advantages=torch.zeros(4, dtype=torch.float64)), ValueError, "advantages has shape"),
    (dict(advantages=None, rewards=torch.zeros(5)), ValueError, "need group_size"),
    (dict(advantages=None, rewards=torch.zeros(5), group_size=2), ValueError, "do not split"),
    (dict(rewards=torch.zeros(5), group_size=5), ValueError, "exactly one of advantages"),
    (dict(loss_type="ppo"), ValueError, "loss_type must be one of"),
    (dict(loss_type="dr_grpo"), ValueError, "pass max_completion_length"),
    (dict(importance_sampling_level="group"), ValueError, "importance_sampling_level"),
    (dict(kl_estimator="k4", beta=0.1, ref_per_token_logps=torch.zeros(5, 37)), ValueError, "kl_estimator"),
    (dict(beta=0.04), ValueError, "pass ref_per_token_logps"),
    (dict(epsilon=1.0), ValueError, "epsilon"),
    (dict(delta=0.9), ValueError, "delta"),
    (dict(num_items_in_batch=-1), ValueError, "num_items_in_batch"),
    (dict(top_entropy_quantile=0.5), ValueError, "pass entropies"),
    (dict(top_entropy_quantile=1.5, entropies=torch.zeros(5, 37)), ValueError, "top_entropy_quantile"),
    (dict(vllm_importance_sampling_mode="token"), ValueError, "vllm_importance_sampling_mode"),
    (dict(importance_sampling_ratio=torch.ones(5, 2)), ValueError, "importance_sampling_ratio has shape"),
    (dict(sampling_per_token_logps=torch.zeros(5, 37, dtype=torch.float64), old_per_token_logps=None), ValueError,
     "needs old_per_token_logps"),
    (dict(loss_type="vespo", sampling_per_token_logps=torch.zeros(5, 37, dtype=torch.float64)), ValueError,
     "token-level vllm_importance_sampling_mode"),
    (dict(use_bias_correction_kl=1), TypeError, "use_bias_correction_kl"),
    (dict(per_token_logps=torch.zeros(5, 37, dtype=torch.int64)), TypeError, "per_token_logps has dtype"),
    (dict(per_token_logps=torch.zeros(5, 37, dtype=torch.float64), backend="triton"), TypeError,
     "backend 'triton' supports"),
    (dict(per_token_logps=torch.zeros(185), completion_mask=torch.ones(185), old_per_token_logps=None), ValueError,
     "need cu_seqlens"),
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
def test_bad_cu_seqlens_when_validating(cu, match):
    x = torch.zeros(10)
    with pytest.raises(ValueError, match=match):
        grpo_loss(x, torch.ones(10), advantages=torch.zeros(len(cu) - 1), cu_seqlens=torch.tensor(cu), validate=True)
