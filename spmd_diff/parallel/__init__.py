"""spmd_diff.parallel: sequence parallelism for DiT groups, attached to diffusers' Wan transformer from outside.

- :mod:`~spmd_diff.parallel.layout`: ``resolve_layout(sp_layout, sp_degree, num_heads, torus_shape) -> SPLayout``
  (pure).
- :mod:`~spmd_diff.parallel.seq_comm`: ``SeqComm`` (what attention needs from communication) and ``GroupSeqComm``
  over the project's group-free collectives (``spmd_diff.comm``); :mod:`~spmd_diff.parallel.torch_comm`:
  ``TorchSeqComm`` over torch.distributed (NCCL), the baseline benchmarks and GPU tests compare against.
- :mod:`~spmd_diff.parallel.attention`: Ulysses, ring and torus attention with log-sum-exp merging.
- :mod:`~spmd_diff.parallel.hooks`: ``parallelize_transformer(transformer, attention) -> SPHandle``.
- :mod:`~spmd_diff.parallel.group_denoise`: ``SPDenoiser``: what the engine calls on every rank of a DiT group.
"""

from spmd_diff.parallel.layout import LAYOUTS, SPLayout, resolve_layout

__all__ = ["LAYOUTS", "SPLayout", "resolve_layout"]
