"""Orthogonal blocks from skew-symmetric generators: the Cayley map by a Neumann series, as POET trains them.

A b x b block G is parametrised by the b(b - 1)/2 entries above the diagonal of a skew-symmetric Q (Q^T = -Q):

    C(Q) = (I + Q)(I - Q)^-1                        the Cayley map: orthogonal for every skew Q
    R_k  = (I + Q)(I + Q + Q^2 + ... + Q^k)         k Neumann terms of (I - Q)^-1, valid for ||Q||_2 < 1

Since (I - Q)(I + Q + ... + Q^k) = I - Q^(k+1), R_k = C(Q)(I - Q^(k+1)) exactly, so

    R_k^T R_k - I = (I - Q^(k+1))^T (I - Q^(k+1)) - I

which is -Q^(2k+2) for even k (about ||Q||^(2k+2): 1e-10 at ||Q|| = 0.1, k = 4) and -2 Q^(k+1) + Q^(2k+2) for odd k
(about 2 ||Q||^(k+1)). The default k = 4. Q starts at 0, so R = I at every (re)start. The series needs ||Q||_2 < 1:
:func:`spectral_norm_max` is what a training loop watches.

Shapes: ``vec`` (nb, b(b-1)/2) -> blocks (nb, b, b); every function is batched over the nb blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor


def generator_size(block: int) -> int:
    """b(b - 1)/2: the free parameters of one b x b skew-symmetric block."""
    return block * (block - 1) // 2


def block_of(size: int) -> int:
    """b from b(b - 1)/2 (the inverse of :func:`generator_size`)."""
    block = int(round((1 + (1 + 8 * size) ** 0.5) / 2))
    if generator_size(block) != size:
        raise ValueError(f"{size} is not b(b-1)/2 for an integer b")
    return block


def skew_symmetric(vec: Tensor, block: int) -> Tensor:
    """Q with Q[i, j] = vec[idx(i, j)] above the diagonal and Q[j, i] = -Q[i, j]; differentiable in ``vec``.

    Args:
        vec: (nb, b(b-1)/2), the upper-triangle entries in row-major order.
        block: b.

    Returns:
        (nb, b, b).
    """
    rows, cols = torch.triu_indices(block, block, offset=1, device=vec.device)
    upper = vec.new_zeros(vec.shape[0], block, block)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-1, -2)


def cayley_neumann(q: Tensor, terms: int) -> Tensor:
    """R_k = (I + Q)(I + Q + ... + Q^k) for a batch of skew-symmetric Q (Horner's rule: k matmuls).

    Args:
        q: (nb, b, b) skew-symmetric.
        terms: k >= 1.

    Returns:
        (nb, b, b), orthogonal up to the error of the module docstring.
    """
    if terms < 1:
        raise ValueError(f"neumann_terms: invalid value {terms!r}; accepted: an integer >= 1")
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    series = eye + q  # I + Q
    for _ in range(terms - 1):  # I + Q(I + Q(...)) : I + Q + ... + Q^k
        series = eye + q @ series
    return (eye + q) @ series


def orthogonality_error(blocks: Tensor) -> Tensor:
    """max over blocks of ||G^T G - I||_2 (spectral norm), a 0-d tensor; 0 for no blocks."""
    if blocks.shape[0] == 0:
        return blocks.new_zeros(())
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    gram = blocks.transpose(-1, -2) @ blocks - eye
    return torch.linalg.matrix_norm(gram, ord=2).max()


def spectral_norm_max(q: Tensor) -> Tensor:
    """max over blocks of ||Q||_2 (0-d); the Neumann series is valid below 1."""
    if q.shape[0] == 0:
        return q.new_zeros(())
    return torch.linalg.matrix_norm(q, ord=2).max()
