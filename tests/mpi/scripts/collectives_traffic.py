"""Group-free collectives over MpiRmaTransport, checked against numpy references (tests/collective_cases.py).

Several schedules in one run (torch imports dominate a run's time): groups of 2-4 ranks in random order,
overlapping groups one after another, uneven and empty splits, five dtypes; one schedule with 256-byte chunk
buffers so long messages cross many chunks; then a timing of group formation against ``MPI.Comm.Split``.
Rank 0 writes RESULT_JSON once every check passed: ``{"num_ranks", "rank_operations_checked", "schedule_s": {seed:
seconds}, "group_formation_us", "mpi_comm_split_us"}``.

    mpirun -n 4 python tests/mpi/scripts/collectives_traffic.py RESULT_JSON
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root, for tests.collective_cases

from spmd_diff.comm.collective_layout import CollectiveLayout  # noqa: E402
from spmd_diff.comm.collectives import GroupCollectives  # noqa: E402
from spmd_diff.comm.mpi_rma import MpiRmaTransport  # noqa: E402
from tests.collective_cases import run_schedule, schedule  # noqa: E402


def main() -> int:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    small = CollectiveLayout.bytes_needed(size, 4, 256)
    transport = MpiRmaTransport(comm, small + (4 << 20))
    try:
        tiny = GroupCollectives(transport, 0, small, max_ranks=4, chunk_bytes=256, timeout_s=60)
        roomy = GroupCollectives(transport, (small + 255) // 256 * 256, 4 << 20, max_ranks=4, timeout_s=60)
        ran = 0
        schedule_s = {}
        for seed, coll, num_ops, max_count in ((11, roomy, 60, 4000), (12, tiny, 25, 700), (13, roomy, 60, 20000)):
            t0 = time.perf_counter()
            ran += run_schedule(coll, seed, schedule(size, seed, num_ops, max_count=max_count))
            schedule_s[seed] = time.perf_counter() - t0
        total = comm.allreduce(ran)
        t0 = time.perf_counter()
        for k in range(1000):
            roomy.group([rank, (rank + 1 + k % (size - 1)) % size])
        ours_us = (time.perf_counter() - t0) * 1e3
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(20):
            comm.Split(rank % 2, rank).Free()
        split_us = (time.perf_counter() - t0) / 20 * 1e6
        if rank == 0:
            result = {"num_ranks": size, "rank_operations_checked": total, "schedule_s": schedule_s,
                      "group_formation_us": ours_us, "mpi_comm_split_us": split_us}
            Path(sys.argv[1]).write_text(json.dumps(result, indent=1) + "\n")
            print(json.dumps(result), flush=True)
    finally:
        transport.free()
    return 0


if __name__ == "__main__":
    sys.exit(main())
