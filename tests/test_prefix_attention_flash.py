"""The ``flash`` backend of prefix_grouped_attention: the composition (causal part + cross part,
merged through log-sum-exps; backward from the merged output and LSE) against the float64
repeated-prefix reference, its merge kernels against torch, and backend selection.

The CPU composition (PyTorch's CPU flash kernel) runs on every CI run; the merge kernels run
through Triton's interpreter without CUDA; GPU-marked tests compare the vendor composition with the
torch backend at realistic sizes.
"""
import contextlib

import pytest
import torch

from conftest import DEVICE
from pyfastrl import PrefixGroupLayout, prefix_grouped_attention
from pyfastrl._backend import BACKEND_ENV, FLASH_OR_TRITON, resolve_backend
from pyfastrl.kernels.launch_target import gpu_tiles
from pyfastrl.kernels.prefix_attention import flash
from test_prefix_attention import LAYOUTS, assert_close, grouped_and_grads, make_inputs, reference_and_grads

CPU = torch.device("cpu")
OP = "prefix_grouped_attention"
# Beyond the torch backend's test layouts: prompts long enough for separate CPU calls, several
# padded batches of segments, and groups sharing a prompt length (one cross call for them).
FLASH_LAYOUTS = {
    **LAYOUTS,
    "mixed_batches": ([300, 5, 5, 1, 5], [[200, 4, 90], [3, 1], [2, 2, 2], [1], [70]]),
}


@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("name", list(FLASH_LAYOUTS))
def test_cpu_float64_equals_repeated_prefix(name, gqa):
    layout = PrefixGroupLayout(*FLASH_LAYOUTS[name], device=CPU)
    q, k, v = make_inputs(layout, 4, 4 // gqa, 16, torch.float64, device=CPU)
    grad_out = torch.randn_like(q)
    got = grouped_and_grads(q, k, v, layout, grad_out, backend="flash")
    assert_close(got, reference_and_grads(q, k, v, layout, grad_out), atol=1e-10)


@pytest.mark.parametrize("name", ["ragged_many_groups", "mixed_batches"])
def test_cpu_float32_within_torch_backend_error(name):
    """fp32: the composition's error against float64 stays at the torch backend's (same inputs)."""
    layout = PrefixGroupLayout(*FLASH_LAYOUTS[name], device=CPU)
    q, k, v = make_inputs(layout, 8, 2, 32, torch.float32, device=CPU)
    grad_out = torch.randn_like(q)
    want = reference_and_grads(q, k, v, layout, grad_out)
    got = grouped_and_grads(q, k, v, layout, grad_out, backend="flash")
    plain = grouped_and_grads(q, k, v, layout, grad_out, backend="torch")
    for name, a, b, w in zip(("out", "dq", "dk", "dv"), got, plain, want):
        flash_err = (a.double() - w).abs().max().item()
        plain_err = (b.double() - w).abs().max().item()
        assert flash_err <= 4 * plain_err + 1e-6 * w.abs().max().item(), (name, flash_err, plain_err)
        assert flash_err < 1e-4 * max(1.0, w.abs().max().item()), (name, flash_err)


def test_cpu_non_contiguous_inputs_and_scale():
    layout = PrefixGroupLayout(*FLASH_LAYOUTS["mixed_batches"], device=CPU)
    t = layout.total_tokens
    # q, k, v as slices of one fused projection (row stride > Hq * D), and a transposed v.
    qkv = torch.randn(t, 4 + 2 + 2, 16, dtype=torch.float64)
    v = torch.randn(2, t, 16, dtype=torch.float64).transpose(0, 1)
    q, k, v = (x.detach().requires_grad_() for x in (qkv[:, :4], qkv[:, 4:6], v))
    assert not q.is_contiguous() and not v.is_contiguous()
    grad_out = torch.randn(t, 4, 16, dtype=torch.float64)
    got = grouped_and_grads(q, k, v, layout, grad_out, backend="flash", softmax_scale=0.3)
    assert_close(got, reference_and_grads(q, k, v, layout, grad_out, scale=0.3), atol=1e-10)


def test_cpu_bfloat16_close_to_reference():
    layout = PrefixGroupLayout(*FLASH_LAYOUTS["ragged_many_groups"], device=CPU)
    q, k, v = make_inputs(layout, 4, 2, 32, torch.bfloat16, device=CPU)
    grad_out = torch.randn_like(q)
    got = grouped_and_grads(q, k, v, layout, grad_out, backend="flash")
    assert all(g.dtype == torch.bfloat16 for g in got)
    assert_close(got, reference_and_grads(q, k, v, layout, grad_out), atol=6e-2, rtol=2e-2)


def test_cpu_compiles_without_graph_breaks():
    layout = PrefixGroupLayout(*FLASH_LAYOUTS["ragged_many_groups"], device=CPU)
    q, k, v = make_inputs(layout, 4, 2, 16, torch.float32, device=CPU)

    def loss(q, k, v):
        return prefix_grouped_attention(q, k, v, layout, backend="flash").square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    for a, b in zip(torch.autograd.grad(compiled(q, k, v), (q, k, v)), torch.autograd.grad(loss(q, k, v), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_cpu_schedule_batches_short_segments_and_equal_prompts():
    layout = PrefixGroupLayout(*FLASH_LAYOUTS["mixed_batches"], device=CPU)
    causal, cross = flash._schedule(layout.query_blocks(None)).cpu_calls()
    # Padded together: 300 and 200 (>= half the longest), 90 and 70, and the short rest (<= 16).
    assert [(rows.n, rows.length) for rows in causal] == [(2, 300), (2, 90), (11, 5)]
    # The three groups with a 5-token prompt share one cross call; 300 and 1 have their own.
    assert sorted((queries.n, keys.length) for queries, keys in cross) == [(1, 1), (1, 300), (3, 5)]
    assert sum(rows.n for rows in causal) == layout.num_groups + layout.num_members



# -- small layouts: whole groups (or the whole batch) as masked calls ------------------------------
# Around each threshold of flash.py (_CPU_MASKED_BATCH = 128 tokens, _CPU_MASKED_GROUP = 128,
# _CPU_MASKED_WASTE): the layout, and the regime its schedule must pick.
SMALL_LAYOUTS = {
    "batch_at_threshold": (([50, 30], [[10, 1, 9], [20, 8]]), "one_call"),  # 128 tokens
    "batch_past_threshold": (([50, 30], [[10, 1, 9], [20, 9]]), "masked_groups"),  # 129 tokens
    "group_at_threshold": (([100, 1], [[20, 8], [1]]), "masked_groups"),  # a 128-token group
    "wasteful_group_past_threshold": (([40, 1], [[30, 30, 29], [1]]), "composition"),  # 129, 46% waste
    "thrifty_group_past_threshold": (([100, 1], [[20, 9], [1]]), "masked_groups"),  # 129, 2% waste
    "thrifty_long_groups": (([200, 190, 3], [[8, 7, 6, 1], [5, 8], [1]]), "masked_groups"),
    "ragged_one_token_groups": (([1, 1, 2, 1], [[1], [1, 1], [3, 1], [1]]), "one_call"),
}


def regime(schedule) -> str:
    causal, cross = schedule.cpu_calls()
    if cross:
        assert all(rows.allowed is None for rows in causal)
        return "composition"
    assert all(rows.allowed is not None for rows in causal)
    whole = len(causal) == 1 and causal[0].n == 1 and causal[0].length == schedule.total_tokens
    return "one_call" if whole else "masked_groups"


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("name", list(SMALL_LAYOUTS))
def test_cpu_masked_regimes_equal_repeated_prefix(name, gqa, dtype, atol):
    spec, want_regime = SMALL_LAYOUTS[name]
    layout = PrefixGroupLayout(*spec, device=CPU)
    assert regime(flash._schedule(layout.query_blocks(None))) == want_regime
    q, k, v = make_inputs(layout, 4, 4 // gqa, 16, dtype, device=CPU)
    grad_out = torch.randn_like(q)
    got = grouped_and_grads(q, k, v, layout, grad_out, backend="flash")
    assert all(g.dtype == dtype for g in got)
    assert_close(got, reference_and_grads(q, k, v, layout, grad_out), atol=atol)


@pytest.mark.parametrize("forced", ["composition", "masked_groups", "one_call"])
@pytest.mark.parametrize("name", list(FLASH_LAYOUTS))
def test_cpu_every_regime_equals_repeated_prefix(name, forced, monkeypatch):
    """Each regime forced on every layout (thresholds moved), fp64 against the reference, GQA."""
    big = 10**9
    group, batch = {"composition": (0, 0), "masked_groups": (big, 0), "one_call": (big, big)}[forced]
    for constant, value in (("_CPU_MASKED_GROUP", group), ("_CPU_MASKED_GROUP_MAX", group),
                            ("_CPU_MASKED_BATCH", batch), ("_CPU_MASK_ELEMENTS", 1 << 20 if group else 0)):
        monkeypatch.setattr(flash, constant, value)
    layout = PrefixGroupLayout(*FLASH_LAYOUTS[name], device=CPU)
    schedule = flash._schedule(layout.query_blocks(None))
    assert regime(schedule) == forced or (forced == "masked_groups" and layout.num_groups == 1)
    q, k, v = make_inputs(layout, 4, 2, 16, torch.float64, device=CPU)
    grad_out = torch.randn_like(q)
    got = grouped_and_grads(q, k, v, layout, grad_out, backend="flash", softmax_scale=0.3)
    assert_close(got, reference_and_grads(q, k, v, layout, grad_out, scale=0.3), atol=1e-10)


def test_cpu_masked_group_batches_bound_the_mask(monkeypatch):
    """Groups of similar length share a masked call only while its mask fits _CPU_MASK_ELEMENTS."""
    monkeypatch.setattr(flash, "_CPU_MASKED_BATCH", 0)
    layout = PrefixGroupLayout([20, 20, 20, 6], [[4, 4], [3, 5], [8], [2]], device=CPU)  # groups 28, 28, 28, 8
    monkeypatch.setattr(flash, "_CPU_MASK_ELEMENTS", 2 * 28 * 28)
    causal, cross = flash._schedule(layout.query_blocks(None)).cpu_calls()
    assert cross == [] and [(rows.n, rows.length) for rows in causal] == [(2, 28), (1, 28), (1, 8)]
    assert all(rows.mask(torch.float32).numel() <= 2 * 28 * 28 for rows in causal)
    mask = causal[2].mask(torch.float64)  # the 6-token prompt and its 2-token completion
    assert mask.dtype == torch.float64 and mask.shape == (1, 1, 8, 8)
    allowed = torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.equal(mask[0, 0] == 0, allowed) and causal[2].mask(torch.float64) is mask  # built once


def test_cpu_masks_of_a_layout_stay_bounded(monkeypatch):
    """Past _CPU_MASKS_TOTAL mask elements in all, small groups run causal + cross calls instead."""
    monkeypatch.setattr(flash, "_CPU_MASKED_BATCH", 0)  # else 92 tokens are one call (at most 128^2 elements)
    spec = ([20, 20, 20, 6], [[4, 4], [3, 5], [8], [2]])  # groups of 28, 28, 28 and 8 tokens
    monkeypatch.setattr(flash, "_CPU_MASKS_TOTAL", 3 * 28 * 28 + 8 * 8)
    assert regime(flash._schedule(PrefixGroupLayout(*spec).query_blocks(None))) == "masked_groups"
    monkeypatch.setattr(flash, "_CPU_MASKS_TOTAL", 3 * 28 * 28 + 8 * 8 - 1)
    assert regime(flash._schedule(PrefixGroupLayout(*spec).query_blocks(None))) == "composition"


# -- the CUDA path's merge kernels (Triton; the interpreter without CUDA) ------------------------
def _tiles(target):
    """The GPU tile table of ``target`` ("sm80"/"sm90"), or the device's own for None."""
    return contextlib.nullcontext() if target is None else gpu_tiles(target)


# Under the GPU tables (64-row blocks) the row lists below span 2-3 blocks.
@pytest.mark.parametrize("target", [None, "sm80", "sm90"])
def test_merge_kernel_matches_torch_merge(target):
    from pyfastrl.kernels.prefix_attention import merge

    t, heads, head_dim = 170, 4, 24  # head dim not a power of two: masked columns
    out = torch.randn(t, heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    lse = torch.randn(heads, t, device=DEVICE)
    rows = torch.tensor([3, 5, 6, 7, 20, 21, 22] + list(range(30, 170)), device=DEVICE)
    cross_out = torch.randn(len(rows), heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    cross_lse = 5 * torch.randn(heads, len(rows), device=DEVICE)
    want_out, want_lse = flash._merged(out[rows], lse[:, rows], cross_out, cross_lse)
    got_out, got_lse = out.clone(), lse.clone()
    with _tiles(target):
        merge.merge_(got_out, got_lse, cross_out, cross_lse, rows)
    torch.testing.assert_close(got_lse[:, rows], want_lse)
    torch.testing.assert_close(got_out[rows], want_out.to(torch.bfloat16))
    untouched = torch.ones(t, dtype=torch.bool, device=DEVICE)
    untouched[rows] = False
    assert torch.equal(got_out[untouched], out[untouched]) and torch.equal(got_lse[:, untouched], lse[:, untouched])


@pytest.mark.parametrize("target", [None, "sm80", "sm90"])
def test_gradient_accumulation_kernel_matches_torch(target):
    from pyfastrl.kernels.prefix_attention import merge

    t, heads, kv_heads, head_dim = 300, 4, 2, 40
    dq, dk, dv = (torch.randn(t, h, head_dim, device=DEVICE) for h in (heads, kv_heads, kv_heads))
    q_rows = torch.tensor(list(range(10, 30)) + list(range(171, 300)), device=DEVICE)
    k_rows = torch.tensor(list(range(0, 10)) + list(range(30, 171)), device=DEVICE)
    cross_dq = torch.randn(len(q_rows), heads, head_dim, device=DEVICE)
    cross_dk, cross_dv = (torch.randn(len(k_rows), kv_heads, head_dim, device=DEVICE) for _ in range(2))
    want = [x.clone() for x in (dq, dk, dv)]
    want[0][q_rows] += cross_dq
    want[1][k_rows] += cross_dk
    want[2][k_rows] += cross_dv
    with _tiles(target):
        merge.add_rows_(dq, cross_dq, q_rows, dk, dv, cross_dk, cross_dv, k_rows)
    for got, expected in zip((dq, dk, dv), want):
        torch.testing.assert_close(got, expected)


# -- backend selection ---------------------------------------------------------------------------
def test_auto_picks_flash_on_cpu_and_torch_where_flash_does_not_apply(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(OP, "auto", CPU, dtype=torch.float32, head_dim=16) == "flash"
    assert resolve_backend(OP, "auto", CPU, dtype=torch.float64, head_dim=16) == "flash"
    assert resolve_backend(OP, "auto", CPU, dtype=torch.float32, head_dim=16, softcap=30.0) == "torch"
    assert resolve_backend(OP, "auto", CPU, dtype=torch.float32, head_dim=16, sliding_window=64) == "torch"
    assert resolve_backend("grpo_loss", "auto", CPU) == "torch"  # ops without a flash backend
    monkeypatch.setenv(BACKEND_ENV, "flash")
    assert resolve_backend("grpo_loss", "auto", CPU) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert resolve_backend(OP, "auto", CPU, dtype=torch.float32, head_dim=16) == "torch"


def test_flash_refusals_name_the_problem_and_the_alternative(monkeypatch):
    with pytest.raises(ValueError, match="grpo_loss: has no 'flash' backend"):
        resolve_backend("grpo_loss", "flash", CPU)
    with pytest.raises(ValueError, match="soft-capping and sliding windows.*backend='torch'"):
        resolve_backend(OP, "flash", CPU, dtype=torch.float32, head_dim=16, softcap=30.0)
    assert "torch.float32" in flash.unsupported_reason(torch.float32, 64, torch.device("cuda"))
    assert flash.unsupported_reason(torch.bfloat16, 72, torch.device("cuda")) is None
    assert "D=260" in flash.unsupported_reason(torch.bfloat16, 260, torch.device("cuda"))
    assert "D=60" in flash.unsupported_reason(torch.bfloat16, 60, torch.device("cuda"))
    monkeypatch.setattr(flash, "primitive_unavailable_reason", lambda device: "no kernel here")
    layout = PrefixGroupLayout([2], [[1]])
    q, k, v = make_inputs(layout, 2, 2, 16, torch.float32, device=CPU)
    with pytest.raises(RuntimeError, match="backend 'flash' is not available: no kernel here"):
        prefix_grouped_attention(q, k, v, layout, backend="flash")
    assert resolve_backend(OP, "auto", CPU, dtype=torch.float32, head_dim=16) == "torch"


def test_auto_reaches_the_flash_kernel_on_cpu(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    layout = PrefixGroupLayout([3], [[2, 1]])
    q, k, v = make_inputs(layout, 2, 2, 16, torch.float32, device=CPU)
    calls, original = [], flash.forward
    monkeypatch.setattr(flash, "forward", lambda *args: calls.append("flash") or original(*args))
    prefix_grouped_attention(q, k, v, layout)
    assert calls == ["flash"]


# -- GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("prefix,suffix,group,head_dim", [
    (2048, 256, 4, 128), (4096, 512, 16, 128), (8192, 2048, 4, 64), (2048, 1024, 16, 64)])
def test_gpu_flash_matches_torch_backend_bfloat16(prefix, suffix, group, head_dim):
    g = torch.Generator().manual_seed(prefix + group)
    suffixes = [int(s) for s in torch.randint(suffix // 2, suffix + 1, (group,), generator=g)]
    layout = PrefixGroupLayout([prefix, prefix // 2], [suffixes, suffixes[: max(1, group // 2)]], device="cuda")
    q, k, v = make_inputs(layout, 8, 2, head_dim, torch.bfloat16, device="cuda")
    grad_out = torch.randn_like(q)
    # The exact answer: the torch backend in fp32 on the same (bf16-valued) inputs.
    exact = grouped_and_grads(*(t.detach().float().requires_grad_() for t in (q, k, v)), layout, grad_out.float(),
                              backend="torch")
    got = grouped_and_grads(q, k, v, layout, grad_out, backend="flash")
    plain = grouped_and_grads(q, k, v, layout, grad_out, backend="torch")
    for name, a, b, w in zip(("out", "dq", "dk", "dv"), got, plain, exact):
        flash_err = (a.float() - w).abs().max().item()
        plain_err = (b.float() - w).abs().max().item()
        bound = 2 * plain_err + torch.finfo(torch.bfloat16).eps * w.abs().max().item()
        assert flash_err <= bound, (name, flash_err, plain_err)


@pytest.mark.gpu
def test_gpu_auto_follows_the_measured_table(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    from pyfastrl.kernels.launch_target import tile_target

    cuda = torch.device("cuda")
    assert resolve_backend(OP, "auto", cuda, dtype=torch.bfloat16, head_dim=128) == FLASH_OR_TRITON.get(
        (tile_target(cuda), torch.bfloat16, 128), "flash")
    for measured in ("flash", "triton"):
        monkeypatch.setitem(FLASH_OR_TRITON, (tile_target(cuda), torch.bfloat16, 128), measured)
        assert resolve_backend(OP, "auto", cuda, dtype=torch.bfloat16, head_dim=128) == measured
    assert resolve_backend(OP, "auto", cuda, dtype=torch.float32, head_dim=128) == "triton"  # flash: fp16/bf16


# -- pyfastrl train --compare-grouping ------------------------------------------------------------
def test_compare_grouping_prints_token_and_time_ratios(tmp_path, capsys):
    from pyfastrl.cli import main

    assert main(["train", "--compare-grouping", "--max-steps", "2", "--output-dir", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "compared over 2 steps" in printed
    tokens = printed.split("tokens through the model:")[1].split("\n")[0]
    assert "6.5" in tokens.split("(")[1]  # the default task's token ratio, about 6.5x
    assert "faster end to end (median per-step ratio" in printed
    assert main(["train", "--compare-grouping", "--no-grouping", "--max-steps", "1",
                 "--output-dir", str(tmp_path / "b")]) == 2
    assert "leave out --no-grouping" in capsys.readouterr().err


def test_info_reports_the_flash_backend(capsys):
    from pyfastrl.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "flash   available" in out and "auto    -> " in out.split("prefix_grouped_attention also has:")[1]
