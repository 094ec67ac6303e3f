"""spmd_diff.comm: transports (a symmetric heap with one-sided puts and signal words) and the double-ring channel.

``MpiRmaTransport`` is imported lazily: importing ``mpi4py.MPI`` initialises MPI, which unit tests and
planning code must not pay for (``from spmd_diff.comm.mpi_rma import MpiRmaTransport`` or
``spmd_diff.comm.MpiRmaTransport`` both work).
"""

from spmd_diff.comm.channel import (
    HEADER_BYTES,
    ChannelEdge,
    ChannelReceiver,
    ChannelSender,
    EdgeLayout,
    HeapLayout,
    Message,
    ReceiverPoller,
    RingSpec,
    pick_sender,
    select_ready,
)
from spmd_diff.comm.local import LocalTransport, LocalWorld, run_local
from spmd_diff.comm.transport import Transport

__all__ = [
    "HEADER_BYTES",
    "ChannelEdge",
    "ChannelReceiver",
    "ChannelSender",
    "EdgeLayout",
    "HeapLayout",
    "LocalTransport",
    "LocalWorld",
    "Message",
    "ReceiverPoller",
    "RingSpec",
    "Transport",
    "pick_sender",
    "run_local",
    "select_ready",
]


def __getattr__(name: str):
    if name == "MpiRmaTransport":
        from spmd_diff.comm.mpi_rma import MpiRmaTransport

        return MpiRmaTransport
    raise AttributeError(f"module 'spmd_diff.comm' has no attribute {name!r}")
