"""Projection of a weight gradient G (m, n) onto an r-dimensional subspace, and back.

Side rule (GaLore's "std"): project on the smaller dimension so that the stored basis is the small factor.

* right (default when m >= n): basis B (n, r) with orthonormal columns (= Q^T for GaLore's row basis Q),
  R = G B (m, r), back-projection R_upd B^T (m, n).
* left (m < n): basis B (m, r), R = B^T G (r, n), back-projection B R_upd (m, n).

The basis is always stored as a column-orthonormal (d, r) matrix, d = n for right and d = m for left; moments live
in R's shape, r x max(m, n) under the auto rule. ``side`` may be forced (``left`` | ``right``): the FSDP2 path
forces ``right`` because row-sharded weights keep G_i B local to each shard.

The subspace overlap ||B_old^T B_new||_F^2 / r in [0, 1] (1: same subspace) is the frozen-subspace metric.
"""

from __future__ import annotations

import torch

SIDES: tuple[str, ...] = ("auto", "left", "right")


def resolve_side(shape: tuple[int, ...] | torch.Size, side: str = "auto") -> str:
    """``left`` or ``right`` for a weight of ``shape`` (m, n) under the side option (``auto`` | ``left`` |
    ``right``)."""
    if side not in SIDES:
        raise ValueError(f"side: unknown value {side!r}; accepted: {', '.join(SIDES)}")
    if side != "auto":
        return side
    m, n = shape
    return "right" if m >= n else "left"


def basis_dim(shape: tuple[int, ...] | torch.Size, side: str) -> int:
    """d: the number of rows of the stored (d, r) basis."""
    return shape[1] if side == "right" else shape[0]


def projected_shape(shape: tuple[int, ...] | torch.Size, side: str, rank: int) -> tuple[int, int]:
    """Shape of R (and of the moments): (m, r) for right, (r, n) for left."""
    return (shape[0], rank) if side == "right" else (rank, shape[1])


def orient(grad: torch.Tensor, side: str) -> torch.Tensor:
    """The matrix whose column space the basis spans: G (m, n) for left, G^T (n, m) for right (a view)."""
    return grad.T if side == "right" else grad


def project(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """R = G B (m, r) for right, B^T G (r, n) for left."""
    return grad @ basis if side == "right" else basis.T @ grad


def back_project(low: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """Full-size (m, n) image of a projected-shape tensor: R B^T for right, B R for left."""
    return low @ basis.T if side == "right" else basis @ low


def add_back_projected_(weight: torch.Tensor, low: torch.Tensor, basis: torch.Tensor, side: str, alpha: float) -> None:
    """weight += alpha * back_project(low), fused in one ``addmm_`` (no full-size temporary)."""
    if side == "right":
        weight.addmm_(low, basis.T, alpha=alpha)
    else:
        weight.addmm_(basis, low, alpha=alpha)


def placeholder_basis(shape: tuple[int, ...] | torch.Size, side: str, rank: int, **tensor_kwargs) -> torch.Tensor:
    """The first ``rank`` coordinate axes, (d, r): a basis with the right shapes before any real gradient exists."""
    return torch.eye(basis_dim(shape, side), rank, **tensor_kwargs)


def _as_columns(basis: torch.Tensor) -> torch.Tensor:
    # A basis may be stored as (d, r) columns or (r, d) rows; a subspace of dimension r < d is tall as columns.
    if basis.dim() != 2:
        raise ValueError(f"a basis must be 2-D, got shape {tuple(basis.shape)}")
    return basis.T if basis.shape[0] < basis.shape[1] else basis


def subspace_overlap(old_basis: torch.Tensor, new_basis: torch.Tensor) -> float:
    """||B_old^T B_new||_F^2 / r in [0, 1]: 1 when the subspaces coincide, 0 when orthogonal.

    Accepts orthonormal bases stored as columns (d, r) or rows (r, d), independently for each argument. Two
    independent uniformly random r-dimensional subspaces of R^d overlap r / d on average (the chance level).
    """
    a, b = _as_columns(old_basis), _as_columns(new_basis)
    if a.shape != b.shape:
        raise ValueError(f"bases span different spaces or ranks: {tuple(a.shape)} vs {tuple(b.shape)}")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    cross = a.to(dtype).T @ b.to(dtype)  # (r, r)
    value = float(cross.square().sum()) / a.shape[1]
    return min(max(value, 0.0), 1.0)


def chance_overlap(rank: int, dim: int) -> float:
    """Expected overlap r / d of two independent uniformly random r-dimensional subspaces of R^d."""
    return rank / dim
