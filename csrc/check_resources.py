"""Resource check of the CUDA extension's kernels, without a GPU: compiles every ``.cu`` source for
each cubin target with ``ptxas -v`` and prints registers, shared memory, stack frame and spills per
kernel; fails on any spill store or stack frame (local memory in a memory-bound kernel), and on a
kernel of a vectorised source (``VECTORISED_SOURCES``) whose PTX moves no 128-bit vector.

    python csrc/check_resources.py        # exit status 1 on a finding, 2 without nvcc

Run on every CI run by tests/test_cuda_extension.py (marker ``compile``).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nvcc_build  # noqa: E402

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_PTX_ENTRY = re.compile(r"\.entry\s+(\S+)\(")
# Sources whose kernels are written around 16-byte moves, so each must have one. The GRPO loss
# kernels are not: they read several (N,) arrays of different element sizes from arbitrary row
# offsets, one element per thread per array, coalesced across the warp.
VECTORISED_SOURCES = {"merge.cu"}


@dataclass
class KernelResources:
    source: str
    kernel: str  # mangled name
    arch: str
    registers: int = 0
    shared_bytes: int = 0
    stack_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    vector_128: bool = False  # PTX of the kernel has a 128-bit global load and store


def parse_ptxas(source: str, log: str) -> list[KernelResources]:
    """Kernels in the ``-Xptxas -v`` output of one compile, in order."""
    kernels: list[KernelResources] = []
    for line in log.splitlines():
        if entry := _ENTRY.search(line):
            kernels.append(KernelResources(source, entry.group(1), entry.group(2)))
        elif kernels and (frame := _FRAME.search(line)):
            kernels[-1].stack_bytes, kernels[-1].spill_stores, kernels[-1].spill_loads = map(int, frame.groups())
        elif kernels and (used := _USED.search(line)):
            kernels[-1].registers = int(used.group(1))
            smem = _SMEM.search(line)
            kernels[-1].shared_bytes = int(smem.group(1)) if smem else 0
    return kernels


def vectorised_kernels(ptx: str) -> set[str]:
    """Kernels whose PTX body has a ``ld.global…v4`` and a ``st.global…v4`` (16-byte moves)."""
    found = set()
    for body in re.split(r"(?=\.visible\s+\.entry|\.entry\s)", ptx):
        if (name := _PTX_ENTRY.search(body)) and re.search(r"ld\.global(\.\w+)*\.v4", body) \
                and re.search(r"st\.global(\.\w+)*\.v4", body):
            found.add(name.group(1))
    return found


def check(nvcc: str) -> list[KernelResources]:
    """Compile every CUDA source of the extension (all GENCODE targets, ``-Xptxas -v``) and its
    compute_90 PTX; the resources of every kernel on every cubin target."""
    kernels: list[KernelResources] = []
    with tempfile.TemporaryDirectory(prefix="pyfastrl-ptxas-") as work:
        for source in nvcc_build.CUDA_SOURCES:
            compiled = nvcc_build.compile_cuda(nvcc, source, Path(work) / f"{source.stem}.o", "-Xptxas=-v")
            found = parse_ptxas(source.name, compiled.stdout + compiled.stderr)
            ptx = Path(work) / f"{source.stem}.ptx"
            subprocess.run([nvcc, *nvcc_build.NVCC_FLAGS, "-arch=compute_90", "-ptx", str(source), "-o", str(ptx)],
                           capture_output=True, text=True, check=True)
            vectorised = vectorised_kernels(ptx.read_text())
            for kernel in found:
                kernel.vector_128 = kernel.kernel in vectorised
            kernels += found
    return kernels


def problems(kernels: list[KernelResources]) -> list[str]:
    """What fails the check: nothing compiled, a missing cubin target, spills, stack frames, no 128-bit
    moves in a kernel of ``VECTORISED_SOURCES``."""
    if not kernels:
        return ["ptxas reported no kernels"]
    found = []
    missing = set(nvcc_build.CUBIN_ARCHS) - {k.arch for k in kernels}
    if missing:
        found.append(f"no kernels compiled for {sorted(missing)}")
    for k in kernels:
        where = f"{k.source}: {_demangle(k.kernel)} ({k.arch})"
        if k.spill_stores or k.spill_loads:
            found.append(f"{where}: {k.spill_stores} bytes spill stores, {k.spill_loads} bytes spill loads")
        if k.stack_bytes:
            found.append(f"{where}: {k.stack_bytes} bytes stack frame")
        if not k.vector_128 and k.source in VECTORISED_SOURCES:
            found.append(f"{where}: no 128-bit global load/store in its PTX")
    return found


def _demangle(name: str) -> str:
    if shutil.which("c++filt") is None:
        return name
    return subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name


def report(kernels: list[KernelResources]) -> str:
    lines = [f"{'arch':<7}{'regs':>5}{'smem B':>8}{'stack B':>8}{'spill B':>8}{'128-bit':>8}  kernel"]
    for k in kernels:
        # The template instance only: no namespaces, return type or parameter list.
        name = _demangle(k.kernel).replace("(anonymous namespace)::", "").split("(")[0].split("::")[-1]
        lines.append(f"{k.arch:<7}{k.registers:>5}{k.shared_bytes:>8}{k.stack_bytes:>8}"
                     f"{k.spill_stores + k.spill_loads:>8}{'yes' if k.vector_128 else 'NO':>8}  {k.source}: {name}")
    return "\n".join(lines)


def main() -> int:
    nvcc = nvcc_build.find_nvcc()
    if nvcc is None:
        print("check_resources: nvcc not found ($CUDA_HOME/bin or PATH)", file=sys.stderr)
        return 2
    kernels = check(nvcc)
    print(report(kernels))
    found = problems(kernels)
    for problem in found:
        print(f"FAIL {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
