"""How many processes a launcher started for this run, read from the environment alone (no torch):
the command line asks before anything loads, the trainer before it trains."""

from __future__ import annotations

import os

# torchrun, accelerate launch and deepspeed set WORLD_SIZE and RANK; MPI launchers (mpirun, Intel MPI,
# MVAPICH) their own, which accelerate reads too.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def launched_processes() -> int:
    """The processes of this launch (1 outside a launcher; a value that is not a positive count is
    taken as none given)."""
    return _launch()[1]


def launch_variable() -> str:
    """The environment variable that says this process is one of several (for messages)."""
    return _launch()[0]


def _launch() -> tuple[str, int]:
    """The first of WORLD_SIZE_VARIABLES holding a positive count, and the count (WORLD_SIZE, 1: none)."""
    for name in WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return name, int(value)
    return "WORLD_SIZE", 1


def process_rank() -> int:
    """This process's rank in its launch (0 outside a launcher, and where none is readable)."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0
