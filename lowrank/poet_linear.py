"""``POETLinear``: a linear layer trained as W = R W0 P (POET, arXiv 2506.08001), applied to activations.

    y = x W^T = ((x P^T) W0^T) R^T          x (N, n), W0 (m, n) fixed, y (N, m)

R (m x m) and P (n x n) are block-stochastic orthogonal matrices (:mod:`lowrank.poet_rotation`) whose b x b blocks
come from skew-symmetric generators by the Cayley-Neumann map (:mod:`lowrank.poet_cayley`):

    R = Psi_out^T diag(C_k(Q_out,1), ..., C_k(Q_out,floor(m/b)), I) Psi_out,   P likewise over the n inputs

The trainable parameters are the generators' upper triangles, ``q_out`` (floor(m/b), b(b-1)/2) and ``q_in``
(floor(n/b), b(b-1)/2): (floor(m/b) + floor(n/b)) b(b-1)/2 in all. Because R and P are orthogonal, W's singular
values stay W0's (up to the series' orthogonality error): training rotates the singular vectors only.

W0 is an ``nn.Parameter`` with ``requires_grad=False`` (DDP broadcasts buffers on every forward; FSDP2 does not shard
buffers); the permutations are int64 buffers (saved in the state dict, so a resumed run continues with the same ones).
R W0 P is never formed in training: P^T and R^T act on the activations (two gathers and a batched b x b product
each), about 2 N b (m + n) extra multiply-adds per forward and per backward input gradient.

:meth:`merge_` folds the rotations into W0 (W0 <- R W0 P with the R and P the forward uses), draws new permutations
and zeroes the generators in place (the same ``Parameter`` objects: optimizers and DDP keep their references); the
caller resets their optimizer state (``lowrank.poet.merge_poet`` does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowrank.poet_cayley import cayley_neumann, generator_size, orthogonality_error, skew_symmetric, spectral_norm_max
from lowrank.poet_rotation import dense, draw_permutation, inverse_permutation, rotate


class POETLinear(nn.Module):
    """y = x (R W0 P)^T (+ bias): module docstring.

    Args:
        weight0: (out_features, in_features), W0; copied into a frozen parameter.
        block_size: b, the side of the orthogonal blocks (>= 2).
        neumann_terms: k of the Cayley-Neumann series (>= 1; 4 keeps the orthogonality error near ||Q||^10).
        seed: run seed of the permutation draws (``lowrank.randomness``).
        name: the weight's parameter name in the model (``layers.0.self_attn.q_proj.weight``), a draw key.
        bias: (out_features,) or None; trained as an ordinary parameter when given.
    """

    def __init__(
        self,
        weight0: Tensor,
        block_size: int,
        neumann_terms: int,
        seed: int,
        name: str,
        bias: Tensor | None = None,
    ) -> None:
        super().__init__()
        if block_size < 2:
            raise ValueError(f"optimizer.poet.block_size: invalid value {block_size!r}; accepted: an integer >= 2")
        out_features, in_features = weight0.shape
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.neumann_terms = block_size, neumann_terms
        self.seed, self.draw_name = seed, name
        size = generator_size(block_size)
        self.weight0 = nn.Parameter(weight0.detach().clone(), requires_grad=False)  # (m, n)
        self.q_out = nn.Parameter(weight0.new_zeros(out_features // block_size, size))  # (floor(m/b), b(b-1)/2)
        self.q_in = nn.Parameter(weight0.new_zeros(in_features // block_size, size))  # (floor(n/b), b(b-1)/2)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        for side, features in (("out", out_features), ("in", in_features)):
            self.register_buffer(f"perm_{side}", torch.empty(features, dtype=torch.long, device=weight0.device))
            self.register_buffer(f"inv_{side}", torch.empty(features, dtype=torch.long, device=weight0.device))
        self.draw_permutations(0)

    # ------------------------------------------------------------------------------------------------- rotations
    def draw_permutations(self, step: int) -> None:
        """New Psi_out, Psi_in from (seed, step, name + ".out" / ".in"), in place."""
        for side, features in (("out", self.out_features), ("in", self.in_features)):
            perm = draw_permutation(self.seed, step, f"{self.draw_name}.{side}", features).to(self.weight0.device)
            getattr(self, f"perm_{side}").copy_(perm)
            getattr(self, f"inv_{side}").copy_(inverse_permutation(perm))

    def blocks(self) -> tuple[Tensor, Tensor]:
        """(G_out (floor(m/b), b, b), G_in (floor(n/b), b, b)) from the generators, differentiable.

        Computed in float32 at least, outside autocast, whatever the generators' dtype: in bf16 the series' own
        rounding (about 4e-3) would dwarf its truncation error and accumulate in W0 at every merge. The block product
        casts them to the activations' dtype."""
        b, k = self.block_size, self.neumann_terms
        dtype = torch.promote_types(self.q_out.dtype, torch.float32)
        with torch.autocast(self.q_out.device.type, enabled=False):
            return (
                cayley_neumann(skew_symmetric(self.q_out.to(dtype), b), k),
                cayley_neumann(skew_symmetric(self.q_in.to(dtype), b), k),
            )

    def forward(self, x: Tensor) -> Tensor:
        g_out, g_in = self.blocks()
        z = rotate(x, self.perm_in, self.inv_in, g_in)  # (..., n) = x P^T
        h = F.linear(z, self.weight0)  # (..., m) = z W0^T
        y = rotate(h, self.perm_out, self.inv_out, g_out)  # (..., m) = h R^T
        return y if self.bias is None else y + self.bias

    # --------------------------------------------------------------------------------------------------- merges
    @torch.no_grad()
    def effective_weight(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """R W0 P (m x n) in ``dtype``, from the blocks the forward uses (computed in W0's dtype), without forming R
        or P: the rows of W0 P are P^T w_i (the rotation with the transposed blocks), and R (W0 P) rotates its
        columns. A few m x n temporaries in ``dtype``, nothing of size m^2 or n^2."""
        g_out, g_in = self.blocks()
        w = self.weight0.to(dtype)  # (m, n)
        wp = rotate(w, self.perm_in, self.inv_in, g_in.to(dtype).transpose(-1, -2))  # (m, n) = W0 P
        return rotate(wp.T, self.perm_out, self.inv_out, g_out.to(dtype)).T  # (m, n) = R W0 P

    @torch.no_grad()
    def dense_rotations(self, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """(R (m x m), P (n x n)) formed densely, for inspection and tests."""
        g_out, g_in = self.blocks()
        return dense(self.perm_out, g_out.to(dtype)), dense(self.perm_in, g_in.to(dtype))

    @torch.no_grad()
    def merge_(self, step: int) -> None:
        """W0 <- R W0 P (in float64, stored in W0's dtype), new permutations for ``step``, Q <- 0 (in place)."""
        self.weight0.copy_(self.effective_weight(torch.float64).to(self.weight0.dtype))
        self.draw_permutations(step)
        self.q_out.zero_()
        self.q_in.zero_()

    # -------------------------------------------------------------------------------------------------- metrics
    @torch.no_grad()
    def orthogonality_error(self) -> Tensor:
        """max over this layer's blocks of ||G^T G - I||_2 (0-d, float64)."""
        g_out, g_in = self.blocks()
        return torch.stack([orthogonality_error(g.double()) for g in (g_out, g_in)]).max()

    @torch.no_grad()
    def q_norm_max(self) -> Tensor:
        """max over this layer's generators of ||Q||_2 (0-d, float64)."""
        b = self.block_size
        return torch.stack([spectral_norm_max(skew_symmetric(q.double(), b)) for q in (self.q_out, self.q_in)]).max()

    def trainable_count(self) -> int:
        """(floor(m/b) + floor(n/b)) b(b-1)/2 (the bias not included)."""
        return self.q_out.numel() + self.q_in.numel()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
            f"neumann_terms={self.neumann_terms}, bias={self.bias is not None}"
        )
