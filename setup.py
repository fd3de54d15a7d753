"""pyfastrl: custom kernels for GRPO-style RL post-training of language models.

A plain ``pip install .`` needs no CUDA toolchain: the Triton kernels are Python sources
(``kernels/``, installed as ``pyfastrl.kernels``) compiled by Triton at first use. The optional
CUDA extension built from ``csrc/`` will be added here behind an opt-in environment variable.
"""
from setuptools import setup

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
)
