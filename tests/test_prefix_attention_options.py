"""prefix_grouped_attention's softcap and sliding_window against the repeated-prefix computation
(F_naive with the same options), forward and backward; and the checks of the scalar arguments."""
import math

import numpy as np
import pytest
import torch

from conftest import DEVICE
from pyfastrl import PrefixGroupLayout, prefix_grouped_attention
from pyfastrl.kernels.prefix_attention import reference
from pyfastrl.kernels.prefix_attention.reference import repeated_prefix_attention
from pyfastrl.ops.prefix_attention import _forward_op
from test_prefix_attention import LAYOUTS, assert_close, make_inputs

# Backends tested with softcap / sliding_window (Triton through the interpreter on CPU).
SOFTCAP_WINDOW_BACKENDS = ["torch", "triton"]
# Input dtype and tolerance (vs float64 F_naive) per backend.
PRECISION = {"torch": (torch.float64, 1e-10), "triton": (torch.float32, 1e-4)}
HEAD_DIM = 16  # scale 1/4: scores of unit-normal q, k are ~N(0, 1), so softcap 0.5 and 3 both bind


def _options(softcap, window):
    return {"softcap": softcap, "sliding_window": window}


def _grouped(q, k, v, layout, grad_out, **kwargs):
    out = prefix_grouped_attention(q, k, v, layout, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def _repeated(q, k, v, layout, grad_out, softcap=None, sliding_window=None, softmax_scale=None):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = repeated_prefix_attention(q64, k64, v64, layout, scale, softcap=softcap, sliding_window=sliding_window)
    return (out, *torch.autograd.grad(out, (q64, k64, v64), grad_out.double()))


def _check(layout, gqa, backend, **options):
    dtype, tolerance = PRECISION[backend]
    q, k, v = make_inputs(layout, 4, 4 // gqa, HEAD_DIM, dtype)
    grad_out = torch.randn_like(q)
    got = _grouped(q, k, v, layout, grad_out, backend=backend, **options)
    want = _repeated(q, k, v, layout, grad_out, **options)
    assert_close(got, want, atol=tolerance, rtol=tolerance)
    return got


@pytest.mark.parametrize("backend", SOFTCAP_WINDOW_BACKENDS)
@pytest.mark.parametrize("softcap, window", [(0.5, None), (3.0, None), (None, 1), (None, 3), (None, 8), (0.5, 4),
                                             (3.0, 12)])
@pytest.mark.parametrize("name", ["ragged_many_groups", "prefix1", "suffix1", "multi_block"])
def test_options_equal_repeated_prefix(name, softcap, window, backend):
    """Windows of 1, shorter than the prompts (3, 8: the completions see only the prompt's tail or
    none of it), and up to longer than some sequences (12); caps that bind hard (0.5) and mildly."""
    layout = PrefixGroupLayout(*LAYOUTS[name], device=DEVICE)
    _check(layout, 2, backend, **_options(softcap, window))


@pytest.mark.parametrize("backend", SOFTCAP_WINDOW_BACKENDS)
@pytest.mark.parametrize("gqa", [1, 4])
def test_options_with_gqa(gqa, backend):
    layout = PrefixGroupLayout(*LAYOUTS["ragged_many_groups"], device=DEVICE)
    _check(layout, gqa, backend, **_options(1.5, 5))


@pytest.mark.parametrize("backend", SOFTCAP_WINDOW_BACKENDS)
def test_options_change_the_result_and_a_long_window_does_not(backend):
    """The tests above are not vacuous: each option changes every output; a window as long as the
    longest sequence changes nothing."""
    layout = PrefixGroupLayout(*LAYOUTS["ragged_many_groups"], device=DEVICE)
    dtype, tolerance = PRECISION[backend]
    q, k, v = make_inputs(layout, 4, 2, HEAD_DIM, dtype)
    plain = prefix_grouped_attention(q, k, v, layout, backend=backend)
    for options in (_options(0.5, None), _options(None, 3)):
        changed = prefix_grouped_attention(q, k, v, layout, backend=backend, **options)
        assert (changed - plain).abs().max() > 1e-2, options
    # Rows whose whole path fits in the window are unchanged: with W=3, the first 3 prompt tokens.
    windowed = prefix_grouped_attention(q, k, v, layout, backend=backend, sliding_window=3)
    torch.testing.assert_close(windowed[:3], plain[:3], atol=tolerance, rtol=0)
    longest = prefix_grouped_attention(q, k, v, layout, backend=backend, sliding_window=layout.longest_sequence)
    torch.testing.assert_close(longest, plain, atol=tolerance, rtol=0)


@pytest.mark.parametrize("window", [1, 2, 7])
def test_torch_backend_chunks_skip_keys_outside_the_window(monkeypatch, window):
    """A tiny score budget splits every segment into many query chunks; each chunk reads only the
    key rows inside its windows, and the prefix dK/dV still sum over all members."""
    monkeypatch.setattr(reference, "_CHUNK_SCORE_ELEMENTS", 96)
    layout = PrefixGroupLayout(*LAYOUTS["multi_block"], device=DEVICE)
    _check(layout, 2, "torch", **_options(2.0, window))


def test_chunk_rows_stay_within_the_budget():
    budget = reference._CHUNK_SCORE_ELEMENTS
    for heads, keys, window in [(32, 100_000, 4096), (1, 10**7, 16), (8, 5000, 1), (4, 300, 1000)]:
        rows = reference._chunk_rows(heads, keys, window)
        assert rows >= 1
        assert heads * rows * min(keys, rows + window - 1) <= budget
        assert heads * (rows + 1) * min(keys, rows + window) > budget  # the largest chunk that fits


def test_gradcheck_with_softcap_and_window():
    layout = PrefixGroupLayout([4, 2], [[3, 1], [4]], device=DEVICE)
    q, k, v = make_inputs(layout, 2, 1, 8, torch.float64)

    def fn(q, k, v):
        return prefix_grouped_attention(q, k, v, layout, backend="torch", softmax_scale=0.6, softcap=1.2,
                                        sliding_window=3)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_opcheck_and_compile_with_options():
    layout = PrefixGroupLayout(*LAYOUTS["ragged_many_groups"])
    q, k, v = make_inputs(layout, 4, 2, 16, torch.float32, device="cpu")
    blocks = layout.query_blocks(None)
    torch.library.opcheck(_forward_op, (q, k, v, blocks, blocks, blocks, 0.25, 2.0, 5, "torch"))

    def loss(q, k, v):
        return prefix_grouped_attention(q, k, v, layout, backend="torch", softcap=2.0, sliding_window=5).square().sum()

    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_numpy_and_integer_scalars_are_accepted():
    layout = PrefixGroupLayout(*LAYOUTS["prefix1"], device=DEVICE)
    q, k, v = make_inputs(layout, 2, 2, 8, torch.float64)
    want = prefix_grouped_attention(q, k, v, layout, backend="torch", softmax_scale=1.0, softcap=2.0, sliding_window=3)
    for scale, cap, window in [(np.float32(1.0), np.float64(2.0), np.int64(3)), (1, 2, np.int32(3)),
                               (np.int64(1), np.float16(2.0), 3)]:
        got = prefix_grouped_attention(q, k, v, layout, backend="torch", softmax_scale=scale, softcap=cap,
                                       sliding_window=window)
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"softcap": 0.0}, ValueError, "softcap must be a positive finite number, got 0.0"),
        ({"softcap": -1}, ValueError, "softcap must be a positive finite number, got -1"),
        ({"softcap": math.nan}, ValueError, "softcap must be a positive finite number, got nan"),
        ({"softcap": math.inf}, ValueError, "softcap must be a positive finite number"),
        ({"softcap": "50"}, TypeError, "softcap must be a real number"),
        ({"softcap": True}, TypeError, "softcap must be a real number"),
        ({"softcap": torch.tensor(50.0)}, TypeError, "softcap must be a real number"),
        ({"sliding_window": 0}, ValueError, "sliding_window must be an integer >= 1, got 0"),
        ({"sliding_window": -4}, ValueError, "sliding_window must be an integer >= 1, got -4"),
        ({"sliding_window": 4.0}, TypeError, "sliding_window must be an integer >= 1, got float"),
        ({"sliding_window": True}, TypeError, "sliding_window must be an integer >= 1, got bool"),
        ({"sliding_window": torch.tensor(4)}, TypeError, "sliding_window must be an integer >= 1, got Tensor"),
        ({"softmax_scale": 0}, ValueError, "softmax_scale must be a positive finite number, got 0"),
        ({"softmax_scale": np.float64(-0.5)}, ValueError, "softmax_scale must be a positive finite number"),
        ({"softmax_scale": math.inf}, ValueError, "softmax_scale must be a positive finite number"),
        ({"softmax_scale": None, "softcap": None, "sliding_window": np.float32(3)}, TypeError, "sliding_window"),
        ({"softmax_scale": "0.1"}, TypeError, "softmax_scale must be a real number"),
    ],
)
def test_bad_option_values_are_refused(options, error, match):
    layout = PrefixGroupLayout(*LAYOUTS["prefix1"], device=DEVICE)
    q, k, v = make_inputs(layout, 2, 2, 8, torch.float64)
    with pytest.raises(error, match=match):
        prefix_grouped_attention(q, k, v, layout, backend="torch", **options)
