"""spmd_diff.plan: what the job got and what each rank does. Pure Python: no MPI, no torch, no diffusers.

- ``topology``: the allocation (:class:`Topology`); ``roles``: the plan (:class:`RolePlan`) and ``plan_roles``
  for ``roles.policy = "static"``.
- ``workload``: items per shape class (:class:`WorkClass`, :class:`Workload`, ``horizon``).
- ``model_sizes``, ``memory``: component sizes from configs, bytes per rank for a set of stages.
- ``cost`` (the analytic model, deadlines), ``cost_model`` (seconds per stage fitted online), ``timings``
  (the per-rank record of one batch, allgathered).
- ``throughput``: predicted time of a plan; ``planner``: ``plan_auto``; ``replan``: hysteresis and the
  :class:`Rebalancer` the runtime calls between batches; ``degree``: ``pick_degree``, each item's SP degree
  when it starts (per-item groups).
"""
