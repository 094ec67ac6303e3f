"""The channel's wire format: a ``Message`` (JSON meta and named tensors) as a slot header plus payload, and back.

A slot holds a ``HEADER_BYTES`` header (fixed fields: magic, kind, description length, message index, payload
bytes; then a JSON description of the meta and of every tensor's name, dtype, shape, offset and bytes) and the
tensors' bytes, each at an ``ALIGN``-aligned offset of the payload.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

from spmd_diff.comm.heap_layout import ALIGN, HEADER_BYTES, EdgeLayout
from spmd_diff.comm.transport import Transport, as_byte_tensor, round_up

MAGIC = b"SPMDCH01"
FIXED = struct.Struct("<8sIIqQ")  # magic, kind, json length, message index k, payload bytes
KIND_DATA = 1
KIND_END = 2
MAX_DESCRIPTION_BYTES = HEADER_BYTES - FIXED.size
"""Largest JSON description (meta + tensor names, dtypes, shapes, offsets) a header holds."""


@dataclass
class Message:
    """What a channel carries: small JSON metadata and named tensors (any dtype and shape).

    Tensors travel from wherever they are to the transport's heap (host memory for MPI, GPU memory for NVSHMEM:
    a CPU tensor is copied up, a GPU tensor copied down for a host heap); the receiver gets them on the
    transport's device (``transport.device``).
    """

    meta: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable; the key ``"item"``, if present, names the item in error messages."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    end_of_stream: bool = False
    """Set on the message ``ChannelSender.close`` sends."""

    @property
    def item(self) -> Any:
        return self.meta.get("item")

    def payload_bytes(self) -> int:
        """Slot payload bytes this message needs: each tensor's bytes rounded up to ``ALIGN``."""
        return sum(round_up(t.numel() * t.element_size(), ALIGN) for t in self.tensors.values())


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise RuntimeError(f"channel header names an unknown dtype {name!r}")
    return dtype


def encode_message(edge: EdgeLayout, kind: int, k: int, meta: dict[str, Any],
            tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[tuple[int, torch.Tensor]]]:
    """Header bytes and ``(payload offset, tensor)`` placements of message ``k``; validates sizes."""
    descriptors, placements, offset = [], [], 0
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(f"channel {edge.name!r}: tensors must map str to torch.Tensor, got {name!r}: "
                             f"{type(tensor).__name__}")
        nbytes = tensor.numel() * tensor.element_size()
        descriptors.append([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset, nbytes])
        placements.append((offset, tensor))
        offset += round_up(nbytes, ALIGN)
    if offset > edge.spec.slot_bytes:
        listing = ", ".join(f"{d[0]} {d[1]}{tuple(d[2])} {d[4]} B" for d in descriptors)
        raise ValueError(f"channel {edge.name!r} (rank {edge.producer} -> rank {edge.consumer}): message needs "
                         f"{offset} payload bytes ({listing}; each rounded up to {ALIGN}), more than the ring's "
                         f"slot_bytes={edge.spec.slot_bytes}")
    try:
        description = json.dumps({"meta": meta, "tensors": descriptors}, separators=(",", ":")).encode()
    except (TypeError, ValueError) as error:
        raise ValueError(f"channel {edge.name!r}: message meta is not JSON-serialisable: {error}") from error
    if len(description) > MAX_DESCRIPTION_BYTES:
        raise ValueError(f"channel {edge.name!r}: message header needs {len(description)} bytes of JSON (meta and "
                         f"{len(descriptors)} tensor descriptors), more than the {MAX_DESCRIPTION_BYTES} a "
                         f"{HEADER_BYTES}-byte header holds; keep meta small")
    header = FIXED.pack(MAGIC, kind, len(description), k, offset) + description
    return header, [(off, t) for off, t in placements if t.numel()]


def to_heap_device(tensor: Any, device: torch.device, channel: str, name: str) -> torch.Tensor:
    """``tensor`` contiguous on the heap's device (a host heap takes CPU tensors; a GPU heap its own GPU's)."""
    if not isinstance(tensor, torch.Tensor):
        return tensor  # encode_message reports it
    tensor = tensor.detach()
    if device.type == "cpu":
        tensor = tensor.cpu()
    elif tensor.device.type == "cpu":
        tensor = tensor.to(device, non_blocking=tensor.is_pinned())
    elif tensor.device != device:
        raise ValueError(f"channel {channel!r}: tensor {name!r} is on {tensor.device}, the heap on {device}")
    return tensor.contiguous()


def decode_message(transport: Transport, edge: EdgeLayout, slot: int, k: int) -> Message:
    """Copy message ``k`` out of ``slot`` of this rank's ring into new tensors."""
    fixed = transport.local_view(edge.header_offset(slot), FIXED.size).tobytes()
    magic, kind, description_bytes, index, payload_bytes = FIXED.unpack(fixed)
    if (magic != MAGIC or kind not in (KIND_DATA, KIND_END) or index != k
            or description_bytes > MAX_DESCRIPTION_BYTES or payload_bytes > edge.spec.slot_bytes):
        raise RuntimeError(f"channel {edge.name!r}: corrupt header in slot {slot} for message {k}: "
                           f"magic {magic!r}, kind {kind}, message {index}, description {description_bytes} B, "
                           f"payload {payload_bytes} B")
    raw = transport.local_view(edge.header_offset(slot) + FIXED.size, description_bytes).tobytes()
    description = json.loads(raw)
    tensors = {}
    for name, dtype_name, shape, offset, nbytes in description["tensors"]:
        tensor = torch.empty(shape, dtype=_dtype_from_name(dtype_name), device=transport.device)
        if tensor.numel() * tensor.element_size() != nbytes or offset + nbytes > payload_bytes:
            raise RuntimeError(f"channel {edge.name!r}: corrupt descriptor of tensor {name!r} in message {k}")
        if nbytes:
            as_byte_tensor(tensor).copy_(transport.local_tensor(edge.payload_offset(slot) + offset, nbytes))
        tensors[name] = tensor
    return Message(meta=description["meta"], tensors=tensors, end_of_stream=kind == KIND_END)
