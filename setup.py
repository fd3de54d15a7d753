"""pyfastrl: custom kernels for GRPO-style RL post-training of language models.

A plain ``pip install .`` needs no CUDA toolchain: the Triton kernels are Python sources
(``kernels/``, installed as ``pyfastrl.kernels``) compiled by Triton at first use. The optional
CUDA extension ``pyfastrl._cuda`` (``csrc/``) is built only with ``PYFASTRL_BUILD_CUDA=1``: its
``.cu`` sources go through nvcc (setuptools knows no CUDA; ``csrc/nvcc_build.py`` holds the flags),
``csrc/bindings.cpp`` through the host compiler with pybind11, linked against the static CUDA runtime.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

BUILD_CUDA = os.environ.get("PYFASTRL_BUILD_CUDA", "0") not in ("", "0")


def _nvcc_build():
    spec = importlib.util.spec_from_file_location("nvcc_build", Path(__file__).parent / "csrc" / "nvcc_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildCudaExt(build_ext):
    """Compiles an extension's ``.cu`` sources with nvcc into objects, then builds the rest as usual."""

    def build_extension(self, ext):
        import pybind11  # a build requirement only when PYFASTRL_BUILD_CUDA is set (setup_requires)

        nvcc_build = _nvcc_build()
        nvcc = nvcc_build.find_nvcc()
        if nvcc is None:
            raise RuntimeError("PYFASTRL_BUILD_CUDA=1 but nvcc was found neither in $CUDA_HOME/bin nor on PATH")
        include_dirs, library_dirs = nvcc_build.toolkit_dirs(nvcc)
        objects = []
        for source in (s for s in ext.sources if s.endswith(".cu")):
            target = Path(self.build_temp) / (Path(source).stem + ".o")
            target.parent.mkdir(parents=True, exist_ok=True)
            print(f"nvcc {source} -> {target}")
            nvcc_build.compile_cuda(nvcc, Path(source), target)
            objects.append(str(target))
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        ext.extra_objects = objects + list(ext.extra_objects or [])
        ext.depends = objects + list(ext.depends or [])  # relink when only a .cu source changed
        ext.include_dirs = [pybind11.get_include(), "csrc", *include_dirs, *ext.include_dirs]
        ext.library_dirs = [*library_dirs, *ext.library_dirs]
        super().build_extension(ext)


cuda_extension = dict(
    ext_modules=[Extension(
        "pyfastrl._cuda",
        # bindings.cpp and the kernel sources nvcc_build.CUDA_SOURCES lists (paths relative to here).
        sources=["csrc/bindings.cpp",
                 *(Path(source).relative_to(Path(__file__).resolve().parent).as_posix()
                   for source in _nvcc_build().CUDA_SOURCES)],
        # The static runtime: the module needs only the driver (libcuda), not a libcudart of nvcc's version.
        libraries=["cudart_static", "dl", "rt", "pthread"],
        extra_compile_args=["-std=c++17", "-O3"],
        language="c++",
    )],
    cmdclass={"build_ext": BuildCudaExt},
    setup_requires=["pybind11>=2.12"],
) if BUILD_CUDA else {}

setup(
    name="pyfastrl",
    version="0.1.0",
    description="Custom-kernel ops for GRPO post-training: shared-prefix grouped attention, fused GRPO loss, "
    "local linear attention",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "pyfastrl",
        "pyfastrl.ops",
        "pyfastrl.integrations",
        "pyfastrl.trainer",
        "pyfastrl.kernels",
        "pyfastrl.kernels.prefix_attention",
        "pyfastrl.kernels.grpo_loss",
        "pyfastrl.kernels.local_linear_attention",
    ],
    # The Triton sources live in the top-level kernels/ folder but import as pyfastrl.kernels:
    # a top-level module named `kernels` would collide with the unrelated PyPI package.
    package_dir={"pyfastrl.kernels": "kernels"},
    # No upper pin here (users bring their own CUDA torch); requirements-cpu.txt pins the CPU stack.
    install_requires=["torch>=2.5", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest>=8", "transformers>=4.56"],
        "train": ["transformers>=4.56", "matplotlib"],
        # pyfastrl.integrations.trl subclasses TRL's GRPOTrainer internals: the range it is tested with.
        "trl": ["trl>=1.16,<1.17"],
    },
    entry_points={"console_scripts": ["pyfastrl=pyfastrl.cli:main"]},
    **cuda_extension,
)
