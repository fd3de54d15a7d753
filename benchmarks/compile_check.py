"""Compile check: every Triton launch the public ops make compiles, fits and uses tensor cores on
A100 (sm_80) and H100 (sm_90a). Needs no GPU.

    PYTHONPATH=$PWD python benchmarks/compile_check.py [--quick] [--out DIR] [--jobs N]
                                                       [--targets sm80,sm90] [--only REGEX]

1. Records the launches of every public op, forward and backward, over the configuration grid of
   ``compile_record.op_configs`` (dtypes, head dims, GQA/MHA, every GRPO loss variant, V=151,936),
   with the tiles each wrapper picks for the target (``gpu_tiles``); identical launches are
   compiled once.
2. Compiles each launch for the target with Triton's compiler in worker processes and reads
   registers, spill (stack + local bytes), shared memory, the SASS's tensor-core instructions and
   every ``tl.dot``'s engine (``compile_inspect``).
3. Applies ``RULES`` (minus the justified ``EXCEPTIONS``), prints the table and writes it as
   ``compile_check.md`` and ``compile_check.json`` under ``--out`` (default
   ``benchmarks/results/compile``). Exits 1 on any violation or refused configuration (fp32 configurations that the op hands to
   ``backend='torch'`` on that GPU are listed as routed, by design).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compile_inspect  # noqa: E402
import compile_record  # noqa: E402

DEFAULT_OUT = os.path.join("benchmarks", "results", "compile")


def _provenance() -> dict:
    """Versions and the git commit a report was made from (the commit is "unknown" outside git)."""
    import subprocess

    import torch
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"triton": triton.__version__, "torch": torch.__version__, "commit": commit}


@dataclasses.dataclass(frozen=True)
class Arch:
    """Per-SM limits (CUDA occupancy calculator): shared memory is allocated per CTA with 1 KiB
    reserved by the system, registers per warp in units of 256."""

    max_shared_per_cta: int
    shared_per_sm: int
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    reserved_shared_per_cta: int = 1024


ARCHS = {
    "sm80": Arch(max_shared_per_cta=163 * 1024, shared_per_sm=164 * 1024),  # A100
    "sm90": Arch(max_shared_per_cta=227 * 1024, shared_per_sm=228 * 1024),  # H100
}
LOW_PRECISION = ("bfloat16", "float16")


def ctas_per_sm(target: str, registers: int, num_warps: int, shared: int) -> tuple[int, str]:
    """Resident CTAs per SM and what limits them (``"registers"``, ``"shared"``, ``"warps"``)."""
    arch = ARCHS[target]
    registers_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = arch.registers_per_sm // registers_per_warp // num_warps
    by_shared = arch.shared_per_sm // (shared + arch.reserved_shared_per_cta)
    by_warps = min(arch.max_warps_per_sm // num_warps, arch.max_ctas_per_sm)
    limits = {"registers": by_registers, "shared": by_shared, "warps": by_warps}
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def wgmma_fits(dot: dict, num_warps: int) -> bool:
    """Whether Triton (3.x, ``supportMMA(dot, 3)``) lowers this dot to wgmma on sm_90a: a warpgroup
    (4 warps) issues m64nNk16 instructions, so the result tile needs M a multiple of 64, N a
    multiple of 8, and num_warps a multiple of 4. Smaller tiles get mma.sync by design."""
    return dot["m"] % 64 == 0 and dot["n"] % 8 == 0 and num_warps % 4 == 0


def _low_precision(launch_dtypes) -> bool:
    return any(d in LOW_PRECISION for d in launch_dtypes)


def violations(target: str, dtypes, result: dict) -> list[tuple[str, str]]:
    """``(rule, message)`` for every rule a compiled launch breaks.

    ``dtypes``: the launch's tensor dtypes (a launch with any bf16/fp16 tensor is a bf16/fp16
    kernel). ``result``: ``compile_inspect.compile_launch``'s output.

    Rules: ``compile`` no compile error; ``spill`` no stack/local bytes in a bf16/fp16 kernel;
    ``shared`` shared memory within the target's per-CTA limit; ``tensor-core`` every ``tl.dot``
    on tensor cores (fp32 ones as tf32/tf32x3: an IEEE fp32 dot runs on FMA units at a fraction of
    the speed and spills); ``wgmma`` on sm_90a, a tensor-core dot whose tile fits wgmma uses it."""
    if "error" in result:
        return [("compile", result["error"])]
    found = []
    spill = result["stack"] + result["local"]
    if spill and _low_precision(dtypes):
        found.append(("spill", f"spills {result['stack']} B stack + {result['local']} B local per thread"))
    limit = ARCHS[target].max_shared_per_cta
    if result["shared"] > limit:
        found.append(("shared", f"shared memory {result['shared'] / 1024:.1f} KB > {limit // 1024} KB"))
    for dot in result["dots"]:
        tile = f"{dot['dtype']} {dot['m']}x{dot['n']}x{dot['k']} at {dot['where']}"
        if dot["engine"] == "fma":
            found.append(("tensor-core", f"dot on FMA units, not tensor cores: {tile}"))
        elif target == "sm90" and dot["engine"] == "mma.sync" and wgmma_fits(dot, result["num_warps"]):
            found.append(("wgmma", f"mma.sync where wgmma fits: {tile}"))
    return found


@dataclasses.dataclass(frozen=True)
class RuleException:
    """A justified exception: ``rule`` broken by ``kernel`` (``module_short.function``) on
    ``target`` for configurations whose description matches the regex ``config``."""

    kernel: str
    config: str
    target: str
    rule: str
    reason: str

    def covers(self, kernel: str, config: str, target: str, rule: str) -> bool:
        return (self.kernel == kernel and self.target in (target, "*") and self.rule == rule
                and re.search(self.config, config) is not None)


# Every accepted violation, with its reason. Empty: every launch passes every rule.
EXCEPTIONS: list[RuleException] = []


def kernel_label(kernel: str) -> str:
    """``"pyfastrl.kernels.prefix_attention.kernel:_forward_kernel"`` -> ``"prefix_attention._forward_kernel"``."""
    module, function = kernel.split(":")
    return f"{module.removeprefix(compile_record.KERNEL_PACKAGE).split('.')[0]}.{function}"


def _tensor_dtypes(launch) -> list[str]:
    return [d[1] for _, d in launch.params if d[0] == "tensor"]


def evaluate(launch, target: str, result: dict, used_by: list[str], exceptions=EXCEPTIONS) -> dict:
    """One table row: the measurements, CTAs per SM, violations and the verdict."""
    kernel, config = kernel_label(launch.kernel), launch.describe()
    row = {"kernel": kernel, "config": config, "target": target, "used_by": used_by, **result}
    found, excepted = [], []
    for rule, message in violations(target, _tensor_dtypes(launch), result):
        reason = next((e.reason for e in exceptions if e.covers(kernel, config, target, rule)), None)
        (found if reason is None else excepted).append({"rule": rule, "message": message, "reason": reason})
    row["violations"], row["excepted"] = found, excepted
    if "error" not in result:
        row["ctas_per_sm"], row["occupancy_limit"] = ctas_per_sm(target, result["registers"], result["num_warps"],
                                                                 result["shared"])
    row["verdict"] = "FAIL" if found else ("ok (excepted)" if excepted else "ok")
    return row


@contextlib.contextmanager
def _environment(**values):
    """Set environment variables for the block (inherited by processes started in it)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _pool(jobs: int):
    return concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=compile_inspect.worker_init)


def compile_all(tasks: list[tuple], jobs: int, progress=print, labels=None) -> list[dict]:
    """``compile_inspect.compile_launch`` over ``tasks`` in ``jobs`` worker processes (spawned, with
    Triton's JIT), results in the order given; progress printed as they finish. A compile that kills
    its process (a compiler abort) breaks the pool: the unfinished tasks then run one process each,
    and the one that dies is recorded as a compile error."""
    results: list[dict | None] = [None] * len(tasks)
    labels = labels or [f"{task[3]} {kernel_label(task[0])}" for task in tasks]
    done = 0

    def finish(i, result):
        nonlocal done
        results[i], done = result, done + 1
        status = "compile error" if "error" in result else (
            f"{result['registers']} regs, {result['stack'] + result['local']} B spill")
        progress(f"[{done:>3}/{len(tasks)}] {labels[i]}: {status} ({result['seconds']:.1f} s)", flush=True)

    with _environment(TRITON_INTERPRET="0"):
        with _pool(jobs) as pool:
            futures = {pool.submit(compile_inspect.compile_launch, task): i for i, task in enumerate(tasks)}
            for future in concurrent.futures.as_completed(futures):
                if future.exception() is None:
                    finish(futures[future], future.result())
        for i in [i for i, result in enumerate(results) if result is None]:
            with _pool(1) as pool:
                try:
                    finish(i, pool.submit(compile_inspect.compile_launch, tasks[i]).result())
                except concurrent.futures.process.BrokenProcessPool as error:
                    finish(i, {"error": f"the compiler process died: {error}", "seconds": 0.0, "cpu_seconds": 0.0})
    return results


def _cost(launch) -> int:
    """Rough compile cost, to start the slowest compiles first."""
    return {"local_linear_attention": 3, "prefix_attention": 2}.get(kernel_label(launch.kernel).split(".")[0], 1)


def summarise(rows: list[dict], refused: dict) -> dict:
    """The counts of the closing note: compile errors, spilling launches (all dtypes and
    bf16/fp16), launches over the shared-memory limit, non-tensor-core dots, missed wgmma."""
    def failing(rule):
        return sum(any(v["rule"] == rule for v in row["violations"] + row["excepted"]) for row in rows)

    return {
        "launches": len(rows),
        "failing": sum(row["verdict"] == "FAIL" for row in rows),
        "compile_errors": failing("compile"),
        "spilling_all_dtypes": sum("error" not in r and r["stack"] + r["local"] > 0 for r in rows),
        "spilling_bf16_fp16": failing("spill"),
        "over_shared_limit": failing("shared"),
        "non_tensor_core_dots": sum(d["engine"] == "fma" for r in rows for d in r.get("dots", [])),
        "launches_with_non_tensor_core_dots": failing("tensor-core"),
        "missed_wgmma_dots": sum(1 for r in rows for v in r["violations"] + r["excepted"] if v["rule"] == "wgmma"),
        "refused_configs": len(refused),
        "compile_cpu_seconds": round(sum(row["cpu_seconds"] for row in rows), 1),
    }


def _tensor_cores(row: dict) -> str:
    counts = row["sass"]
    text = ", ".join(f"{op} {counts[op]}" for op in ("HGMMA", "HMMA") if counts[op]) or "-"
    engines = {}
    for dot in row["dots"]:
        engines[dot["engine"]] = engines.get(dot["engine"], 0) + 1
    dots = ", ".join(f"{n} {e}" for e, n in sorted(engines.items()))
    return f"{text} ({dots} dots)" if dots else text


def markdown(rows: list[dict], summary: dict, refused: dict, header: str) -> str:
    lines = [header, "",
             "| kernel | config | target | registers | spill B (stack+local) | shared KB | tensor cores (SASS; dots) "
             "| CTAs/SM | verdict |", "|" + "---|" * 9]
    for row in rows:
        if "error" in row:
            cells = ["-", "-", "-", "-", "-"]
        else:
            cells = [str(row["registers"]), f"{row['stack']}+{row['local']}", f"{row['shared'] / 1024:.1f}",
                     _tensor_cores(row), f"{row['ctas_per_sm']} ({row['occupancy_limit']})"]
        problems = "; ".join(v["message"] for v in row["violations"])
        verdict = row["verdict"] + (f": {problems}" if problems else "")
        verdict += "".join(f" [excepted {v['rule']}: {v['reason']}]" for v in row["excepted"])
        lines.append("| " + " | ".join([row["kernel"], row["config"], row["target"], *cells,
                                        verdict.replace("|", "/")]) + " |")
    lines += ["", "Summary: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary.items())]
    lines += [f"Refused by the op: {name}: {message}" for name, message in refused.items()]
    return "\n".join(lines) + "\n"


def run(targets=("sm80", "sm90"), quick=False, jobs=None, only=None, out=DEFAULT_OUT, progress=print) -> dict:
    """Record, compile and judge; write the report under ``out``. Returns ``{"rows", "summary",
    "refused"}``."""
    started = time.perf_counter()
    configs = [c for c in compile_record.op_configs()
               if (c.quick or not quick) and (only is None or re.search(only, c.name))]
    tasks, launches, refused, routed = [], [], {}, {}
    for target in targets:
        progress(f"recording {len(configs)} op configurations for {target} ...", flush=True)
        recorded = compile_record.record(target, configs)
        refused.update({f"{name} ({target})": message for name, message in recorded.refused.items()})
        routed.update({f"{name} ({target})": message for name, message in recorded.routed.items()})
        for launch, used_by in recorded.launches.values():
            launches.append((launch, target, used_by))
    launches.sort(key=lambda item: -_cost(item[0]))
    tasks = [(launch.kernel, launch.params, launch.options, target) for launch, target, _ in launches]
    recorded_s = time.perf_counter() - started
    jobs = jobs or os.cpu_count() or 1
    progress(f"compiling {len(tasks)} distinct launches in {jobs} processes ...", flush=True)
    labels = [f"{target} {kernel_label(launch.kernel)} ({used_by[0]}{' ...' if len(used_by) > 1 else ''})"
              for launch, target, used_by in launches]
    results = compile_all(tasks, jobs, progress, labels)
    rows = [evaluate(launch, target, result, used_by)
            for (launch, target, used_by), result in zip(launches, results)]
    rows.sort(key=lambda r: (r["kernel"], r["config"], r["target"]))
    summary = summarise(rows, refused)
    summary["record_seconds"] = round(recorded_s, 1)
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    summary.update(_provenance())
    header = (f"# Compile check ({'quick' if quick else 'full'} grid; targets {', '.join(targets)}; "
              f"{len(tasks)} compiles in {summary['total_seconds']} s on {jobs} processes)\n\n"
              f"Compiled without a GPU (ptxas/cuobjdump from triton's backend): triton {summary['triton']}, "
              f"torch {summary['torch']}, commit {summary['commit']}.")
    os.makedirs(out, exist_ok=True)
    report = markdown(rows, summary, refused, header)
    report += "".join(f"Routed to backend='torch' by design: {name}: {message}\n" for name, message in routed.items())
    with open(os.path.join(out, "compile_check.md"), "w") as f:
        f.write(report)
    with open(os.path.join(out, "compile_check.json"), "w") as f:
        json.dump({"summary": summary, "refused": refused, "routed": routed, "rows": rows}, f, indent=1)
    progress(report, flush=True)
    return {"rows": rows, "summary": summary, "refused": refused}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the --quick subset of configurations (bf16/fp32, "
                        "GQA, a few loss variants)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})")
    parser.add_argument("--jobs", type=int, default=None, help="compiler processes (default: CPU count)")
    parser.add_argument("--targets", default="sm80,sm90", help="comma-separated: sm80, sm90 (default both)")
    parser.add_argument("--only", default=None, help="regex on op configuration names, e.g. 'local_linear'")
    args = parser.parse_args(argv)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = [t for t in targets if t not in ARCHS]
    if unknown or not targets:
        parser.error(f"--targets: choose from {', '.join(ARCHS)}; got {args.targets!r}")
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be >= 1")
    report = run(targets, args.quick, args.jobs, args.only, args.out)
    summary = report["summary"]
    failed = summary["failing"] or summary["refused_configs"]
    print(f"compile check: {'FAILED' if failed else 'passed'}: {summary['failing']} of {summary['launches']} "
          f"launches break a rule, {summary['refused_configs']} configurations refused; report in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
