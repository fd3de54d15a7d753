"""The benchmark harness behind ``pyfastrl bench``: how every case file is measured and reported.

A case file (``prefix_attention.py``, ``prefix_tree.py``, ``grpo_loss.py``, ``grpo_loss_rows.py``, ``lla.py``,
``model_step.py``, ``layout.py``) defines ``NAME``, ``PLOT`` (``x`` and ``series``: the case
parameters its speedup plot uses; ``baseline``: the naive method speedups are over; ``ours``: our method; optional ``not_peers``: methods that are
neither, such as a physical floor) and ``run(runner) -> (config, cases)``, each case
``{"params", "work", "methods": {name: {"fwd"?, "fwd_bwd": measurement}}, "skipped": {name: reason}}``;
it builds its methods and calls ``runner.measure`` for each. The harness owns the rest, the same
for all:

- timing: CUDA, ``triton.testing.do_bench`` medians after warm-up; CPU (``--cpu``), wall-clock
  medians, labelled as CPU numbers. Inputs are fresh random tensors (never zeros), several sets
  rotated call by call so the working set is at least twice the last-level cache (``input_sets``);
- work: each measurement carries the case's useful FLOPs and compulsory bytes (its formulas live
  beside the case) and reports TFLOP/s, GB/s and the fraction of a roofline measured on the spot
  (a large matmul and a device-to-device copy, ``measure_roofline``);
- memory: peak allocated beyond what was allocated before the call (CUDA only);
- failures: an out-of-memory or a crash is recorded for that method and the run goes on; a peer
  that cannot be imported is listed with the reason;
- output: a terminal table per case file, ``<out>/<name>.json`` (GPU, versions, commit, roofline,
  every case), ``<out>/<name>.png`` (speedup over the naive baseline) and ``<out>/summary.md``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CASE_FILES = {"prefix-attention": "prefix_attention", "prefix-tree": "prefix_tree", "grpo-loss": "grpo_loss",
              "grpo-loss-rows": "grpo_loss_rows", "lla": "lla", "model-step": "model_step", "layout": "layout",
              "attention-merge": "attention_merge"}
# Input sets are rotated until they span this many times the last-level cache (at most MAX_SETS).
CACHE_MULTIPLE, MAX_SETS = 2, 8


# ----------------------------------------------------------------------------- environment


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    """GPU name, package versions, CUDA version, git commit and UTC date of this run."""
    def installed(package):
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "triton": installed("triton"),
        "transformers": installed("transformers"),
        "liger_kernel": installed("liger-kernel"),
        "prefix_grouper": installed("prefix-grouper"),
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------- measuring


@dataclass
class Roofline:
    """Peaks measured on the spot: dense matmul TFLOP/s (bf16 on CUDA, fp32 on CPU) and copy GB/s
    (bytes read + written)."""

    matmul_tflops: float
    copy_gbps: float

    def bound_ms(self, flops: float, nbytes: float) -> float:
        """The time a kernel doing this work could take at best: compute- or memory-bound."""
        return max(flops / (self.matmul_tflops * 1e9), nbytes / (self.copy_gbps * 1e6))


def measure_roofline(device: torch.device, small: bool = False) -> Roofline:
    cuda = device.type == "cuda"
    n = 512 if small else (8192 if cuda else 2048)
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    matmul_ms = _median_ms(device, lambda: a @ b)
    elements = 2**22 if small else (2**28 if cuda else 2**25)  # 1 GiB on a GPU: far beyond its L2
    src = torch.randn(elements, device=device)
    dst = torch.empty_like(src)
    copy_ms = _median_ms(device, lambda: dst.copy_(src))
    return Roofline(matmul_tflops=2 * n**3 / matmul_ms / 1e9, copy_gbps=2 * src.nbytes / copy_ms / 1e6)


def _median_ms(device: torch.device, fn, min_seconds: float = 0.2, max_reps: int = 50) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_seconds and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _cpu_cache_bytes() -> int:
    """The largest CPU cache Linux reports (the last level), 32 MiB where it reports none."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    for index in (os.listdir(base) if os.path.isdir(base) else []):
        try:
            with open(os.path.join(base, index, "size")) as f:
                text = f.read().strip()
            sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text))
        except (OSError, ValueError, KeyError):
            continue
    return max(sizes, default=32 * 2**20)


def tensor_bytes(value) -> int:
    """Bytes of every tensor in a (nested) tuple/list/dict."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def measure_or_record_failure(measure) -> dict:
    """``measure()``'s result dict, or ``{"error": ...}`` when it runs out of GPU memory or raises
    (one failing method or peer must not stop the run). Frees the cached GPU memory either way."""
    try:
        return measure()
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"[:300]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class Runner:
    """How this run measures: device (``cuda``, or ``cpu`` with ``--cpu``), ``quick`` grids, the
    roofline, and the cache size the input rotation must exceed."""

    def __init__(self, device: torch.device, quick: bool, roofline: Roofline, cache_bytes: int | None = None):
        self.device, self.quick, self.roofline = device, quick, roofline
        self.cpu = device.type == "cpu"
        if cache_bytes is None:
            cache_bytes = (torch.cuda.get_device_properties(device).L2_cache_size if not self.cpu
                           else _cpu_cache_bytes())
        self.cache_bytes = cache_bytes

    def input_sets(self, make) -> list:
        """Fresh random input sets ``make(seed)`` (seed 0, 1, ...), as many as it takes to span
        CACHE_MULTIPLE x the cache (at least 1, at most MAX_SETS), so no timed call finds its
        inputs in cache from the previous one."""
        first = make(0)
        count = min(MAX_SETS, max(1, math.ceil(CACHE_MULTIPLE * self.cache_bytes / max(tensor_bytes(first), 1))))
        return [first] + [make(seed) for seed in range(1, count)]

    def measure(self, step, input_sets: list, *, flops: float, nbytes: float) -> dict:
        """Median ms of ``step(*inputs)`` cycling through ``input_sets``, with TFLOP/s and GB/s of
        the given useful work, the fraction of the roofline's bound it reaches, and the peak memory
        of one call beyond what was allocated before it. An OOM or error is returned as ``{"error"}``."""
        def run():
            sets = itertools.cycle(input_sets)
            ms = _median_ms(self.device, lambda: step(*next(sets)))
            return {"ms": ms, "tflops": flops / ms / 1e9, "gbps": nbytes / ms / 1e6,
                    "roofline_fraction": self.roofline.bound_ms(flops, nbytes) / ms,
                    "peak_extra_mib": self._peak_extra_mib(lambda: step(*input_sets[0]))}

        return measure_or_record_failure(run)

    def _peak_extra_mib(self, call) -> float | None:
        if self.cpu:
            return None  # no allocator statistics on the CPU
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


# ----------------------------------------------------------------------------- reporting


def write_report(out_dir: str, name: str, runner: Runner, config: dict, cases: list[dict]) -> dict:
    """``<out_dir>/<case file>.json``: environment, device kind, roofline, config and every case."""
    report = {"benchmark": name, **environment(), "device": "cpu" if runner.cpu else "cuda",
              "roofline": asdict(runner.roofline),
              "config": config, "cases": cases}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{CASE_FILES[name]}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{name}: results written to {path}")
    return report


def speedups(case: dict, baseline: str, mode: str = "fwd_bwd") -> dict:
    """``{method: baseline ms / method ms}`` of one case (methods without a time left out)."""
    def ms(name):
        return case["methods"].get(name, {}).get(mode, {}).get("ms")

    base = ms(baseline)
    return {name: base / ms(name) for name in case["methods"] if base and ms(name)}


def write_plot(report: dict, plot: dict, path: str) -> str | None:
    """Speedup over ``plot["baseline"]`` (forward + backward) against ``plot["x"]``, one line per
    method and value of ``plot["series"]``. None (after saying why) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed")
        return None
    lines: dict = {}
    for case in report["cases"]:
        for method, value in speedups(case, plot["baseline"]).items():
            if method == plot["baseline"]:
                continue
            label = method + (f", {plot['series']}={case['params'][plot['series']]}" if plot.get("series") else "")
            lines.setdefault(label, []).append((case["params"][plot["x"]], value))
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xlabel(plot["x"])
    ax.set_ylabel(f"speedup over {plot['baseline']} (fwd+bwd)")
    where = "CPU (torch backends, small sizes)" if report["device"] == "cpu" else report["gpu"]
    ax.set_title(f"{report['benchmark']} on {where}", fontsize=10)
    if lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(name: str, cases: list[dict], baseline: str) -> None:
    """One row per case and method: forward and forward+backward ms, TFLOP/s, GB/s, roofline
    fraction, peak memory and speedup over the baseline; errors and skipped peers with reasons."""
    print(f"\n{name}")
    print(f"{'case':<26} {'method':<20} {'fwd ms':>8} {'f+b ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'roof':>5} "
          f"{'peak MiB':>9} {'speedup':>8}")
    for case in cases:
        label = " ".join(f"{k}={v}" for k, v in case["params"].items())
        gains = speedups(case, baseline)
        for method, modes in case["methods"].items():
            train, forward = modes.get("fwd_bwd", {}), modes.get("fwd", {})
            errors = [f"{mode}: {r['error']}" for mode, r in modes.items() if "error" in r]
            row = f"{label:<26} {method:<20} "
            if not train.get("ms") and errors:
                print(row + "; ".join(errors))
                continue
            print(row + f"{_number(forward.get('ms'), '8.3f'):>8} {_number(train.get('ms'), '9.3f'):>9} "
                  f"{_number(train.get('tflops'), '8.2f'):>8} {_number(train.get('gbps'), '8.1f'):>8} "
                  f"{_number(train.get('roofline_fraction'), '5.2f'):>5} {_number(train.get('peak_extra_mib'), '9.0f'):>9} "
                  f"{_number(gains.get(method), '7.2f') + 'x' if method in gains else '-':>8}")
        for method, reason in case.get("skipped", {}).items():
            print(f"{label:<26} {method:<20} skipped: {reason}")


def summary_rows(report: dict, plot: dict) -> list[dict]:
    """Per case: our forward+backward ms, the baseline's, our speedup over it, and the fastest peer."""
    rows = []
    for case in report["cases"]:
        gains = speedups(case, plot["baseline"])
        ours = case["methods"].get(plot["ours"], {}).get("fwd_bwd", {})
        # Peers: other projects' methods (not our own backends, the baseline or a physical floor).
        peers = {m: g for m, g in gains.items()
                 if not m.startswith("pyfastrl") and m not in (plot["ours"], plot["baseline"], *plot.get("not_peers", ()))}
        best = max(peers, key=peers.get) if peers else None
        rows.append({"benchmark": report["benchmark"], "case": " ".join(f"{k}={v}" for k, v in case["params"].items()),
                     "ours_ms": ours.get("ms"), "speedup_over_baseline": gains.get(plot["ours"]),
                     "roofline_fraction": ours.get("roofline_fraction"),
                     "ours_vs_best_peer": None if best is None or plot["ours"] not in gains
                     else gains[plot["ours"]] / peers[best], "best_peer": best})
    return rows


def write_summary(rows: list[dict], runner: Runner, path: str) -> str:
    env = environment()
    where = "CPU (torch backends at small sizes: not kernel speeds)" if runner.cpu else env["gpu"]
    lines = [f"# pyfastrl bench: {where}", "",
             f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, CUDA {env['cuda']}, "
             f"commit {env['commit'][:12]}, {env['date']}. Roofline measured in this run: matmul "
             f"{runner.roofline.matmul_tflops:.1f} TFLOP/s, copy {runner.roofline.copy_gbps:.0f} GB/s.", "",
             "| benchmark | case | ours f+b ms | speedup over baseline | roofline fraction | vs best peer |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        peer = "-" if r["best_peer"] is None else f"{_number(r['ours_vs_best_peer'], '.2f')}x ({r['best_peer']})"
        lines.append(f"| {r['benchmark']} | {r['case']} | {_number(r['ours_ms'], '.3f')} | "
                     f"{_number(r['speedup_over_baseline'], '.2f')}x | {_number(r['roofline_fraction'], '.2f')} | {peer} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines[4:])


# ----------------------------------------------------------------------------- command


def load_case_file(name: str):
    """The case file behind a case name (``benchmarks/<file>.py``), imported as a top-level module
    beside this one, as when it runs as a script."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    return importlib.import_module(CASE_FILES[name])


DESCRIPTION = """\
Kernel microbenchmarks, side by side with the peers, in one command.

cases: prefix-attention (grouped attention vs repeated-prompt SDPA flash/cuDNN, FlexAttention,
the prefix-grouper package, the torch backend), grpo-loss (fused LM-head loss vs unfused PyTorch,
Liger-Kernel, the matmul floor), lla (local linear attention vs SDPA flash), model-step (a training
step of a 0.5B decoder, repeated vs grouped batch), layout (building PrefixGroupLayout and its block
tables vs Python loops over tokens), attention-merge (the flash backend's merge kernels, CUDA and
Triton, in GB/s against a copy of the same bytes); all runs every case.

Needs a CUDA GPU. Without one it says so and exits 0, unless --cpu: the torch backends at small
sizes, labelled as CPU numbers (they say nothing about kernel speed).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyfastrl bench", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def add_arguments(parser) -> None:
    parser.add_argument("case", nargs="?", default="all", choices=[*CASE_FILES, "all"],
                        help="which case file to run (default all)")
    parser.add_argument("--quick", action="store_true", help="a few representative sizes per case (minutes, not tens)")
    parser.add_argument("--cpu", action="store_true", help="no GPU: run the torch backends at small sizes on the CPU")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results, with --cpu "
                        "benchmarks/results/cpu)")


def run(args) -> int:
    """``pyfastrl bench``: run the chosen case files, print their tables, write JSON, plots and the
    summary; print the summary table last."""
    names = list(CASE_FILES) if args.case == "all" else [args.case]
    if not torch.cuda.is_available() and not args.cpu:
        print("pyfastrl bench measures GPU kernels and no CUDA GPU is visible: nothing measured. "
              "(--cpu runs the torch backends at small sizes on the CPU, labelled as CPU numbers.)")
        return 0
    device = torch.device("cpu" if args.cpu else "cuda")
    out = args.out or os.path.join("benchmarks", "results", *(["cpu"] if args.cpu else []))
    print(f"measuring the roofline on {device.type} ...", flush=True)
    runner = Runner(device, args.quick, measure_roofline(device, small=args.cpu))
    print(f"roofline: matmul {runner.roofline.matmul_tflops:.2f} TFLOP/s, copy {runner.roofline.copy_gbps:.1f} GB/s; "
          f"inputs rotated over >= {CACHE_MULTIPLE} x {runner.cache_bytes / 2**20:.0f} MiB of cache", flush=True)
    rows = []
    for name in names:
        module = load_case_file(name)
        print(f"\n== {name} ({'CPU, torch backends, small sizes' if runner.cpu else 'CUDA'}) ==", flush=True)
        config, cases = module.run(runner)
        print_table(name, cases, module.PLOT["baseline"])
        report = write_report(out, name, runner, config, cases)
        write_plot(report, module.PLOT, os.path.join(out, f"{CASE_FILES[name]}.png"))
        rows += summary_rows(report, module.PLOT)
    table = write_summary(rows, runner, os.path.join(out, "summary.md"))
    print(f"\nsummary ({'CPU numbers' if runner.cpu else environment()['gpu']}; also in "
          f"{os.path.join(out, 'summary.md')}):\n{table}")
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


def progress(index: int, total: int, what: str) -> None:
    print(f"[{index + 1}/{total}] {what} ...", flush=True)


if __name__ == "__main__":
    sys.exit(main())
