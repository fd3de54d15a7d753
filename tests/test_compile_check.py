"""The compile check (benchmarks/compile_check.py): the full check over every op's launches (marker
``compile``: minutes on 2 cores), and fast tests of its parsers, rules and recorder on synthetic
inputs and tiny kernels."""
import importlib
import pathlib
import sys
import textwrap

import pytest
import torch

if torch.cuda.is_available():
    # compile_record must import pyfastrl's kernels under the Triton interpreter, so it sets
    # TRITON_INTERPRET=1 in this process: on a GPU machine every kernel imported after it (in any
    # test of this pytest process) would run interpreted. The check needs no GPU; CI runs it.
    pytest.skip("the compile check runs on CPU-only machines (it switches this process to Triton's interpreter)",
                allow_module_level=True)

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

compile_check = importlib.import_module("compile_check")
compile_inspect = importlib.import_module("compile_inspect")
compile_record = importlib.import_module("compile_record")


@pytest.mark.compile
def test_every_launch_compiles_fits_and_uses_tensor_cores(tmp_path):
    report = compile_check.run(out=str(tmp_path), progress=lambda *a, **k: None)
    failures = [f"{r['kernel']} [{r['config']}] {r['target']}: " + "; ".join(v["message"] for v in r["violations"])
                for r in report["rows"] if r["violations"]]
    refused = [f"{name}: {message}" for name, message in report["refused"].items()]
    assert not failures and not refused, "\n".join(
        [f"{len(failures)} of {len(report['rows'])} launches break a rule (table: {tmp_path}/compile_check.md):"]
        + failures + refused)
    assert report["summary"]["launches"] > 100  # the grid was recorded, not silently emptied


# ----------------------------------------------------------------------------- parsers

RESOURCE_USAGE = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function _forward_kernel:
  REG:255 STACK:744 SHARED:1024 LOCAL:16 CONSTANT[0]:632 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_resource_usage_is_read_from_cuobjdump_output():
    assert compile_inspect.parse_resource_usage(RESOURCE_USAGE) == {"reg": 255, "stack": 744, "shared": 1024,
                                                                    "local": 16}
    with pytest.raises(ValueError, match="no function"):
        compile_inspect.parse_resource_usage("Resource usage:\n Common:\n  GLOBAL:0\n")


def test_sass_counts_tensor_core_and_local_memory_opcodes():
    sass = """
        /*0a20*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0a30*/              @!P0 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0a40*/                   STL.64 [R1+0x8], R2 ;
        /*0a50*/                   LDL R3, [R1+0x8] ;
        /*0a60*/                   FFMA R1, R2, R3, R4 ;
        /*0a70*/                   HMMA.1688.F32.TF32 R4, R8, R12, R4 ;
    """
    assert compile_inspect.count_sass(sass) == {"HGMMA": 1, "HMMA": 2, "LDL": 1, "STL": 1}


TTGIR = textwrap.dedent("""\
    #blocked = #ttg.blocked<{sizePerThread = [1, 4], threadsPerWarp = [4, 8], warpsPerCTA = [4, 1], order = [1, 0]}>
    #mma = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 8]}>
    #mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 64, 16]}>
    module {
      %a = tt.dot %x, %y, %z, inputPrecision = tf32 : tensor<64x32xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma, kWidth = 2}>> * tensor<32x64xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma, kWidth = 2}>> -> tensor<64x64xf32, #mma> loc(#loc7)
      %b = tt.dot %x, %y, %z, inputPrecision = tf32 : tensor<64x32xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma, kWidth = 2}>> * tensor<32x64xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma, kWidth = 2}>> -> tensor<64x64xf32, #mma> loc(#loc7)
      %c = tt.dot %x, %y, %z, inputPrecision = ieee : tensor<32x16xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<16x32xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<32x32xf32, #blocked> loc(#loc3)
      %d = ttng.warp_group_dot %x, %y, %z {inputPrecision = 0 : i32, isAsync = true} : !ttg.memdesc<128x64xf16, #shared, #smem> * !ttg.memdesc<64x32xf16, #shared1, #smem> -> tensor<128x32xf32, #mma1> loc(#loc9)
      %e:4 = ttng.warp_group_dot_wait %d, %x {pendings = 0 : i32} : tensor<128x32xf32, #mma1> loc(#loc9)
    }
    #loc1 = loc("/src/kernels/attention_common.py":20:15)
    #loc2 = loc("/src/kernels/prefix_attention/kernel.py":110:12)
    #loc3 = loc("/src/kernels/grpo_loss/kernel.py":42:7)
    #loc6 = loc("s"(#loc2))
    #loc7 = loc(callsite(#loc1 at #loc6))
    #loc9 = loc("/src/kernels/local_linear_attention/kernel.py":99:3)
    """)


def test_dots_are_classified_by_engine_with_their_source_location():
    dots = {d["where"]: d for d in compile_inspect.parse_dots(TTGIR)}
    assert set(dots) == {"attention_common.py:20 < kernel.py:110", "kernel.py:42", "kernel.py:99"}
    inlined = dots["attention_common.py:20 < kernel.py:110"]
    assert (inlined["engine"], inlined["dtype"], inlined["m"], inlined["n"], inlined["k"], inlined["count"]) == (
        "mma.sync", "bf16", 64, 64, 32, 2)
    assert (dots["kernel.py:42"]["engine"], dots["kernel.py:42"]["precision"]) == ("fma", "ieee")
    assert (dots["kernel.py:99"]["engine"], dots["kernel.py:99"]["m"], dots["kernel.py:99"]["n"]) == ("wgmma", 128, 32)


# ----------------------------------------------------------------------------- rules


def _result(**overrides):
    result = {"registers": 128, "stack": 0, "local": 0, "shared": 32 * 1024, "num_warps": 4, "num_stages": 2,
              "sass": {"HGMMA": 8, "HMMA": 0, "LDL": 0, "STL": 0}, "dots": [], "seconds": 1.0}
    return {**result, **overrides}


def _dot(engine, m=128, n=64, dtype="bf16"):
    return {"where": "kernel.py:1", "dtype": dtype, "m": m, "n": n, "k": 64, "engine": engine, "precision": "",
            "count": 1}


def _rules(target, dtypes, result):
    return [rule for rule, _ in compile_check.violations(target, dtypes, result)]


def test_rules_flag_errors_spills_shared_memory_and_dots_off_tensor_cores():
    bf16 = ["bfloat16", "float32"]
    assert _rules("sm90", bf16, {"error": "CompilationError: loop-carried type changed"}) == ["compile"]
    assert _rules("sm90", bf16, _result(dots=[_dot("wgmma")])) == []
    assert _rules("sm80", bf16, _result(stack=280)) == ["spill"]
    assert _rules("sm80", bf16, _result(local=8)) == ["spill"]
    assert _rules("sm80", ["float32"], _result(stack=280)) == []  # fp32 kernels may spill
    assert _rules("sm80", bf16, _result(shared=182 * 1024)) == ["shared"]  # A100: 163 KB
    assert _rules("sm90", bf16, _result(shared=182 * 1024)) == []  # H100: 227 KB
    assert _rules("sm90", bf16, _result(shared=228 * 1024)) == ["shared"]
    assert _rules("sm80", ["float32"], _result(dots=[_dot("fma", dtype="f32")])) == ["tensor-core"]
    assert _rules("sm80", bf16, _result(dots=[_dot("mma.sync")])) == []


def test_wgmma_is_required_on_sm90_only_where_the_tile_allows_it():
    bf16 = ["bfloat16"]
    assert _rules("sm90", bf16, _result(dots=[_dot("mma.sync", m=128)])) == ["wgmma"]
    assert _rules("sm90", bf16, _result(dots=[_dot("mma.sync", m=32)])) == []  # < 64 rows: mma.sync by design
    assert _rules("sm90", bf16, _result(dots=[_dot("mma.sync", m=64)], num_warps=2)) == []  # no full warpgroup
    assert _rules("sm80", bf16, _result(dots=[_dot("mma.sync", m=128)])) == []


def test_exceptions_turn_a_matching_violation_into_an_accepted_one():
    launch = compile_record.Launch("pyfastrl.kernels.prefix_attention.kernel:_forward_kernel",
                                   (("Q", ("tensor", "bfloat16", True)), ("BLOCK_M", ("value", 128))),
                                   (("num_warps", 4),), frozenset({"BLOCK_M"}))
    spilling = _result(stack=64)
    assert compile_check.evaluate(launch, "sm80", spilling, [], exceptions=[])["verdict"] == "FAIL"
    allowed = compile_check.RuleException("prefix_attention._forward_kernel", "BLOCK_M=128", "sm80", "spill",
                                          "because")
    row = compile_check.evaluate(launch, "sm80", spilling, [], exceptions=[allowed])
    assert (row["verdict"], row["excepted"][0]["reason"]) == ("ok (excepted)", "because")
    other_target = compile_check.evaluate(launch, "sm90", spilling, [], exceptions=[allowed])
    assert other_target["verdict"] == "FAIL"


def test_ctas_per_sm_follow_registers_shared_memory_and_warps():
    assert compile_check.ctas_per_sm("sm80", 255, 8, 0) == (1, "registers")  # 256 x 256 threads = 64K
    assert compile_check.ctas_per_sm("sm80", 128, 4, 0) == (4, "registers")
    assert compile_check.ctas_per_sm("sm80", 32, 4, 80 * 1024) == (2, "shared")  # 164 KB / 81 KB
    assert compile_check.ctas_per_sm("sm90", 32, 4, 80 * 1024) == (2, "shared")  # 228 KB / 81 KB
    assert compile_check.ctas_per_sm("sm90", 32, 4, 60 * 1024) == (3, "shared")
    assert compile_check.ctas_per_sm("sm80", 16, 1, 0)[0] == 32  # CTA slots


# ----------------------------------------------------------------------------- recorder and compiler


def test_recorder_records_gpu_tiles_without_running_the_kernels():
    import torch

    import pyfastrl

    layout = pyfastrl.PrefixGroupLayout([40], [[19, 7]])
    q = torch.randn(layout.total_tokens, 4, 128, dtype=torch.bfloat16)
    k, v = torch.randn(2, layout.total_tokens, 2, 128, dtype=torch.bfloat16)
    with compile_record.recording("sm90") as launches:
        out = pyfastrl.prefix_grouped_attention(q, k, v, layout, backend="triton")
    assert out.abs().sum() == 0  # nothing ran: the zero-filled output buffer
    (launch,) = launches
    params = dict(launch.params)
    assert launch.name == "forward_kernel"
    assert params["Q"] == ("tensor", "bfloat16", True) and params["LSE"][1] == "float32"
    assert params["num_tokens"] == ("value", layout.total_tokens)
    # The GPU table's tiles, not the interpreter's 16-row ones.
    assert params["BLOCK_M"][1] >= 64 and params["BLOCK_D"] == ("value", 128)
    assert dict(launch.options)["num_warps"] >= 4
    # Outside the block, kernels run again.
    assert not torch.equal(pyfastrl.prefix_grouped_attention(q, k, v, layout, backend="triton"), out)


def test_launch_key_dedupes_runtime_integers_by_specialisation_class():
    def launch(num_tokens, block):
        return compile_record.Launch("m:f", (("n", ("value", num_tokens)), ("BLOCK", ("value", block))), (),
                                     frozenset({"BLOCK"}))

    assert launch(75, 64).key() == launch(91, 64).key()  # both i32, not 1, not divisible by 16
    assert launch(75, 64).key() != launch(96, 64).key()  # divisible by 16: another specialisation
    assert launch(75, 64).key() != launch(1, 64).key()
    assert launch(75, 64).key() != launch(2**40, 64).key()  # i64
    assert launch(75, 64).key() != launch(75, 128).key()  # constexprs by value


TINY_KERNELS = '''
import triton
import triton.language as tl


@triton.jit
def matmul(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.arange(0, M)
    cols = tl.arange(0, N)
    red = tl.arange(0, K)
    a = tl.load(A + rows[:, None] * K + red[None, :])
    b = tl.load(B + red[:, None] * N + cols[None, :])
    c = tl.dot(a, b, input_precision=PRECISION)
    tl.store(C + rows[:, None] * N + cols[None, :], c)
'''


def _tiny(dtype, m, n, k, precision, num_warps, target):
    pointer = ("tensor", dtype, True)
    params = (("A", pointer), ("B", pointer), ("C", ("tensor", "float32", True)), ("M", ("value", m)),
              ("N", ("value", n)), ("K", ("value", k)), ("PRECISION", ("value", precision)))
    return ("tiny_kernels:matmul", params, (("num_warps", num_warps),), target)


def test_tiny_kernels_compile_and_are_judged(tmp_path, monkeypatch):
    (tmp_path / "tiny_kernels.py").write_text(TINY_KERNELS)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers start with this process's sys.path
    tasks = [
        _tiny("bfloat16", 64, 64, 64, "tf32", 4, "sm90"),  # clean: wgmma
        _tiny("bfloat16", 64, 64, 64, "tf32", 4, "sm80"),  # clean: mma.sync
        _tiny("float32", 64, 64, 64, "ieee", 4, "sm80"),  # IEEE fp32: FMA
        _tiny("bfloat16", 256, 256, 64, "tf32", 1, "sm80"),  # 256x256 fp32 accumulator in one warp: spills
    ]
    results = compile_check.compile_all(tasks, jobs=2, progress=lambda *a, **k: None)
    assert all("error" not in r for r in results), results
    wgmma, mma, fma, spill = results
    assert _rules("sm90", ["bfloat16"], wgmma) == [] and wgmma["sass"]["HGMMA"] > 0
    assert [d["engine"] for d in wgmma["dots"]] == ["wgmma"]
    assert _rules("sm80", ["bfloat16"], mma) == [] and mma["sass"]["HMMA"] > 0
    assert _rules("sm80", ["float32"], fma) == ["tensor-core"] and fma["sass"]["HMMA"] == 0
    assert "spill" in _rules("sm80", ["bfloat16"], spill) and spill["stack"] + spill["local"] > 0


def test_a_compile_that_kills_its_process_is_a_compile_error(tmp_path, monkeypatch):
    (tmp_path / "dying_kernels.py").write_text("import os\nos._exit(3)  # as a compiler abort would\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (result,) = compile_check.compile_all([("dying_kernels:kernel", (), (), "sm80")], jobs=1,
                                          progress=lambda *a, **k: None)
    assert "process died" in result["error"]
    assert _rules("sm80", ["bfloat16"], result) == ["compile"]


def test_tune_configs_needs_a_gpu_and_says_so(monkeypatch, capsys):
    import torch

    tune_configs = importlib.import_module("tune_configs")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tune_configs.main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
    # Every tuned kernel has candidates, each a dict of launch options / inner tiles.
    for _, _, kernels in tune_configs.OPS.values():
        for kernel in kernels:
            assert tune_configs.candidates(kernel) and all(isinstance(c, dict) for c in tune_configs.candidates(kernel))
