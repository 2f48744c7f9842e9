"""Oracle helpers shared by the lowrank tests (float64, seeded, independent of lowrank/)."""

from __future__ import annotations

import torch


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_orthonormal(d: int, r: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Column-orthonormal (d, r): float64 QR of a seeded Gaussian with R's diagonal signs folded in (Haar)."""
    q, upper = torch.linalg.qr(torch.randn(d, r, generator=gen(seed), dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(upper))).to(dtype)
