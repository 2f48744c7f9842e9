"""Importance sampling of singular directions (SARA).

Given singular values sigma_1 >= ... >= sigma_d >= 0, SARA draws r distinct indices by successive sampling without
replacement with weights w_i = sigma_i / sum_j sigma_j (proportional to the singular values, not their squares):
the first index with probability w_i, the next among the remaining ones with the renormalised weights, and so on.
The drawn indices are returned sorted ascending (that is, by decreasing singular value).
"""

from __future__ import annotations

import torch


def importance_indices(
    sigma: torch.Tensor, rank: int, generator: torch.Generator, *, rtol: float | None = None
) -> torch.Tensor:
    """Draws ``rank`` indices without replacement with probability proportional to ``sigma``.

    Singular values below ``rtol * max(sigma)`` count as zero: they are numerically noise, and
    ``torch.multinomial`` without replacement raises when fewer than ``rank`` weights are non-zero. When fewer than
    ``rank`` values are above the threshold, all of those are taken and the remaining slots are filled with the
    largest undrawn directions (deterministically, no randomness needed).

    Args:
        sigma: singular values, shape (d,), non-negative. Any order.
        rank: number of indices to draw, 1 <= rank <= d.
        generator: CPU generator (the project's randomness rule); the global RNG is never used.
        rtol: relative threshold; default ``d * eps(dtype)``. The selectors pass ``max(m, n) * eps(float32)``.

    Returns:
        Sorted int64 indices, shape (rank,), on ``sigma``'s device.
    """
    if sigma.dim() != 1:
        raise ValueError(f"sigma must be 1-D, got shape {tuple(sigma.shape)}")
    d = sigma.numel()
    if not 1 <= rank <= d:
        raise ValueError(f"rank must be in [1, {d}] (the number of singular values), got {rank}")
    weights = sigma.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("sigma must be finite and non-negative")
    if rtol is None:
        rtol = d * torch.finfo(sigma.dtype if sigma.is_floating_point() else torch.float32).eps
    threshold = float(weights.max()) * rtol
    weights = torch.where(weights > threshold, weights, torch.zeros_like(weights))
    n_positive = int((weights > 0).sum())
    if n_positive >= rank:
        drawn = torch.multinomial(weights, rank, replacement=False, generator=generator)
    else:
        # Fallback: every non-negligible direction, then the largest of the rest (sigma descending, index ascending).
        values = sigma.detach().to(device="cpu", dtype=torch.float64)
        order = torch.argsort(-values, stable=True)  # (d,) largest first, ties by index
        positive = order[weights[order] > 0]
        rest = order[weights[order] <= 0][: rank - n_positive]
        drawn = torch.cat([positive, rest])
    return torch.sort(drawn).values.to(sigma.device)
