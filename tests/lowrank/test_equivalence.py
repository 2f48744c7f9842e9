"""The low-rank optimizer against torch.optim.AdamW, the independent oracle.

Adam is coordinate-wise, so exact full-rank equivalence holds only for an identity basis; with a dense fixed basis Q
the update must be alpha * back_project(AdamW step of a stand-in parameter whose gradient is the projection).
"""

from __future__ import annotations

import pytest
import torch

from lowrank import LowRankOptimizer, RefreshSchedule

from .helpers import random_orthonormal

BETAS, EPS, LR = (0.9, 0.99), 1e-8, 0.01


def _grads(shape: tuple[int, ...], steps: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(steps)]


@pytest.mark.parametrize("shape", [(6, 4), (4, 6)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_identity_basis_full_rank_matches_torch_adamw(fixed_selector, shape, weight_decay):
    torch.manual_seed(0)
    weight = torch.randn(*shape, dtype=torch.float64)
    bias = torch.randn(shape[0], dtype=torch.float64)
    w_ref, b_ref = weight.clone(), bias.clone()
    opt = LowRankOptimizer(
        [{"params": [weight], "rank": min(shape)}, {"params": [bias]}],
        lr=LR,
        weight_decay=weight_decay,
        alpha=1.0,
        selector="test_fixed",
        schedule=RefreshSchedule(update_gap=2),
        base_options={"betas": BETAS, "eps": EPS},
    )
    ref = torch.optim.AdamW([w_ref, b_ref], lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay)
    for gw, gb in zip(_grads(shape, 6, 1), _grads((shape[0],), 6, 2)):
        weight.grad, bias.grad, w_ref.grad, b_ref.grad = gw, gb, gw.clone(), gb.clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(weight, w_ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(bias, b_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape,side", [((8, 5), "right"), ((5, 8), "left"), ((8, 5), "left"), ((5, 8), "right")])
@pytest.mark.parametrize("alpha", [0.25, 1.0])
def test_dense_fixed_basis_equals_back_projected_adamw_stand_in(fixed_selector, shape, side, alpha):
    rank, weight_decay = 3, 0.05
    d = shape[1] if side == "right" else shape[0]
    q = random_orthonormal(d, rank, seed=7)  # (d, r)
    fixed_selector.bases[d] = q
    weight = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = weight.clone()
    opt = LowRankOptimizer(
        [{"params": [weight], "rank": rank, "side": side}],
        lr=LR,
        weight_decay=weight_decay,
        alpha=alpha,
        selector="test_fixed",
        base_options={"betas": BETAS, "eps": EPS},
    )
    stand_in_shape = (shape[0], rank) if side == "right" else (rank, shape[1])
    stand_in = torch.zeros(stand_in_shape, dtype=torch.float64, requires_grad=True)
    oracle = torch.optim.AdamW([stand_in], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    for grad in _grads(shape, 5, 11):
        projected = grad @ q if side == "right" else q.T @ grad  # G Q^T in GaLore's row-basis notation
        before = stand_in.detach().clone()
        stand_in.grad = projected
        oracle.step()
        delta = stand_in.detach() - before
        back = delta @ q.T if side == "right" else q @ delta
        expected = expected * (1 - LR * weight_decay) + alpha * back
        weight.grad = grad
        opt.step()
        torch.testing.assert_close(weight, expected, rtol=1e-10, atol=1e-13)
