"""Probe of the CUDA data-plane kernels' own deadline on one GPU (no peers): a wait on a word that never reaches
its target must give up after ``timeout_s`` and record the word's address. Prints what it sees; exits 1 if the
wait did not end within 20 s.

    python3 tests/gpu/scripts/kernel_timeout_probe.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from spmd_diff.comm.kernel_loader import load_kernel_module  # noqa: E402


def main() -> int:
    cuda = load_kernel_module("p2p_cuda")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    kernels = cuda.CudaP2P(device, 256, timeout_s=0.5)
    word = torch.zeros(1, dtype=torch.int64, device=device)
    stream = torch.cuda.current_stream(device)
    start = time.monotonic()
    kernels.wait_at_least(word.data_ptr(), 1)
    print("launched", flush=True)
    while not stream.query():
        if time.monotonic() - start > 20:
            print(f"the wait did not end within 20 s; failure word {kernels.failure():#x}", flush=True)
            return 1
        time.sleep(0.01)
    elapsed = time.monotonic() - start
    print(f"the wait ended after {elapsed:.2f} s; failure word {kernels.failure():#x} (the word: "
          f"{word.data_ptr():#x})", flush=True)
    return 0 if kernels.failure() == word.data_ptr() else 1


if __name__ == "__main__":
    sys.exit(main())
