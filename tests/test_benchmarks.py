"""The benchmark's peers must compute the same attention as our op, or its ratios mean nothing.
Timing needs a GPU; the set-up of every method is checked here on CPU (forward only: FlexAttention
has no CPU backward)."""
import importlib.util
import pathlib
import sys

import pytest
import torch

from pyfastrl import PrefixGroupLayout

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_benchmark(name):
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))  # as when run as `python benchmarks/<name>.py`
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_prefix_attention_peers_compute_the_same_attention():
    bench = load_benchmark("prefix_attention")
    layout = PrefixGroupLayout([20, 9], [[5, 7, 3], [4, 4]])  # ragged: the naive batch needs padding
    q = torch.randn(layout.total_tokens, 4, 16)
    k, v = torch.randn(2, layout.total_tokens, 2, 16)
    methods = bench.build_methods(layout, q, k, v, flex_compiled=False)
    assert set(methods) == {"pyfastrl", "sdpa_repeated", "flex"}
    want = None
    for name, (inputs, fn, to_packed) in methods.items():
        got = to_packed(fn(*inputs))
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


def test_grpo_loss_methods_compute_the_same_loss_and_gradients():
    bench = load_benchmark("grpo_loss")
    inputs = bench.make_inputs(tokens=24, hidden=16, vocab=50, device=torch.device("cpu"), dtype=torch.float32,
                               row_length=8)
    methods, skipped = bench.build_methods(*inputs, backend="torch")
    assert {"pyfastrl", "torch_unfused", "matmul_floor"} <= set(methods)
    assert set(methods) | set(skipped) >= {"liger_fused_linear", "liger_triton"}
    h, w = (t.clone().requires_grad_() for t in inputs[:2])
    results = {name: (fn(h, w), torch.autograd.grad(fn(h, w), (h, w))) for name, fn in methods.items()
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


@pytest.mark.parametrize("name", ["prefix_attention", "model_step", "grpo_loss", "lla"])
def test_benchmarks_without_gpu_exit_cleanly(name, capsys):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only message")
    assert load_benchmark(name).main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_environment_record_names_versions_and_commit():
    env = load_benchmark("common").environment()
    assert set(env) >= {"gpu", "torch", "triton", "transformers", "commit", "date"}
    assert len(env["commit"]) == 40 or env["commit"] == "unknown"


def test_write_report_records_environment_config_and_cases(tmp_path, capsys):
    import json

    report = load_benchmark("common").write_report(str(tmp_path), "demo_case", {"dtype": "bfloat16"}, [{"n": 1}])
    written = json.loads((tmp_path / "demo_case.json").read_text())
    assert written == report
    assert written["benchmark"] == "demo_case" and written["config"] == {"dtype": "bfloat16"}
    assert written["cases"] == [{"n": 1}] and "commit" in written and "gpu" in written
    assert "demo_case.json" in capsys.readouterr().out


def test_a_failing_method_is_recorded_not_raised():
    common = load_benchmark("common")
    assert common.measure_or_record_failure(lambda: {"ms": 1.0}) == {"ms": 1.0}

    def crash():
        raise RuntimeError("kernel launch failed")

    assert common.measure_or_record_failure(crash) == {"error": "RuntimeError: kernel launch failed"}

    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert common.measure_or_record_failure(out_of_memory) == {"error": "out of memory"}
