"""The benchmark's peers must compute the same attention as our op, or its ratios mean nothing.
Timing needs a GPU; the set-up of every method is checked here on CPU (forward only: FlexAttention
has no CPU backward)."""
import importlib
import pathlib
import sys

import pytest
import torch

from pyfastrl import PrefixGroupLayout

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_benchmark(name):
    """A file of benchmarks/ as the harness imports it (a top-level module beside harness.py)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module(name)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("prefix_lens, suffix_lens", [
    ([20, 9], [[5, 7, 3], [4, 4]]),  # ragged: the naive batch and prefix-grouper's calls need padding
    ([12], [[6, 6, 6]]),  # the benchmark grid's shape: no padding (prefix-grouper's causal-bias path)
], ids=["ragged", "even"])
def test_prefix_attention_peers_compute_the_same_attention(prefix_lens, suffix_lens):
    bench = load_benchmark("prefix_attention")
    layout = PrefixGroupLayout(prefix_lens, suffix_lens)
    q = torch.randn(layout.total_tokens, 4, 16)
    k, v = torch.randn(2, layout.total_tokens, 2, 16)
    methods, skipped = bench.build_methods(layout, cuda=False, flex_compiled=False)
    assert set(methods) == {"pyfastrl", "sdpa_repeated", "flex", "prefix_grouper"}
    assert set(skipped) == {"sdpa_repeated_cudnn"}
    want = None
    for name, (prepare, fn, to_packed) in methods.items():
        got = to_packed(fn(prepare(q, 4), prepare(k, 4), prepare(v, 4)))
        want = got if want is None else want
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_prefix_attention_flex_mask_is_the_attention_rule():
    from test_layout import allowed_pairs

    bench = load_benchmark("prefix_attention")
    layout = PrefixGroupLayout([5, 17, 1], [[3, 9], [1, 20, 4], [6]])
    padded = layout.total_tokens + 7
    idx = torch.arange(padded)
    mask = bench.shared_prefix_mask_mod(layout, padded)(0, 0, idx[:, None], idx[None, :])
    total = layout.total_tokens
    assert torch.equal(mask[:total, :total], allowed_pairs(layout))
    assert not mask[total:, :total].any() and not mask[:total, total:].any()  # padding stays apart


def test_prefix_attention_useful_flops_follow_the_spec():
    bench = load_benchmark("prefix_attention")
    layout = PrefixGroupLayout([4096], [[512] * 16])
    assert bench.useful_flops(layout, 32, 128, backward=False) == 4 * 128 * 32 * layout.attention_pairs
    assert bench.useful_flops(layout, 32, 128, backward=True) == 3.5 * 4 * 128 * 32 * layout.attention_pairs


def test_model_step_token_ratio_bound_matches_spec_example():
    bench = load_benchmark("model_step")
    assert bench.token_ratio_bound(4096, 512, 16) == 73_728 / 12_288 == 6.0


@pytest.mark.parametrize("cuda", [False, pytest.param(True, marks=pytest.mark.gpu)], ids=["cpu", "cuda"])
def test_grpo_loss_methods_compute_the_same_loss_and_gradients(cuda):
    """Every method the benchmark times (Liger's too, where installed: the same dapo normalisation,
    over this call's valid tokens) computes the reference loss and gradients."""
    bench = load_benchmark("grpo_loss")
    inputs = bench.make_inputs(tokens=24, hidden=16, vocab=50, device=torch.device("cuda" if cuda else "cpu"),
                               dtype=torch.float32, row_length=8)
    methods, skipped = bench.build_methods(cuda=cuda)
    assert {"pyfastrl", "torch_unfused", "matmul_floor"} <= set(methods)
    assert set(methods) | set(skipped) >= {"liger_fused_linear", "liger_triton"}
    h, w = inputs[:2]
    results = {name: (fn(*inputs), torch.autograd.grad(fn(*inputs), (h, w))) for name, fn in methods.items()
               if name != "matmul_floor"}
    want_loss, want_grads = results["torch_unfused"]
    assert want_loss != 0
    for name, (loss, grads) in results.items():
        torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        for grad, want in zip(grads, want_grads):
            torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_grpo_loss_floor_is_three_matmuls():
    bench = load_benchmark("grpo_loss")
    assert bench.floor_flops(16384, 4096, 151_936) == 3 * 2 * 16384 * 4096 * 151_936


def test_lla_regression_quality_table_reproduces_the_spec():
    """The spec's fp64 measurement: linear map softmax 0.33, LLA 1.0e-6, global ridge 1.2e-6;
    tanh(2Ax) 0.234 / 0.086 / 0.100 (here fewer trials, so looser bounds)."""
    table = load_benchmark("lla").regression_quality(trials=60)
    linear, tanh = table["linear"], table["tanh(2Ax)"]
    assert linear["lla"] < 1e-5 and linear["global_ridge"] < 1e-5 and 0.15 < linear["softmax"] < 0.6
    assert tanh["lla"] < tanh["global_ridge"] < tanh["softmax"]


def test_lla_methods_compute_what_they_claim():
    """The LLA method is the op (torch backend on CPU), the softmax one is causal softmax attention."""
    bench = load_benchmark("lla")
    methods, skipped = bench.build_methods(32, cuda=False)
    assert set(methods) == {"pyfastrl", "sdpa_softmax"} and "pyfastrl_torch" in skipped
    q, k, v = torch.randn(3, 1, 32, 2, 16, dtype=torch.float64)
    from pyfastrl import local_linear_attention

    torch.testing.assert_close(methods["pyfastrl"](q, k, v), local_linear_attention(q, k, v, ridge_lambda=bench.RIDGE))
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / 4.0
    scores = scores.masked_fill(torch.ones(32, 32, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(methods["sdpa_softmax"](q, k, v), torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v))


# ----------------------------------------------------------------------------- work formulas


def test_prefix_attention_bytes_count_each_tensor_once():
    bench = load_benchmark("prefix_attention")
    layout = PrefixGroupLayout([3], [[2, 1]])  # 6 tokens
    # Hq=2, Hkv=1, D=4, 2-byte elements: q/o 6*2*4*2 = 96 B, k/v 48 B, LSE 6*2*4 = 48 B.
    assert bench.useful_bytes(layout, 2, 1, 4, 2, backward=False) == 2 * 96 + 2 * 48 + 48
    assert bench.useful_bytes(layout, 2, 1, 4, 2, backward=True) == (2 * 96 + 2 * 48 + 48) + (3 * 96 + 2 * 48 + 48) + (
        96 + 2 * 48)


def test_grpo_loss_bytes_count_inputs_and_gradients_once():
    bench = load_benchmark("grpo_loss")
    # 8 tokens in 2 rows, H=4, V=10, bf16: h and w read + their gradients written, 13 B/token, 4 B/row.
    assert bench.useful_bytes(8, 4, 10, 2, rows=2) == 2 * 2 * (8 * 4 + 10 * 4) + 8 * 13 + 2 * 4


def test_lla_flop_formulas():
    bench = load_benchmark("lla")
    assert bench.causal_pairs(4) == 10
    assert bench.softmax_flops(4, 2, 8, backward=False) == 4 * 8 * 2 * 10
    assert bench.softmax_flops(4, 2, 8, backward=True) == 3.5 * 4 * 8 * 2 * 10
    assert bench.lla_flops(4, 2, 8, cg_iterations=5, backward=False) == (12 + 20) * 8 * 2 * 10
    assert bench.lla_flops(4, 2, 8, cg_iterations=5, backward=True) == 3 * (12 + 20) * 8 * 2 * 10
    assert bench.lla_direct_flops(4, 1, 3, backward=False) == 10 * (18 + 18) + 4 * (9 + 18)
    assert bench.attention_bytes(4, 2, 8, 2, backward=True) == 12 * 4 * 2 * 8 * 2


def test_model_step_flops_count_the_models_own_parameters():
    """6 FLOPs per weight-matrix parameter of the layers per grouped token, the grouped rule's
    attention, and the LM head on completion positions only."""
    bench = load_benchmark("model_step")
    harness = load_benchmark("harness")
    runner = harness.Runner(torch.device("cpu"), quick=True, roofline=harness.Roofline(1.0, 1.0), cache_bytes=1)
    model, shape = bench.build_model(runner)
    matrices = sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)
    layout = PrefixGroupLayout([10], [[3, 3]])
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    attention = 3.5 * 4 * head_dim * shape["num_attention_heads"] * layout.attention_pairs * shape["num_hidden_layers"]
    without_head = bench.step_flops({**shape, "vocab_size": 0}, 10, 3, 2)
    assert without_head == pytest.approx(6.0 * matrices * layout.total_tokens + attention, rel=1e-12)
    assert bench.step_flops(shape, 10, 3, 2) - without_head == 6.0 * shape["hidden_size"] * shape["vocab_size"] * 6
    assert bench.step_bytes(model) == 3 * sum(p.numel() * 4 for p in model.parameters())


# ----------------------------------------------------------------------------- the harness


def test_roofline_bound_is_compute_or_memory():
    roofline = load_benchmark("harness").Roofline(matmul_tflops=100.0, copy_gbps=1000.0)
    assert roofline.bound_ms(flops=1e12, nbytes=1e6) == pytest.approx(10.0)  # compute-bound: 1e12 / 1e14 s
    assert roofline.bound_ms(flops=1.0, nbytes=1e9) == pytest.approx(1.0)  # memory-bound: 1e9 / 1e12 s


def test_input_sets_span_twice_the_cache_and_are_fresh():
    harness = load_benchmark("harness")
    runner = harness.Runner(torch.device("cpu"), quick=True, roofline=harness.Roofline(1.0, 1.0), cache_bytes=1000)

    def sets_of(floats):
        return runner.input_sets(lambda seed: (torch.randn(floats, generator=torch.Generator().manual_seed(seed)),))

    assert len(sets_of(125)) == 4  # 500 B each: 4 sets span 2 x 1000 B
    assert len(sets_of(1000)) == 1  # 4000 B: one set is enough
    small = sets_of(50)  # 200 B: 10 would be needed, capped
    assert len(small) == harness.MAX_SETS
    assert all(not torch.equal(a[0], b[0]) for a, b in zip(small, small[1:]))
    assert all(s[0].abs().min() > 0 for s in small)  # random, never zeros


def test_measure_reports_work_rates_and_records_failures():
    harness = load_benchmark("harness")
    runner = harness.Runner(torch.device("cpu"), quick=True, roofline=harness.Roofline(1.0, 1.0), cache_bytes=1)
    calls = []
    result = runner.measure(lambda x: calls.append(x), [(1,), (2,)], flops=2e9, nbytes=1e6)
    assert set(calls) == {1, 2}  # the input sets are rotated
    assert result["tflops"] == pytest.approx(2e9 / result["ms"] / 1e9)
    assert result["gbps"] == pytest.approx(1e6 / result["ms"] / 1e6)
    assert result["roofline_fraction"] == pytest.approx(runner.roofline.bound_ms(2e9, 1e6) / result["ms"])
    assert result["peak_extra_mib"] is None  # no allocator statistics on the CPU

    def crash(x):
        raise RuntimeError("kernel launch failed")

    def out_of_memory(x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert runner.measure(crash, [(1,)], flops=1, nbytes=1) == {"error": "RuntimeError: kernel launch failed"}
    assert runner.measure(out_of_memory, [(1,)], flops=1, nbytes=1) == {"error": "out of memory"}


def test_speedups_and_summary_rows():
    harness = load_benchmark("harness")
    case = {"params": {"P": 8}, "methods": {
        "ours": {"fwd_bwd": {"ms": 2.0, "roofline_fraction": 0.5}}, "naive": {"fwd_bwd": {"ms": 8.0}},
        "peer": {"fwd_bwd": {"ms": 4.0}}, "floor": {"fwd_bwd": {"ms": 1.0}}, "broken": {"fwd_bwd": {"error": "x"}}}}
    assert harness.speedups(case, "naive") == {"ours": 4.0, "naive": 1.0, "peer": 2.0, "floor": 8.0}
    plot = {"baseline": "naive", "ours": "ours", "not_peers": ("floor",)}
    (row,) = harness.summary_rows({"benchmark": "demo", "cases": [case]}, plot)
    assert row == {"benchmark": "demo", "case": "P=8", "ours_ms": 2.0, "speedup_over_baseline": 4.0,
                   "roofline_fraction": 0.5, "ours_vs_best_peer": 2.0, "best_peer": "peer"}


# ----------------------------------------------------------------------------- the command


def test_bench_without_gpu_says_so_and_exits_0(monkeypatch, capsys, tmp_path):
    from pyfastrl.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--out", str(tmp_path)]) == 0
    assert "no CUDA GPU is visible: nothing measured" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


def test_bench_help_and_unknown_case(capsys):
    from pyfastrl.cli import main

    with pytest.raises(SystemExit) as exit_help:
        main(["bench", "--help"])
    assert exit_help.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in ("prefix-attention", "prefix-tree", "grpo-loss", "grpo-loss-rows", "lla",
                                         "model-step", "layout", "attention-merge", "--quick", "--cpu"))
    with pytest.raises(SystemExit) as exit_unknown:
        main(["bench", "attention"])
    assert exit_unknown.value.code == 2
    assert ("invalid choice: 'attention' (choose from 'prefix-attention', 'prefix-tree', 'grpo-loss', "
            "'grpo-loss-rows', 'lla', 'model-step', 'layout', 'attention-merge', 'all')") in capsys.readouterr().err


def test_bench_all_on_cpu_writes_the_report_schema(tmp_path, capsys):
    """``pyfastrl bench all --cpu``: every case file end to end through the harness (torch backends,
    small sizes): the JSON of each, its plot, and the summary table printed last."""
    import json

    from pyfastrl.cli import main

    assert main(["bench", "all", "--cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    harness = load_benchmark("harness")
    cases = 0
    for name, stem in harness.CASE_FILES.items():
        report = json.loads((tmp_path / f"{stem}.json").read_text())
        cases += len(report["cases"])
        assert report["benchmark"] == name and report["device"] == "cpu"
        assert {"gpu", "torch", "triton", "transformers", "commit", "date", "config"} <= set(report)
        assert report["roofline"]["matmul_tflops"] > 0 and report["roofline"]["copy_gbps"] > 0
        plot = load_benchmark(stem).PLOT
        assert report["cases"]
        for case in report["cases"]:
            assert {"params", "work", "methods", "skipped"} <= set(case)
            assert plot["x"] in case["params"] and {plot["ours"], plot["baseline"]} <= set(case["methods"])
            for method, modes in case["methods"].items():
                measured = modes["fwd_bwd"]
                assert "error" not in measured, (name, method, measured)
                # Building a layout, the loss rows and the merges are counted in bytes only: TFLOP/s 0.
                assert measured["ms"] > 0 and measured["gbps"] > 0
                assert measured["tflops"] > 0 or name in ("layout", "grpo-loss-rows", "attention-merge")
                assert 0 < measured["roofline_fraction"] and measured["peak_extra_mib"] is None
        assert (tmp_path / f"{stem}.png").stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# pyfastrl bench: CPU")
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| benchmark")]
    assert len(rows) == cases  # one row per case of every case file
    assert out.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the summary table is printed last


def test_environment_record_names_versions_and_commit():
    env = load_benchmark("harness").environment()
    assert set(env) >= {"gpu", "torch", "triton", "transformers", "liger_kernel", "prefix_grouper", "commit", "date"}
    assert len(env["commit"]) == 40 or env["commit"] == "unknown"


def test_grpo_loss_rows_methods_agree_and_count_bytes_once():
    bench = load_benchmark("grpo_loss_rows")
    methods, skipped = bench.build_methods(cuda=False)
    assert set(methods) == {"pyfastrl", "torch_unfused"} and "pyfastrl_cuda" in skipped
    logp, old, ref, mask, cu, advantages = bench.make_inputs(4096, 512, "cpu", torch.float64, seed=0)
    inputs = (logp, old.double(), ref.double(), mask, cu, advantages.double())
    (grad,) = methods["pyfastrl"](*inputs)
    (expected,) = methods["torch_unfused"](*inputs)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, expected)
    # bf16 log-probs: read twice and their gradient written (2 bytes each), old and ref fp32 read
    # twice, the mask read twice, one fp32 advantage per row.
    assert bench.useful_bytes(1000, 10, 2) == 1000 * (6 + 16 + 2) + 40


def test_grpo_loss_rows_kernel_rows_compute_the_ops_gradient():
    # The row-kernel rows time the backends' kernels alone; through the torch backend they give the
    # op's partial loss sum and its gradient (row weights 1/N: the dapo loss of every valid token
    # over N tokens when all are valid).
    bench = load_benchmark("grpo_loss_rows")
    logp, old, ref, mask, cu, advantages = bench.make_inputs(2048, 256, "cpu", torch.float64, seed=1)
    mask = torch.ones_like(mask)
    inputs = (logp, old.double(), ref.double(), mask, cu, advantages.double())
    partials, dlogp = bench.row_kernels("torch")(*inputs)
    (op_grad,) = bench.build_methods(cuda=False)[0]["pyfastrl"](*inputs)
    torch.testing.assert_close(dlogp, op_grad)
    assert partials.shape == (8, 9) and partials[:, 1].sum() == 2048  # every token counted once


def test_prefix_tree_methods_compute_the_same_attention_and_count_tokens():
    bench = load_benchmark("prefix_tree")
    sequences, groups = bench.multi_turn_batch(2, 3, 2, 12, 3, 5)
    methods, skipped, tree = bench.build_methods(sequences, groups, "cpu", cuda=False)
    assert set(methods) == {"pyfastrl_tree", "pyfastrl_grouped", "sdpa_repeated"} and not skipped
    q = torch.randn(tree.total_tokens, 4, 16, dtype=torch.float64)
    k, v = torch.randn(2, tree.total_tokens, 2, 16, dtype=torch.float64)
    outputs = {name: to_tree(fn(prepare(q, 4), prepare(k, 4), prepare(v, 4)))
               for name, (prepare, fn, to_tree) in methods.items()}
    for name, out in outputs.items():
        torch.testing.assert_close(out, outputs["sdpa_repeated"], msg=name)
    # 8 conversations x 4 turns x 4 samples (prompt 200, user 50, reply 100): the batch.
    sequences, groups = bench.multi_turn_batch(8, 4, 4, 200, 50, 100)
    tree, grouped, _, token_index = bench.layouts(sequences, groups, "cpu")
    # per conversation: contexts 200, 350, 500, 650 (+100 per reply, 4 replies per turn)
    assert sum(map(len, sequences)) == 8 * 4 * (300 + 450 + 600 + 750) == 67_200 == grouped.repeated_tokens
    assert grouped.total_tokens == 8 * (600 + 750 + 900 + 1050) == 26_400
    assert tree.total_tokens == 8 * (200 + 4 * 4 * 100 + 3 * 50) == 15_600
    # the kept reply of turns 1-3 lies inside the next turn's paths: 3 leaves there, 4 in the last turn
    assert tree.num_leaves == 8 * (3 * 3 + 4) and len(token_index) == 128
    assert tree.repeated_tokens == 8 * (3 * (300 + 450 + 600) + 4 * 750) == 56_400


def _merged_in_float64(inputs):
    """The merge and row accumulation of one ``attention_merge.MergeInputs``, in float64."""
    t = [x.double() if x.is_floating_point() else x for x in inputs]
    out, lse, cross_out, cross_lse, rows, dq, cross_dq, dk, dv, cross_dk, cross_dv, prompt_rows = t
    merged_lse = torch.logaddexp(lse[:, rows], cross_lse)
    out[rows] = (torch.exp(lse[:, rows] - merged_lse).T[..., None] * out[rows]
                 + torch.exp(cross_lse - merged_lse).T[..., None] * cross_out)
    lse[:, rows] = merged_lse
    dq[rows] += cross_dq
    dk[prompt_rows] += cross_dk
    dv[prompt_rows] += cross_dv
    return out, lse, dq, dk, dv


def _run_merge_method(bench, kernels, inputs):
    copies = bench.MergeInputs(*(x.clone() for x in inputs))
    bench.steps(kernels)["fwd_bwd"](*copies)
    return copies.out, copies.lse, copies.dq, copies.dk, copies.dv


@pytest.mark.parametrize("cuda", [False, pytest.param(True, marks=pytest.mark.gpu)], ids=["cpu", "cuda"])
def test_attention_merge_methods_merge_and_accumulate_rows(cuda):
    bench = load_benchmark("attention_merge")
    methods, skipped = bench.build_methods(cuda=cuda)
    if cuda:
        assert {"pyfastrl_triton", "torch_indexing"} <= set(methods) and set(methods) | set(skipped) >= {"pyfastrl"}
    else:
        assert set(methods) == {"pyfastrl"} and set(skipped) == {"pyfastrl_triton", "torch_indexing"}
    inputs = bench.make_inputs(12, 5, 3, 4, 2, 64, "cuda" if cuda else "cpu", torch.float32, seed=0)
    want = _merged_in_float64(inputs)
    assert not torch.allclose(want[0], inputs.out.double())  # the merge changes the completion rows
    for name, kernels in methods.items():
        for got, expected in zip(_run_merge_method(bench, kernels, inputs), want):
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_attention_merge_bytes_count_each_tensor_once_and_copies_move_them():
    bench = load_benchmark("attention_merge")
    t = bench.make_inputs(12, 5, 3, 4, 2, 64, "cpu", torch.bfloat16, seed=0)
    rows, prompt = t.cross_rows, t.prompt_rows
    assert bench.merge_bytes(15, 4, 64, 2) == (2 * t.out[rows].nbytes + t.cross_out.nbytes + 2 * t.lse[:, rows].nbytes
                                               + t.cross_lse.nbytes + rows.nbytes)
    assert bench.add_rows_bytes(15, 4, 12, 2, 64, 2) == (
        2 * (t.dq[rows].nbytes + t.dk[prompt].nbytes + t.dv[prompt].nbytes) + t.cross_dq.nbytes + t.cross_dk.nbytes
        + t.cross_dv.nbytes + rows.nbytes + prompt.nbytes)
    nbytes = {"fwd": 100, "bwd": 60, "fwd_bwd": 160}
    copies, make = bench.copy_steps(nbytes, "cpu")
    for mode, step in copies.items():
        src, dst = make(0)
        src.fill_(1)
        step(src, dst)
        assert int(dst.sum()) == nbytes[mode] // 2  # half read, half written
