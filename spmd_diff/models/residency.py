"""Components that move: a module's weights kept in host memory, copied to the device only while a stage uses it.

A time-shared rank (``RolePlan.time_shared``) holds every stage's components but keeps one stage's on its device
at a time. :class:`HostCopy` takes a module's parameters and buffers to host memory once (pinned for a CUDA
device, so the copies back are fast and asynchronous); :meth:`HostCopy.to_device` re-creates the device tensors
from it and :meth:`HostCopy.drop` points the module back at the host tensors, releasing the device copies. The
host tensors are never written, so the weights are the same bits after any number of moves, and no copy ever
goes from the device to the host after the first.

On a CPU device the "device copy" is a clone of the host tensor, so the same bookkeeping runs (and is tested)
without a GPU.
"""

from __future__ import annotations

import torch


class HostCopy:
    """One module's tensors in host memory; its device copy made and dropped on demand.

    ``module``: on any device (e.g. just built on the GPU). The constructor copies every parameter and buffer to
    host memory (pinned when ``device`` is CUDA; a tensor already in host memory is kept as it is, not copied, for
    a CPU device) and leaves the module pointing at the host copies: call :meth:`to_device` before using it.
    Parameters keep their ``nn.Parameter`` objects (only ``.data`` changes), so hooks and references held by
    others stay valid; tensors shared by several submodules (tied weights) are moved once.
    """

    def __init__(self, module: torch.nn.Module, device: str | torch.device) -> None:
        self.module = module
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self._hosts: list[torch.Tensor] = []
        self._slots: list[tuple[dict, str, int]] = []  # (a module's _parameters or _buffers, key, host index)
        seen: dict[int, int] = {}
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for key, tensor in table.items():
                    if tensor is None:
                        continue
                    if id(tensor) not in seen:
                        seen[id(tensor)] = len(self._hosts)
                        self._hosts.append(_host_tensor(tensor.detach(), pin))
                    self._slots.append((table, key, seen[id(tensor)]))
        self.nbytes = sum(t.numel() * t.element_size() for t in self._hosts)
        """Bytes of the module's tensors (what one move copies)."""
        self.on_device = True
        self.drop()

    def to_device(self) -> None:
        """Copy the host tensors to the device and point the module at the copies (synchronised: the module is
        usable on any stream afterwards)."""
        if self.on_device:
            return
        if self.device.type == "cuda":
            copies = [t.to(self.device, non_blocking=True) for t in self._hosts]
            torch.cuda.current_stream(self.device).synchronize()
        else:
            copies = [t.clone() for t in self._hosts]
        self._point_at(copies)
        self.on_device = True

    def drop(self) -> None:
        """Point the module back at the host tensors; the device copies are released once nothing else holds
        them (call ``torch.cuda.empty_cache()`` afterwards to return the memory)."""
        self._point_at(self._hosts)
        self.on_device = False

    def host_tensors(self) -> list[torch.Tensor]:
        """The host copies (for tests: they must never change)."""
        return list(self._hosts)

    def _point_at(self, tensors: list[torch.Tensor]) -> None:
        for table, key, index in self._slots:
            current = table[key]
            if isinstance(current, torch.nn.Parameter):
                current.data = tensors[index]
            else:
                table[key] = tensors[index]


def _host_tensor(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """``tensor`` in host memory: pinned (a copy) when ``pin``; a CPU tensor is kept as it is otherwise."""
    if pin:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor)
        return host
    return tensor if tensor.device.type == "cpu" else tensor.to("cpu")


def cap_gpu_memory(device: str, gpu_memory_gib: float) -> None:
    """``world.gpu_memory_gib`` > 0 on a GPU: from this call on (the engine calls it at the end of loading), the
    caching allocator refuses to hold more than that (a rank planned for a smaller GPU runs out of memory as it
    would there, instead of borrowing the larger one's). Loading is left out: a random-weights model builds each
    component in float32 before casting it, which a real model's loading never holds."""
    if gpu_memory_gib <= 0 or not str(device).startswith("cuda"):
        return
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_memory_gib * 2**30 / total), torch.device(device))
