"""spmd_diff.comm: the data plane: transports (a symmetric heap with one-sided puts and signal words), the double-ring
channel and the group collectives (module by module: docs/architecture.md, "Layers").

Every name is imported lazily (PEP 562): ``spmd_diff.comm.world`` must load without torch (the engine validates a
job before importing it), and importing ``mpi4py.MPI`` initialises MPI, which unit tests and planning code must
not pay for. ``from spmd_diff.comm import ChannelSender`` and ``spmd_diff.comm.MpiRmaTransport`` both work.
"""

import importlib

_HOMES = {
    "HEADER_BYTES": "heap_layout", "ChannelEdge": "heap_layout", "EdgeLayout": "heap_layout",
    "HeapLayout": "heap_layout", "RingSpec": "heap_layout",
    "Message": "wire",
    "ChannelReceiver": "channel", "ChannelSender": "channel", "ReceiverPoller": "channel",
    "pick_sender": "channel", "select_ready": "channel",
    "Group": "collectives", "GroupCollectives": "collectives",
    "LocalTransport": "local", "LocalWorld": "local", "run_local": "local",
    "Transport": "transport",
    "MpiRmaTransport": "mpi_rma",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'spmd_diff.comm' has no attribute {name!r}")
    return getattr(importlib.import_module(f"spmd_diff.comm.{home}"), name)
