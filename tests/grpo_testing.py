"""Shared data and comparisons of the GRPO op tests (not a test module)."""
import torch

from pyfastrl.kernels.grpo_loss.reference import naive_token_logprobs

BACKENDS = ("torch", "triton")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


def dtype_of(backend):
    return torch.float64 if backend == "torch" else torch.float32


def tol_of(backend):
    # torch runs the closed forms in float64; Triton computes in fp32.
    return 1e-10 if backend == "torch" else 2e-5


def close(actual, expected, tol, what):
    """Max error within ``tol`` times the expected magnitude (at least 1); NaN must match NaN."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{what}: NaN where expected {expected} (got {actual})"
    actual, expected = actual[~nan], expected[~nan]
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} x {scale:.3g}"


def check_metrics(metrics, expected, tol, extra=()):
    """Every reference metric matches, and the op reports no other names (besides ``extra``)."""
    assert set(metrics) - set(extra) == set(expected) - set(extra), sorted(set(metrics) ^ set(expected))
    for name in expected:
        close(metrics[name], expected[name], tol, f"metric {name}")


def loss_options(loss_type, level, beta, delta, **extra):
    """Clip-higher (epsilon_high 0.28; cispo's cap 1.2) and the given options; dr_grpo's length."""
    opts = dict(loss_type=loss_type, importance_sampling_level=level, epsilon=0.2,
                epsilon_high=1.2 if loss_type == "cispo" else 0.28, delta=delta, beta=beta)
    if loss_type == "dr_grpo":
        opts["max_completion_length"] = 40
    opts.update(extra)
    return opts


def token_data(rows=5, length=37, seed=0):
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


def lm_data(rows=4, length=11, hidden=8, vocab=37, seed=0, temperature=1.0):
    """LM-head inputs; old/ref log-probs are the current ones at ``temperature`` plus N(0, 0.3) noise."""
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


class SyncCounter:
    """Counts the host-device synchronisation points a call makes (tensor -> Python value
    conversions and data-dependent shapes), by wrapping them; works on CPU."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def wrapped(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, wrapped)
        original_getitem = torch.Tensor.__getitem__

        def getitem(tensor, index, _original=original_getitem):
            indices = index if isinstance(index, tuple) else (index,)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.count += 1  # boolean indexing: the result's size is data-dependent
            return _original(tensor, index)

        monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)
        for name in ("nonzero", "unique", "masked_select"):
            original = getattr(torch, name)

            def wrapped(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(torch, name, wrapped)
