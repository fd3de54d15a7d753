"""Local linear attention: Triton kernels (``kernel``) and the PyTorch backend plus the naive reference (``reference``)."""
