"""Swappable base optimizers: Adafactor against torch.optim.Adafactor, Adam, and a custom factory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank import LowRankOptimizer, RefreshSchedule


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_adafactor_identity_basis_matches_torch_adafactor(fixed_selector, scale):
    """Adafactor's step is relative to the weight's RMS: the stand-in must see the full weight's scale."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(7, 5, dtype=torch.float64) * scale)
    twin = nn.Parameter(weight.detach().clone())
    opt = LowRankOptimizer(
        [{"params": [weight], "rank": 5}], lr=0.01, weight_decay=0.1, base="adafactor", alpha=1.0, selector="test_fixed"
    )
    ref = torch.optim.Adafactor([twin], lr=0.01, weight_decay=0.1)
    for step in range(5):
        grad = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        weight.grad, twin.grad = grad, grad.clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(weight, twin, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("base", ["adam", "adafactor", torch.optim.AdamW])
def test_every_base_trains_a_least_squares_problem(base):
    torch.manual_seed(0)
    target = torch.randn(16, 3) @ torch.randn(3, 12)
    weight = nn.Parameter(0.1 * torch.randn(16, 12))  # Adafactor's step is relative: never from an all-zero weight
    bias = nn.Parameter(torch.zeros(12))
    x = torch.randn(64, 16)
    opt = LowRankOptimizer(
        [{"params": [weight], "rank": 4}, {"params": [bias]}],
        lr=1.0 if base == "adafactor" else 0.05,  # Adafactor's lr caps its relative step min(lr, 1/sqrt(t))
        alpha=1.0,
        base=base,
        schedule=RefreshSchedule(update_gap=10),
    )

    def loss() -> torch.Tensor:
        return (x @ weight + bias - x @ target).square().mean()

    start = loss().item()
    for _ in range(60):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.5 * start


def test_custom_factory_cannot_rotate_but_can_keep():
    p = nn.Parameter(torch.zeros(6, 5))
    LowRankOptimizer([{"params": [p], "rank": 2}], base=torch.optim.AdamW, moment_policy="keep")
    with pytest.raises(ValueError, match="moment_policy"):
        LowRankOptimizer([{"params": [p], "rank": 2}], base=torch.optim.AdamW, moment_policy="rotate")
