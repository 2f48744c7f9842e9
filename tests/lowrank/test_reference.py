"""A plain functional float64 reference of the low-rank Adam update, written independently of lowrank/.

The reference is given the bases the optimizer used (selectors have their own oracle tests) and recomputes
everything else: projection, Adam with bias correction, decoupled weight decay, the moment policy at each basis
change, and Fira's residual with its norm-growth limiter.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lowrank import SELECTORS, LowRankOptimizer, RefreshSchedule

LR, ALPHA, WD, BETAS, EPS, GAMMA = 0.02, 0.25, 0.01, (0.9, 0.95), 1e-8, 1.01


def reference_run(weight, grads, bases, side, policy, fira):
    """Float64 reference of low-rank AdamW; ``bases[t]`` (d, r) is the basis used at step t."""
    w = weight.clone()
    m = v = None
    t = 0
    prev_norm = 0.0
    prev_basis = None

    def proj(g, b):
        return g @ b if side == "right" else b.T @ g

    def back(x, b):
        return x @ b.T if side == "right" else b @ x

    for g, b in zip(grads, bases):
        if prev_basis is not None and m is not None and not torch.equal(b, prev_basis):
            c = b.T @ prev_basis  # coordinates: R_new = C R_old (left), R_old C^T (right)
            if policy == "reset":
                m = v = None
                t = 0
            elif policy == "rotate":
                c2 = c * c
                m = m @ c.T if side == "right" else c @ m
                v = v @ c2.T if side == "right" else c2 @ v
        prev_basis = b
        r = proj(g, b)
        if m is None:
            m, v = torch.zeros_like(r), torch.zeros_like(r)
        t += 1
        m = BETAS[0] * m + (1 - BETAS[0]) * r
        v = BETAS[1] * v + (1 - BETAS[1]) * r * r
        psi = (m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)
        w = w * (1 - LR * WD) - LR * ALPHA * back(psi, b)
        if fira:
            keep_dim = 1 if side == "right" else 0  # norms over the projected dimension
            phi = psi.norm(dim=keep_dim) / r.norm(dim=keep_dim)
            s = (g - back(r, b)) * (phi[:, None] if side == "right" else phi[None, :])
            norm = s.norm().item()
            if prev_norm > 0 and norm > GAMMA * prev_norm:
                s = s * (GAMMA * prev_norm / norm)
                norm = GAMMA * prev_norm
            prev_norm = norm
            w = w - LR * s
    return w


CASES = list(itertools.product(sorted(SELECTORS), ["left", "right"], ["keep", "rotate", "reset"], [False, True]))


@pytest.mark.parametrize("selector,side,policy,fira", CASES)
def test_optimizer_matches_float64_reference(selector, side, policy, fira):
    shape, rank, steps = (9, 7), 3, 7
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(*shape, dtype=torch.float64, generator=gen)
    grads = [torch.randn(*shape, dtype=torch.float64, generator=gen) for _ in range(steps)]
    initial = weight.clone()
    opt = LowRankOptimizer(
        [{"params": [weight], "rank": rank}],
        lr=LR,
        weight_decay=WD,
        alpha=ALPHA,
        selector=selector,
        side=side,
        schedule=RefreshSchedule(update_gap=3),
        moment_policy=policy,
        fira=fira,
        fira_gamma=GAMMA,
        base_options={"betas": BETAS, "eps": EPS},
    )
    bases = []
    for g in grads:
        weight.grad = g
        opt.step()
        bases.append(opt.state[weight]["lowrank_basis"].clone())
    # The schedule refreshed at steps 0, 3 and 6 only, and the refreshes did move the basis.
    changed = [i for i in range(1, steps) if not torch.equal(bases[i], bases[i - 1])]
    assert changed == [3, 6]
    expected = reference_run(initial, grads, bases, side, policy, fira)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-10, atol=1e-12)


def test_reference_detects_a_wrong_policy():
    """The reference distinguishes the policies on this problem (so the test above can fail)."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(9, 7, dtype=torch.float64, generator=gen)
    grads = [torch.randn(9, 7, dtype=torch.float64, generator=gen) for _ in range(4)]
    b1 = torch.linalg.qr(torch.randn(7, 3, dtype=torch.float64, generator=gen))[0]
    b2 = torch.linalg.qr(torch.randn(7, 3, dtype=torch.float64, generator=gen))[0]
    bases = [b1, b1, b2, b2]
    results = [reference_run(w, grads, bases, "right", p, False) for p in ("keep", "rotate", "reset")]
    assert not torch.allclose(results[0], results[1]) and not torch.allclose(results[0], results[2])
