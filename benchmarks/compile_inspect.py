"""Compile one recorded launch for a GPU architecture (no GPU needed) and read what it costs.

Used by ``compile_check.py`` in worker processes that import the kernel modules with Triton's JIT
(never under ``TRITON_INTERPRET=1``). ``compile_launch`` returns plain data:

* ``registers``, ``stack``, ``local`` (bytes per thread): ``cuobjdump --dump-resource-usage`` of the
  cubin; ``shared``: its static shared bytes plus the dynamic ones of Triton's metadata;
* ``sass``: counts of the tensor-core instructions (``HGMMA`` = wgmma, sm_90a; ``HMMA`` =
  mma.sync) and of local-memory loads/stores (``LDL``/``STL``: spill traffic) in the SASS;
* ``dots``: every ``tl.dot`` of the final TTGIR, one entry per source location: operand dtype,
  result tile ``M x N``, reduction ``K``, and the engine Triton lowered it to: ``"wgmma"``
  (``ttng.warp_group_dot``), ``"mma.sync"`` (``tt.dot`` with an ``nvidia_mma`` v2 layout) or
  ``"fma"`` (``tt.dot`` with a blocked layout: CUDA cores).

The parsers (``parse_resource_usage``, ``count_sass``, ``parse_dots``) take text, so they are tested
on synthetic inputs.
"""
from __future__ import annotations

import collections
import importlib
import os
import re
import resource
import subprocess
import tempfile
import time

SASS_OPCODES = ("HGMMA", "HMMA", "LDL", "STL")
ARCHES = {"sm80": 80, "sm90": 90}


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def parse_resource_usage(text: str) -> dict:
    """``REG``, ``STACK``, ``SHARED``, ``LOCAL`` of the (single) function in ``cuobjdump
    --dump-resource-usage`` output."""
    match = re.search(r"Function [^:\n]+:\s*\n\s*(REG:.*)", text)
    if match is None:
        raise ValueError(f"no function resource line in cuobjdump output: {text[:300]!r}")
    fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", match.group(1)))
    return {key.lower(): int(fields[key.upper()]) for key in ("reg", "stack", "shared", "local")}


def count_sass(text: str) -> dict:
    """How many instructions of each ``SASS_OPCODES`` opcode the SASS listing holds (an opcode with
    any modifiers, e.g. ``HMMA.16816.F32.BF16``, counts as its base)."""
    counts = collections.Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", text))
    return {op: counts.get(op, 0) for op in SASS_OPCODES}


_LOC_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$", re.M)
_FILE_LOC = re.compile(r'^"([^"]+)":(\d+):\d+$')
_NAMED_LOC = re.compile(r'^"[^"]*"\((#loc\d*)\)$')
_CALLSITE_LOC = re.compile(r"^callsite\((#loc\d*) at (#loc\d*)\)$")


def _frames(alias: str, table: dict, depth: int = 0) -> list[str]:
    """``file:line`` frames of a location alias, innermost first."""
    body = table.get(alias)
    if body is None or depth > 50:
        return []
    if m := _FILE_LOC.match(body):
        return [f"{os.path.basename(m.group(1))}:{m.group(2)}"]
    if m := _NAMED_LOC.match(body):
        return _frames(m.group(1), table, depth + 1)
    if m := _CALLSITE_LOC.match(body):
        return _frames(m.group(1), table, depth + 1) + _frames(m.group(2), table, depth + 1)
    return []


_DOT = re.compile(
    r"= (tt\.dot|ttng\.warp_group_dot) (?P<body>[^\n]*?)"
    r":\s*(?:!ttg\.memdesc|tensor)<(?P<m>\d+)x(?P<k>\d+)x(?P<dtype>\w+)[,>][^\n]*?"
    r"->\s*tensor<(?P<rm>\d+)x(?P<rn>\d+)x\w+,\s*(?P<enc>#[\w.]+(?:<\{[^}]*\}>)?)>[^\n]*?loc\((?P<loc>#loc\d*)\)")


def parse_dots(ttgir: str) -> list[dict]:
    """The ``tl.dot`` sites of a TTGIR module: one dict per distinct (source location, operand
    dtype, tile, engine), with ``count`` = how many ops the pipeliner made of it."""
    aliases = dict(re.findall(r"^(#\w+) = (#ttg\.\w+<.*)$", ttgir, re.M))
    locations = dict(_LOC_DEF.findall(ttgir))
    sites: dict[tuple, dict] = {}
    for m in _DOT.finditer(ttgir):
        encoding = aliases.get(m.group("enc"), m.group("enc"))
        if m.group(1) == "ttng.warp_group_dot":
            engine = "wgmma"
        elif "nvidia_mma" in encoding:
            version = re.search(r"versionMajor = (\d+)", encoding)
            engine = "wgmma" if version and version.group(1) == "3" else "mma.sync"
        else:
            engine = "fma"
        precision = re.search(r"inputPrecision = (\w+)", m.group("body"))
        site = {
            "where": " < ".join(_frames(m.group("loc"), locations)) or "?",
            "dtype": m.group("dtype"),
            "m": int(m.group("rm")), "n": int(m.group("rn")), "k": int(m.group("k")),
            "engine": engine,
            "precision": precision.group(1) if precision else "",
        }
        key = tuple(site.values())
        sites.setdefault(key, dict(site, count=0))["count"] += 1
    return list(sites.values())


def _stand_in(descriptor):
    """An argument Triton's binder specialises exactly as the recorded one."""
    kind, *rest = descriptor
    if kind != "tensor":
        return rest[0]
    import torch

    class Pointer:
        dtype = getattr(torch, rest[0])

        @staticmethod
        def data_ptr():
            return 0 if rest[1] else 8

    return Pointer()


def _compiled(kernel: str, params, options, arch: int):
    """Compile the launch as ``JITFunction.run`` would on a device of ``arch``: Triton's own binder
    and argument packing turn the arguments into signature, constexprs and attributes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    module_name, function_name = kernel.split(":")
    fn = getattr(importlib.import_module(module_name), function_name)
    if not hasattr(fn, "_pack_args"):
        raise RuntimeError(f"{kernel} is not a JIT function here (is TRITON_INTERPRET set in the worker?)")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(options)
    bound, specialization, parsed = binder(*(_stand_in(d) for _, d in params), **kwargs)
    parsed, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, parsed)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=parsed.__dict__)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas, cuobjdump): the compile's cost on
    an idle core, whatever else the machine runs."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _measure(compiled) -> dict:
    """Resources, SASS counts and dots of a compiled kernel."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    resources = parse_resource_usage(usage)
    return {
        "registers": resources["reg"],
        "stack": resources["stack"],
        "local": resources["local"],
        "shared": resources["shared"] + compiled.metadata.shared,
        "num_warps": compiled.metadata.num_warps,
        "num_stages": compiled.metadata.num_stages,
        "sass": count_sass(sass),
        "dots": parse_dots(compiled.asm["ttgir"]),
    }


def compile_launch(task: tuple) -> dict:
    """``task = (kernel, params, options, target)``; returns the measurements, or ``{"error": ...}``
    with the compiler's message (last lines). Both carry ``seconds`` (wall) and ``cpu_seconds``."""
    kernel, params, options, target = task
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    try:
        result = _measure(_compiled(kernel, params, options, ARCHES[target]))
    except Exception as error:  # noqa: BLE001 - every compiler failure is a finding, reported as such
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        result = {"error": (f"{type(error).__name__}: " + " | ".join(lines[-6:]))[-1500:]}
    return {**result, "seconds": time.perf_counter() - started, "cpu_seconds": _cpu_seconds() - cpu_started}


def worker_init() -> None:
    """Pool initializer: kernels imported in this process must be JIT functions."""
    os.environ["TRITON_INTERPRET"] = "0"
