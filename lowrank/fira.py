"""Fira's full-rank residual (Chen et al., 2024), as this project defines it.

With R = project(G), the base update psi(R) (for Adam: m_hat / (sqrt(v_hat) + eps), so that the base moves the
projected coordinates by -lr * psi(R)), the residual is the part of G outside the subspace,

    S = phi * (G - back_project(R)),      phi = ||psi(R)|| / ||R||  along the kept dimension

(one scale per column of G for a left projection, per row for a right one), then its norm growth is limited:
if ||S_t|| > gamma ||S_{t-1}||, S_t <- S_t * gamma ||S_{t-1}|| / ||S_t||. The stored norm is that of the limited
S_t. The weight update adds -lr * S to -lr * alpha * back_project(psi(R)).

Departure from the reference code, on purpose: the reference subtracts alpha * back_project(R) (alpha-scaled), so
for alpha < 1 part of the in-subspace gradient leaks into its "residual". Here the residual is the exact
orthogonal complement G - B B^T G (resp. G - G B B^T), as in the paper's equations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowrank.projector import back_project


def fira_residual(
    grad: torch.Tensor,
    low_grad: torch.Tensor,
    low_update: torch.Tensor,
    basis: torch.Tensor,
    side: str,
    prev_norm: torch.Tensor,
    gamma: float,
    norm_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The limited residual S (m, n) and its norm (0-dim).

    Args:
        grad: G (m, n).
        low_grad: R, projected shape.
        low_update: psi(R), projected shape (the base's update direction, lr removed).
        basis: (d, r) column-orthonormal basis.
        side: ``left`` or ``right``.
        prev_norm: ||S_{t-1}|| (0-dim); 0 means "no previous residual": no limit on this step.
        gamma: growth limit, > 1 (Fira: 1.01).
        norm_fn: ||S|| from the residual given; default ``Tensor.norm``. The FSDP2 path passes the local shard of
            S and a function summing the squared norm over the shards (:func:`lowrank.dtensor.global_norm`).
    """
    dim = 1 if side == "right" else 0  # reduce over the projected dimension, keep the other one
    ratio = low_update.norm(dim=dim) / low_grad.norm(dim=dim)  # (m,) for right, (n,) for left
    ratio = torch.nan_to_num(ratio, nan=0.0, posinf=0.0)  # a zero row/column of R carries no scale
    residual = grad - back_project(low_grad, basis, side)  # (m, n)
    residual.mul_(ratio.unsqueeze(1) if side == "right" else ratio.unsqueeze(0))
    norm = (residual.norm() if norm_fn is None else norm_fn(residual)).to(prev_norm.dtype)
    limit = gamma * prev_norm
    over = (prev_norm > 0) & (norm > limit)
    scale = torch.where(over, limit / norm, torch.ones_like(norm))
    residual.mul_(scale.to(residual.dtype))
    return residual, torch.where(over, limit, norm)
