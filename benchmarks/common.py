"""What every benchmark result records beside its numbers: the GPU, the versions and the commit."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
from importlib.metadata import PackageNotFoundError, version

import torch


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
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
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def parse_args_or_skip(argv, doc: str, script: str, quick_help: str):
    """The benchmarks' shared options (``--quick``, ``--out``). Returns None, after saying so, when no
    CUDA GPU is visible: benchmarks measure GPU kernels only."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"benchmarks/{script} needs a CUDA GPU (none visible): nothing measured.")
        return None
    return args


def write_report(out_dir: str, benchmark: str, config: dict, cases: list[dict]) -> dict:
    """Write ``<out_dir>/<benchmark>.json`` (environment, config, cases); print where and on what."""
    report = {"benchmark": benchmark, **environment(), "config": config, "cases": cases}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{benchmark}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\n{report['gpu']}, torch {report['torch']}, triton {report['triton']}, commit {report['commit'][:10]}")
    print(f"results written to {path}")
    return report


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
        torch.cuda.empty_cache()
