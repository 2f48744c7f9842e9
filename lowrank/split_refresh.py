"""Splitting a refresh's SVDs across data-parallel ranks (DDP: plain tensors, identical gradients on every rank).

Without splitting every rank computes every new basis itself: identical inputs and seeded draws give identical bases
with no communication (docs/reference.md, Randomness), but each rank pays for all the SVDs of a refresh. Split, the due
parameters (in the optimizer's order, the same on every rank) are dealt round-robin: rank ``i % world`` computes the
i-th basis, then broadcasts it. Each rank computes about 1/world of the SVDs and receives the rest (one broadcast per
basis, d x r values).

The basis a rank would have computed itself is the same number for number (same gradient, same generator), and the
optimizer installs every basis as a contiguous tensor, split or not: a split refresh is bitwise the unsplit one.
Memory: each rank holds its share of new bases until the broadcasts (at most about 1/world of a refresh's bases).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class SplitJob:
    """One basis to compute on one rank and share.

    Attributes:
        select: computes the basis (d, r), or None for "no refresh" (all-zero or non-finite gradient).
        shape: (d, r), known on every rank without computing it.
        device: where the broadcast runs (the gradient's device: CPU for gloo, CUDA for NCCL).
        dtype: the broadcast dtype; it must hold the selector's output exactly.
    """

    select: Callable[[], torch.Tensor | None]
    shape: tuple[int, int]
    device: torch.device
    dtype: torch.dtype


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def owner(index: int, world_size: int) -> int:
    """The rank that computes job ``index`` (round-robin: ranks get counts differing by at most one)."""
    return index % world_size


def run_split(jobs: list[SplitJob]) -> list[torch.Tensor | None]:
    """Runs job i on rank ``owner(i)`` only and returns every job's result on every rank (a collective: every rank
    calls it with the same jobs in the same order). Results are contiguous tensors of ``job.dtype``; None stays None.

    Every rank first computes its whole share (the ranks' SVDs run at the same time), then the results travel, one
    broadcast per job in job order. Each result travels as one flat buffer: a leading flag (1: a basis follows, 0:
    None) and the d x r values.
    """
    rank, size = world()
    buffers = [torch.zeros(1 + job.shape[0] * job.shape[1], dtype=job.dtype, device=job.device) for job in jobs]
    for index, (job, buffer) in enumerate(zip(jobs, buffers)):
        if owner(index, size) == rank:
            basis = job.select()
            if basis is not None:
                buffer[0] = 1
                buffer[1:] = basis.reshape(-1).to(dtype=job.dtype, device=job.device)
    results: list[torch.Tensor | None] = []
    for index, (job, buffer) in enumerate(zip(jobs, buffers)):
        if size > 1:
            dist.broadcast(buffer, src=owner(index, size))
        results.append(buffer[1:].view(job.shape).clone() if buffer[0] == 1 else None)  # own, aligned storage
    return results
