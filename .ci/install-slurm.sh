#!/usr/bin/env bash
# Install what tests/slurm needs to start a real one-node Slurm: slurmctld, slurmd, the client commands,
# munge and the PMI/PMIx plugins that srun uses to wire up MPI ranks. Idempotent; CI runs it as root on a
# fresh Debian 12. It installs packages only: the test harness runs the daemons itself, as root, from a
# temporary directory with its own config and munge key, so nothing here is configured or started.
set -euo pipefail

packages=(
  slurmctld slurmd slurm-client          # the daemons and sbatch/srun/squeue/scontrol/sacct
  slurm-wlm-basic-plugins                # select/cons_tres, proctrack, mpi/pmi2 (and mpi/pmix where built)
  munge libmunge2                        # authentication between the commands and the daemons
  libpmix2 libpmi2-0                     # PMIx (Open MPI's client side) and Slurm's PMI-2 library
  openmpi-bin libopenmpi-dev             # mpirun fallback and mpi4py's MPI
  tcl lmod                               # tests load the Tcl and Lua modulefiles with Lmod
  procps                                 # pgrep/ps for the harness teardown
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "install-slurm: all packages present: ${packages[*]}"
else
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  echo "install-slurm: installing ${missing[*]}"
  # No service should start from a package script: in a container there is no init, and on a CI machine the
  # tests run their own daemons. policy-rc.d 101 = "action forbidden"; removed again afterwards if we made it.
  made_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  trap '[[ $made_policy == 1 ]] && $SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

echo "install-slurm: $(slurmctld -V 2>/dev/null || echo 'slurmctld missing'), munged $(munged -V 2>/dev/null | head -1 || true)"
echo "install-slurm: srun MPI plugins: $(ls /usr/lib/x86_64-linux-gnu/slurm-wlm/mpi_*.so 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')"
