"""spmd_diff: one SPMD program that renders videos in bulk with diffusion transformers."""

__version__ = "0.1.0"
