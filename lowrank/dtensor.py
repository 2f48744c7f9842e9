"""FSDP2 support: helpers for parameters that are row-sharded DTensors (``fully_shard``: ``Shard(0)`` on dim 0).

The FSDP2 path of :class:`lowrank.optimizer.LowRankOptimizer` (docs/reference.md, FSDP2):

* every low-rank DTensor parameter projects on the ``right``: with the local shard G_i (m_i, n) of the gradient and
  the basis B (n, r), R_i = G_i B and the back-projection W_i += alpha * U_i B^T are local to each shard;
* the stand-in the base optimizer steps on is a DTensor of global shape (m, r) with the parameter's placements, so the
  base's moments are DTensors sharded like their parameter;
* the basis is a ``Replicate()`` DTensor; it is refreshed from the full gradient, gathered on refresh steps only,
  with the same selector and the same seeded draw on every rank (identical inputs, identical bases, no broadcast);
* Fira's residual is local per row; only its norm needs a sum over the shards (an all-reduce of the squared norm).

Plain tensors never reach these helpers: the plain path stays bit-identical.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard


def is_dtensor(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (shares its storage), the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def gather_full(tensor: torch.Tensor) -> torch.Tensor:
    """The full (global) tensor on every rank: a collective for DTensors, the tensor itself otherwise."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def check_row_sharded(param: DTensor, name: str) -> None:
    """Accepts DTensors sharded on dim 0 only (FSDP2's layout), on any number of mesh dimensions."""
    for placement in param.placements:
        if not (isinstance(placement, Replicate) or (isinstance(placement, Shard) and placement.dim == 0)):
            raise ValueError(
                f"parameter {name!r}: DTensor placements {tuple(param.placements)} are not supported; the low-rank "
                "optimizer needs row-sharded weights (Shard(0), FSDP2's fully_shard) or Replicate()"
            )


def sharded_zeros_like_rows(param: DTensor, columns: int) -> DTensor:
    """A zero DTensor of global shape (m, columns) placed like ``param`` (m, n): local shard (m_i, columns)."""
    rows = param.to_local().shape[0]
    data = torch.zeros((rows, columns), dtype=param.dtype, device=param.to_local().device)
    shape = (param.shape[0], columns)
    return DTensor.from_local(data, param.device_mesh, param.placements, shape=shape, stride=(columns, 1))


def like_rows(local_tensor: torch.Tensor, like: DTensor, columns: int) -> DTensor:
    """Wraps a local (m_i, columns) tensor as a DTensor of global shape (m, columns) placed like ``like`` (m, n)."""
    shape = (like.shape[0], columns)
    return DTensor.from_local(local_tensor, like.device_mesh, like.placements, shape=shape, stride=(columns, 1))


def replicate_like(tensor: torch.Tensor, like: DTensor) -> DTensor:
    """``tensor`` (identical on every rank) as a ``Replicate()`` DTensor on ``like``'s mesh, made contiguous: a
    checkpoint loads into a contiguous tensor, and the same layout before and after a resume keeps the matmuls that
    read it bitwise reproducible."""
    mesh = like.device_mesh
    return DTensor.from_local(tensor.contiguous(), mesh, [Replicate()] * mesh.ndim, run_check=False)


def global_norm(local_tensor: torch.Tensor, like: DTensor) -> torch.Tensor:
    """Frobenius norm of the DTensor whose local shard is ``local_tensor`` and whose placements are ``like``'s:
    squared norms summed over the sharded mesh dimensions (replicated dimensions hold copies, not parts)."""
    squared = local_tensor.to(torch.promote_types(local_tensor.dtype, torch.float32)).square().sum()
    mesh = like.device_mesh
    for dim, placement in enumerate(like.placements):
        if isinstance(placement, Shard):
            dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
    return squared.sqrt()
