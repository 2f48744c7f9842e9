"""Running a test worker on several spawned gloo ranks (no Lightning imports: the children import the test module).

A worker is ``worker(rank, port, out_dir)``: it joins the process group on ``127.0.0.1:port`` and saves what the test
checks as ``out_dir/rank{rank}.pt``; :func:`run_ranks` returns those files loaded, in rank order.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free right now (a launcher's rendezvous port; the small race with other processes is accepted)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(worker: Callable[[int, int, str], None], out_dir: Path, world: int) -> list[Any]:
    """Spawns ``world`` ranks of ``worker`` (spawn, never fork: the test process has run torch threads) and loads the
    result each rank saved."""
    mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=world, start_method="spawn", join=True)
    return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
