"""Helpers of the CUDA-extension tests: the csrc/ build scripts, nvcc, and the host-only builds of
each kernel family's arithmetic (csrc/<family>/host_check.cpp, g++ and ctypes)."""
import ctypes
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_csrc_module(name):
    """A script of csrc/ (not a package) imported by path."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "csrc" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


nvcc_build = load_csrc_module("nvcc_build")
NVCC = nvcc_build.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found ($CUDA_HOME/bin or PATH): no CUDA toolkit")


def build_host_check(family, tmp_path_factory):
    """ctypes handle of csrc/<family>/host_check.cpp built with g++ (CUDA headers for fp16/bf16)."""
    compiler = shutil.which("g++")
    if NVCC is None or compiler is None:
        pytest.skip("needs nvcc (for the CUDA headers) and g++")
    includes, _ = nvcc_build.toolkit_dirs(NVCC)
    library = tmp_path_factory.mktemp(family) / f"lib{family}_host.so"
    # -fno-strict-aliasing: a family may reuse a shared-memory buffer for another element type
    # (lla_decode's float tiles, then its float64 factor), as device code does.
    subprocess.run([compiler, "-std=c++17", "-O2", "-fno-strict-aliasing", "-Wall", "-shared", "-fPIC",
                    f"-I{nvcc_build.CSRC}", *(f"-I{d}" for d in includes), str(nvcc_build.HOST_CHECKS[family]),
                    "-o", str(library)],
                   check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(library))
