"""Triton/CUDA kernels, each with a torch reference. Installed as spmd_diff.kernels."""
