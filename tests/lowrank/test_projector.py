"""Projection side rule, projection and back-projection against explicit float64 sums, and the overlap metric."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank.projector import (
    add_back_projected_,
    back_project,
    chance_overlap,
    placeholder_basis,
    project,
    resolve_side,
    subspace_overlap,
)

from .helpers import gen
from .helpers import random_orthonormal as haar


def explicit_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(p, q) @ (q, s) as an explicit float64 sum of products (no BLAS call)."""
    return (a.to(torch.float64)[:, :, None] * b.to(torch.float64)[None, :, :]).sum(dim=1)


def projection_trace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Oracle: trace(P_A P_B) / r with orthogonal projectors P = B B^T, (d, r) column bases, float64."""
    pa = explicit_matmul(a, a.T)
    pb = explicit_matmul(b, b.T)
    return float((pa * pb).sum()) / a.shape[1]


# ------------------------------------------------------------------------------------------------- side rule
@pytest.mark.parametrize(
    "shape,expected",
    [
        ((8, 4), "right"),
        ((4, 8), "left"),
        ((5, 5), "right"),
        ((1, 7), "left"),
        ((7, 1), "right"),
        (torch.Size([64, 32]), "right"),
        (torch.Size([32, 64]), "left"),
    ],
)
def test_auto_side_projects_the_smaller_dimension(shape, expected):
    m, n = shape
    assert expected == ("right" if m >= n else "left")  # the rule itself, restated
    assert resolve_side(shape) == expected
    assert resolve_side(shape, "auto") == expected


@pytest.mark.parametrize("shape", [(8, 4), (4, 8), (5, 5)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_forced_side_wins(shape, side):
    assert resolve_side(shape, side) == side


@pytest.mark.parametrize("side", ["both", "Left", "", "std"])
def test_unknown_side_lists_accepted_values(side):
    with pytest.raises(ValueError) as info:
        resolve_side((4, 8), side)
    for accepted in ("auto", "left", "right"):
        assert accepted in str(info.value)


# ------------------------------------------------------------------------------------------------- projection
CASES = [((12, 7), "right", 3), ((7, 12), "left", 3), ((9, 9), "right", 4), ((9, 9), "left", 4), ((10, 6), "left", 2)]


def basis_for(shape: tuple[int, int], side: str, rank: int, seed: int) -> torch.Tensor:
    d = shape[1] if side == "right" else shape[0]
    return haar(d, rank, seed)


@pytest.mark.parametrize("shape,side,rank", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_project_and_back_project_match_explicit_products(shape, side, rank, dtype):
    m, n = shape
    grad64 = torch.randn(m, n, generator=gen(1), dtype=torch.float64)
    basis64 = basis_for(shape, side, rank, seed=2)
    grad, basis = grad64.to(dtype), basis64.to(dtype)
    atol = 1e-12 if dtype == torch.float64 else 1e-5

    low = project(grad, basis, side)
    expected_low = explicit_matmul(grad64, basis64) if side == "right" else explicit_matmul(basis64.T, grad64)
    assert low.shape == ((m, rank) if side == "right" else (rank, n))
    assert torch.allclose(low.to(torch.float64), expected_low, atol=atol, rtol=0)

    update64 = torch.randn(*expected_low.shape, generator=gen(3), dtype=torch.float64)
    full = back_project(update64.to(dtype), basis, side)
    expected_full = explicit_matmul(update64, basis64.T) if side == "right" else explicit_matmul(basis64, update64)
    assert full.shape == (m, n)
    assert torch.allclose(full.to(torch.float64), expected_full, atol=atol, rtol=0)


@pytest.mark.parametrize("shape,side,rank", CASES)
def test_round_trip_is_identity_inside_the_subspace(shape, side, rank):
    m, n = shape
    basis = basis_for(shape, side, rank, seed=4)
    if side == "right":
        coefficients = torch.randn(m, rank, generator=gen(5), dtype=torch.float64)
        grad = explicit_matmul(coefficients, basis.T)  # rows in span(B)
    else:
        coefficients = torch.randn(rank, n, generator=gen(5), dtype=torch.float64)
        grad = explicit_matmul(basis, coefficients)  # columns in span(B)
    assert torch.allclose(back_project(project(grad, basis, side), basis, side), grad, atol=1e-12, rtol=0)
    assert torch.allclose(project(grad, basis, side), coefficients, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape,side,rank", CASES)
def test_round_trip_is_the_orthogonal_projection(shape, side, rank):
    m, n = shape
    grad = torch.randn(m, n, generator=gen(6), dtype=torch.float64)
    basis = basis_for(shape, side, rank, seed=7)
    projector = explicit_matmul(basis, basis.T)  # (d, d)
    expected = explicit_matmul(grad, projector) if side == "right" else explicit_matmul(projector, grad)
    result = back_project(project(grad, basis, side), basis, side)
    assert torch.allclose(result, expected, atol=1e-12, rtol=0)
    residual = grad - result  # orthogonal to the subspace
    assert float(project(residual, basis, side).abs().max()) < 1e-12


@pytest.mark.parametrize("shape,side,rank", CASES)
@pytest.mark.parametrize("alpha", [1.0, 0.25, -0.01])
def test_add_back_projected_in_place(shape, side, rank, alpha):
    m, n = shape
    weight = torch.randn(m, n, generator=gen(8), dtype=torch.float64)
    original = weight.clone()
    basis = basis_for(shape, side, rank, seed=9)
    low = torch.randn(*((m, rank) if side == "right" else (rank, n)), generator=gen(10), dtype=torch.float64)
    pointer = weight.data_ptr()
    out = add_back_projected_(weight, low, basis, side, alpha)
    assert out is None or out is weight
    assert weight.data_ptr() == pointer
    image = explicit_matmul(low, basis.T) if side == "right" else explicit_matmul(basis, low)
    assert torch.allclose(weight, original + alpha * image, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape,side,rank", [((12, 7), "right", 3), ((7, 12), "left", 5), ((6, 6), "left", 6)])
def test_placeholder_basis_is_the_first_coordinate_axes(shape, side, rank):
    d = shape[1] if side == "right" else shape[0]
    basis = placeholder_basis(shape, side, rank, dtype=torch.float64)
    assert basis.shape == (d, rank) and basis.dtype == torch.float64
    for j in range(rank):
        column = torch.zeros(d, dtype=torch.float64)
        column[j] = 1.0
        assert torch.equal(basis[:, j], column)
    grad = torch.randn(*shape, generator=gen(11), dtype=torch.float64)
    low = project(grad, basis, side)
    expected = grad[:, :rank] if side == "right" else grad[:rank, :]
    assert torch.equal(low, expected)


# ------------------------------------------------------------------------------------------------- overlap
@pytest.mark.parametrize("d,r", [(10, 3), (16, 8), (5, 5), (7, 1)])
def test_overlap_with_itself_is_one(d, r):
    basis = haar(d, r, seed=12)
    assert subspace_overlap(basis, basis) == pytest.approx(1.0, abs=1e-12)
    assert subspace_overlap(basis.float(), basis.float()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("d,r", [(10, 3), (16, 8), (7, 1)])
def test_overlap_of_orthogonal_subspaces_is_zero(d, r):
    both = haar(d, 2 * r, seed=13)
    assert subspace_overlap(both[:, :r], both[:, r:]) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("d,r", [(10, 3), (16, 8), (9, 2)])
def test_overlap_matches_projector_trace_and_storage_orientation(d, r):
    a, b = haar(d, r, seed=14), haar(d, r, seed=15)
    expected = projection_trace_overlap(a, b)
    assert 0.0 < expected < 1.0
    for left in (a, a.T):
        for right in (b, b.T):
            assert subspace_overlap(left, right) == pytest.approx(expected, abs=1e-12)
            assert subspace_overlap(right, left) == pytest.approx(expected, abs=1e-12)
    assert subspace_overlap(a.float(), b.T.float()) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("d,r", [(10, 3), (16, 8)])
def test_overlap_invariant_to_rotation_within_the_span(d, r):
    a, b = haar(d, r, seed=16), haar(d, r, seed=17)
    rotation_a, rotation_b = haar(r, r, seed=18), haar(r, r, seed=19)
    expected = projection_trace_overlap(a, b)
    assert subspace_overlap(a @ rotation_a, b @ rotation_b) == pytest.approx(expected, abs=1e-12)
    # A partially overlapping pair: shares exactly one direction with a, the rest orthogonal to a.
    full = haar(d, 2 * r, seed=20)
    c = torch.cat([full[:, :1], full[:, r + 1 : 2 * r]], dim=1) if r > 1 else full[:, :1]
    assert subspace_overlap(full[:, :r], c @ rotation_b) == pytest.approx(1 / r, abs=1e-12)


def test_overlap_mismatched_shapes_raise():
    with pytest.raises(ValueError):
        subspace_overlap(haar(10, 3, 0), haar(10, 4, 1))
    with pytest.raises(ValueError):
        subspace_overlap(haar(10, 3, 0), haar(11, 3, 1))


@pytest.mark.parametrize("d,r", [(12, 3), (20, 10)])
def test_random_subspaces_overlap_at_chance_level(d, r):
    assert chance_overlap(r, d) == pytest.approx(r / d)
    n = 1500
    bases, _ = torch.linalg.qr(torch.randn(2 * n, d, r, generator=gen(100), dtype=torch.float64))
    values = torch.tensor([subspace_overlap(bases[2 * i], bases[2 * i + 1]) for i in range(n)])
    standard_error = float(values.std()) / math.sqrt(n)
    assert abs(float(values.mean()) - r / d) < 4 * standard_error
