"""Test set-up. Without CUDA, Triton kernels run through Triton's CPU interpreter: the variable must
be set before any kernel module is imported, so it is set here, before pyfastrl is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (compiled Triton kernels, larger sizes)")
    config.addinivalue_line("markers", "compile: compiles kernels for sm_80/sm_90a without a GPU and checks their "
                            "resources (benchmarks/compile_check.py, csrc/check_resources.py)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
