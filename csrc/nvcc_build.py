"""How csrc/ is compiled with nvcc: shared by setup.py (the extension), check_resources.py (the ptxas
resource check) and the tests (the host-only arithmetic library). Standard library only: setup.py
loads it before anything is installed."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

CSRC = Path(__file__).resolve().parent
# Kernel sources of the extension; each family's binding is in bindings.cpp.
CUDA_SOURCES = [CSRC / "attention_merge" / "merge.cu", CSRC / "grpo_loss" / "grpo_loss.cu",
                CSRC / "lla_decode" / "lla_decode.cu"]
BINDINGS = CSRC / "bindings.cpp"
# Host-only builds of each family's arithmetic, compiled with g++ by tests/test_cuda_extension.py.
HOST_CHECKS = {"attention_merge": CSRC / "attention_merge" / "host_check.cpp",
               "grpo_loss": CSRC / "grpo_loss" / "host_check.cpp",
               "lla_decode": CSRC / "lla_decode" / "host_check.cpp"}
# Cubins for A100 (sm_80) and H100 (sm_90a), plus compute_90 PTX that newer GPUs' drivers JIT-compile.
GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
]
# The cubin targets check_resources.py reports on, as ptxas sees them.
CUBIN_ARCHS = ["sm_80", "sm_90a"]
NVCC_FLAGS = ["-std=c++17", "-O3", f"-I{CSRC}", "--expt-relaxed-constexpr", "-Xcompiler=-fPIC"]


def find_nvcc() -> str | None:
    """nvcc from ``$CUDA_HOME/bin`` (or ``$CUDA_PATH``), else from ``PATH``; None when there is none."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(variable)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def toolkit_dirs(nvcc: str) -> tuple[list[str], list[str]]:
    """``(include_dirs, library_dirs)`` of the toolkit behind ``nvcc`` (wrapper scripts included), read
    from the paths ``nvcc --dryrun`` passes to its own host compiler and linker."""
    probe = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                           capture_output=True, text=True, check=True)
    includes: list[str] = []
    libraries: list[str] = []
    for line in (probe.stdout + probe.stderr).splitlines():
        name, _, value = line.removeprefix("#$ ").partition("=")
        if name in ("INCLUDES", "SYSTEM_INCLUDES", "LIBRARIES"):
            tokens = shlex.split(value)
            for flag, following in zip(tokens, tokens[1:] + [""]):
                if flag.startswith("-I"):
                    includes.append(flag[2:])
                elif flag == "-isystem":
                    includes.append(following)
                elif flag.startswith("-L") and not flag.rstrip("/").endswith("stubs"):
                    libraries.append(flag[2:])
    return [os.path.normpath(d) for d in includes], [os.path.normpath(d) for d in libraries]


def compile_cuda(nvcc: str, source: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    """``nvcc -c source -o output`` for every GENCODE target; raises CalledProcessError with nvcc's
    output on a compile error."""
    command = [nvcc, *NVCC_FLAGS, *GENCODE, *extra, "-c", str(source), "-o", str(output)]
    return subprocess.run(command, capture_output=True, text=True, check=True)
