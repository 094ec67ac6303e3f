"""spmd_diff.models: model adapters, stage functions over diffusers components. No MPI here.

- :mod:`spmd_diff.models.wan`: Wan text-to-video as encode / denoise / decode stages (``WanStages``).
- :mod:`spmd_diff.models.demo`: the built-in tiny Wan2.1-architecture demo model (``demo_model_dir``).

Submodules import torch and diffusers; import them directly (this package stays cheap to import).
"""
