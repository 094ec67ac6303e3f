"""spmd_diff.models: model adapters, stage functions over diffusers components. No MPI here.

- :mod:`spmd_diff.models.wan`: Wan text-to-video as encode / denoise / decode stages (``WanStages``).
- :mod:`spmd_diff.models.wan_i2v`: Wan image-to-video as the same stages (``WanI2VStages``).
- :mod:`spmd_diff.models.tasks`: text- or image-to-video, from ``model_index.json`` (no torch).
- :mod:`spmd_diff.models.demo`: the built-in tiny Wan2.1-architecture demo models, T2V and I2V (``demo_model_dir``).
- :mod:`spmd_diff.models.random_wan`: published Wan2.1 configs with random weights (``random:<arch>``).

Submodules import torch and diffusers; import them directly (this package stays cheap to import).
"""
