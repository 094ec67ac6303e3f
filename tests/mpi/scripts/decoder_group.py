"""Two decoder ranks decoding as one group over the project's collectives on MPI RMA (CPU, the demo VAE, float32),
against the one-rank decode of every item.

Items arrive at either rank on its own schedule (rank 0: items 0, 2, 3; rank 1: item 1), latent heights 5 and 7
(uneven over 2) and 1 (too short to split: its holder decodes alone). Each rank checks the videos it received
and rank 0 prints one line per item for every rank, then "decoder_group: all ok" when every rank's checks passed.

    mpirun -n 2 python tests/mpi/scripts/decoder_group.py MODEL_DIR
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402

from spmd_diff.comm.collectives import GroupCollectives  # noqa: E402
from spmd_diff.comm.mpi_rma import MpiRmaTransport  # noqa: E402
from spmd_diff.models.wan import WanStages  # noqa: E402
from spmd_diff.parallel.seq_comm import GroupSeqComm  # noqa: E402
from spmd_diff.parallel.decoder_group import DecoderGroup, run_rounds  # noqa: E402

SIZES = {0: (5, 6, 2), 1: (7, 5, 3), 2: (1, 4, 2), 3: (3, 3, 2)}  # item -> latent height, width, frames
ARRIVALS = {0: [[0], [], [2], [], [3]], 1: [[], [1]]}  # per rank, per poll: the items arrived by then


def main() -> int:
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    assert world.Get_size() == 2, "run with mpirun -n 2"
    torch.set_num_threads(1)
    stages = WanStages(sys.argv[1], {"decode"})
    z_dim = stages.vae.config.z_dim
    items = {index: torch.randn(1, z_dim, f, h, w, generator=torch.Generator().manual_seed(10 + index))
             for index, (h, w, f) in SIZES.items()}
    transport = MpiRmaTransport(world, 8 << 20)
    coll = GroupCollectives(transport, 0, 4 << 20, max_ranks=2, timeout_s=120)
    failures, lines = 0, []
    try:
        group = DecoderGroup(stages, GroupSeqComm(coll.group([0, 1]), coll.group))
        polls, held, got = list(ARRIVALS[rank]), [], {}

        def next_offer():
            if polls:
                held.extend(polls.pop(0))
            offer = (held[0], items[held.pop(0)]) if held else None
            return offer, not polls and not held

        t0 = time.perf_counter()
        count = run_rounds(group, next_offer, got.__setitem__, lambda: time.sleep(0.001))
        elapsed = time.perf_counter() - t0
        expected = sorted(i for polled in ARRIVALS[rank] for i in polled)
        if sorted(got) != expected or count != len(expected):
            lines.append(f"rank {rank}: received items {sorted(got)}, expected {expected} FAIL")
            failures += 1
        for index, video in sorted(got.items()):
            reference = stages.decode_uint8(items[index])
            levels = (int((video.to(torch.int16) - reference.to(torch.int16)).abs().max())
                      if video.shape == reference.shape else -1)
            ok = 0 <= levels <= 1
            failures += not ok
            lines.append(f"rank {rank} item {index} latents {tuple(items[index].shape)}: video {tuple(video.shape)}, "
                         f"max diff {levels} level(s) {'ok' if ok else 'FAIL'}")
        lines.append(f"rank {rank}: {count} video(s) in {elapsed:.2f} s")
    finally:
        coll.free()
        transport.free()
    failures = world.allreduce(failures)
    gathered = world.gather(lines, root=0)  # rank 0 prints every rank's lines, so two ranks' output never interleaves
    if rank == 0:
        print("\n".join(line for rank_lines in gathered for line in rank_lines), flush=True)
        print(f"decoder_group: {'all ok' if failures == 0 else f'{failures} failure(s)'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
