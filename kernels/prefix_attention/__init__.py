"""Prefix-grouped attention: Triton kernels (``kernel``) and the PyTorch reference (``reference``)."""
