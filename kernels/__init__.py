"""Kernel sources, installed as ``pyfastrl.kernels``: one folder per op, holding its Triton kernels
(``kernel.py``) beside the plain-PyTorch reference they are tested against (``reference.py``)."""
