"""Block-stochastic orthogonal matrices (POET-BS) applied to activations, and their dense form for merges and tests.

For d coordinates, a permutation psi of 0..d-1 and nb = floor(d / b) orthogonal b x b blocks G_1 .. G_nb:

    M = Psi^T diag(G_1, ..., G_nb, I_(d - nb b)) Psi,      (Psi x)_i = x[psi[i]]

so M x permutes x, rotates consecutive groups of b permuted coordinates by their block, leaves the last d mod b
permuted coordinates as they are (until the next permutation), and scatters back. :func:`rotate` computes M x for
every row x of an activation tensor without forming M: a gather, a batched b x b product, a gather; about
2 N d b multiply-adds for N rows. :func:`dense` forms M (d x d), for merges and test oracles.

Permutations follow the project's randomness rule (:func:`draw_permutation`: run seed, step, name), so every
data-parallel rank draws the same ones and a resumed run repeats them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowrank.randomness import draw_generator


def draw_permutation(seed: int, step: int, name: str, size: int) -> Tensor:
    """A random permutation of 0..size-1 (int64, CPU) from the generator of (seed, step, name)."""
    return torch.randperm(size, generator=draw_generator(seed, step, name))


def inverse_permutation(perm: Tensor) -> Tensor:
    """inv with inv[perm[i]] = i."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


def rotate(x: Tensor, perm: Tensor, inverse: Tensor, blocks: Tensor) -> Tensor:
    """M x for every row x of ``x`` (M of the module docstring); differentiable in ``x`` and ``blocks``.

    Args:
        x: (..., d).
        perm: (d,) int64, psi.
        inverse: (d,) int64, psi^-1 (:func:`inverse_permutation`).
        blocks: (nb, b, b), nb * b <= d.

    Returns:
        (..., d).
    """
    nb, b = blocks.shape[0], blocks.shape[-1]
    if nb == 0:
        return x
    u = x.index_select(-1, perm)  # (..., d) = Psi x; index_select keeps only the indices for backward
    rows = u.shape[:-1]
    # (nb, T, b), T the rows: a contiguous copy, which is what the product keeps for backward (nb b per row, whatever
    # the strides: the memory estimator counts it so)
    head = u[..., : nb * b].reshape(-1, nb, b).transpose(0, 1).contiguous()
    turned = torch.matmul(head, blocks.to(u.dtype).transpose(-1, -2))  # row t of block k: (G_k u_k,t)^T
    turned = turned.transpose(0, 1).reshape(*rows, nb * b)
    v = torch.cat([turned, u[..., nb * b :]], dim=-1)  # diag(G, I) Psi x
    return v.index_select(-1, inverse)  # Psi^T (...)


def dense(perm: Tensor, blocks: Tensor) -> Tensor:
    """M (d x d) of the module docstring, in ``blocks``' dtype."""
    d = perm.numel()
    nb, b = blocks.shape[0], blocks.shape[-1]
    diag = torch.eye(d, dtype=blocks.dtype, device=blocks.device)
    if nb:
        diag[: nb * b, : nb * b] = torch.block_diag(*blocks.unbind(0))
    psi = torch.eye(d, dtype=blocks.dtype, device=blocks.device)[perm.to(blocks.device)]  # psi[i] = e_perm[i]
    return psi.T @ diag @ psi
