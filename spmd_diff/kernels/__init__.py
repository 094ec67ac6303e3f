"""Triton/CUDA kernels, each with a torch reference (imported through ``spmd_diff.comm.kernel_loader``)."""
