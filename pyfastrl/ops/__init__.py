"""Ops: torch.library custom ops with autograd over the kernels, and their input checks."""
