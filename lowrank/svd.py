"""Singular value decompositions used by the selectors: exact thin SVD and a seeded randomized SVD.

Both work in float32 or wider (bf16/fp16 gradients are upcast) and return the left singular vectors of the matrix
they are given, signs canonicalised: each singular vector is flipped so that its largest-magnitude entry is
positive. LAPACK/cuSOLVER signs are arbitrary and can differ between devices and library versions; a sign flip
meeting kept Adam moments negates their momentum, so canonical signs make refreshes reproducible across ranks and
implementations. This departs from GaLore's raw SVD signs (docs/design.md, departures from the reference code).
"""

from __future__ import annotations

import torch


def _svd_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def canonicalize_signs(u: torch.Tensor) -> torch.Tensor:
    """Flips each column of ``u`` (d, k) so that its largest-magnitude entry is positive."""
    pivot = u.abs().argmax(dim=0, keepdim=True)  # (1, k)
    signs = torch.sign(torch.gather(u, 0, pivot))  # (1, k)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact thin SVD of ``matrix`` (d, k): left singular vectors (d, min(d, k)) and values (min(d, k),), descending."""
    a = matrix.to(_svd_dtype(matrix.dtype))
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    return canonicalize_signs(u), s


def randomized_svd(
    matrix: torch.Tensor, k: int, generator: torch.Generator, power_iters: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` left singular vectors and values of ``matrix`` (d, n) by a seeded randomized range finder.

    Halko, Martinsson and Tropp (2011), algorithm 4.4: Y = A Omega with Gaussian Omega (n, k) drawn on the CPU from
    ``generator`` (never the global RNG, unlike ``torch.svd_lowrank``), ``power_iters`` subspace iterations with QR
    re-orthonormalisation, then the exact SVD of the small matrix Q^T A (k, n). An approximation: its accuracy is
    measured against the exact rule by the tests and the benchmark.

    Returns:
        u (d, k') and s (k',) with k' = min(k, d, n), descending.
    """
    a = matrix.to(_svd_dtype(matrix.dtype))
    d, n = a.shape
    k = min(k, d, n)
    omega = torch.randn(n, k, generator=generator, dtype=a.dtype).to(a.device)  # (n, k)
    q, _ = torch.linalg.qr(a @ omega)  # (d, k)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(a.T @ q)  # (n, k)
        q, _ = torch.linalg.qr(a @ z)  # (d, k)
    u_small, s, _ = torch.linalg.svd(q.T @ a, full_matrices=False)  # (k, k), (k,)
    return canonicalize_signs(q @ u_small), s
