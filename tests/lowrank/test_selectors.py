"""Subspace selectors against float64 oracles: eigh of G G^T, exact inclusion probabilities, Haar statistics."""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import ClassVar

import pytest
import torch
from torch import nn

from lowrank import LowRankOptimizer, RefreshSchedule
from lowrank.selectors import SELECTORS, SubspaceSelector, is_refreshable, make_selector, register_selector

from .helpers import gen
from .helpers import random_orthonormal as haar

NAMES = ("dominant", "importance", "random", "randomized_dominant", "randomized_importance")
SVD_BASED = ("dominant", "importance", "randomized_dominant", "randomized_importance")


def with_spectrum(d: int, k: int, sigma: list[float], seed: int) -> torch.Tensor:
    """G = U diag(sigma) V^T (d, k) in float64, U and V random orthonormal; len(sigma) <= min(d, k)."""
    p = len(sigma)
    return haar(d, p, seed) @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ haar(k, p, seed + 1).T


def gram_eigh(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle: eigenvalues (descending) and eigenvectors of G G^T in float64 (= sigma^2 and left singular vectors)."""
    g = grad.to(torch.float64)
    values, vectors = torch.linalg.eigh(g @ g.T)
    return values.flip(0), vectors.flip(1)


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """||A^T B||_F^2 / r for column-orthonormal (d, r) A and B, float64."""
    return float((a.to(torch.float64).T @ b.to(torch.float64)).square().sum()) / a.shape[1]


def assert_orthonormal(basis: torch.Tensor, atol: float = 2e-5) -> None:
    b = basis.to(torch.float64)
    eye = torch.eye(b.shape[1], dtype=torch.float64)
    assert torch.allclose(b.T @ b, eye, atol=atol, rtol=0), float((b.T @ b - eye).abs().max())


def decaying(d: int, k: int, seed: int, rate: float = 0.7) -> torch.Tensor:
    return with_spectrum(d, k, [rate**i for i in range(min(d, k))], seed)


# ------------------------------------------------------------------------------------------------- registry
def test_registry_holds_the_five_rules_under_their_names():
    assert set(NAMES) <= set(SELECTORS)
    for name in NAMES:
        assert SELECTORS[name].name == name
        assert make_selector(name).name == name


def test_unknown_name_lists_accepted_names():
    with pytest.raises(ValueError) as info:
        make_selector("dominent")
    message = str(info.value)
    assert "dominent" in message
    for name in NAMES:
        assert name in message


@pytest.mark.parametrize("name", ["randomized_dominant", "randomized_importance"])
def test_make_selector_passes_options_to_selectors_that_have_them(name):
    selector = make_selector(name, oversampling=3, power_iters=5)
    assert selector.oversampling == 3 and selector.power_iters == 5
    default = make_selector(name)
    assert (default.oversampling, default.power_iters) != (3, 5)


@pytest.mark.parametrize("name", ["dominant", "importance", "random"])
def test_make_selector_refuses_options_of_selectors_without_them(name):
    with pytest.raises(ValueError) as info:
        make_selector(name, oversampling=3)
    message = str(info.value)
    assert "oversampling" in message and repr(name) in message
    assert "accepted: none" in message  # the rule declares no options
    make_selector(name)  # without options it builds


@pytest.mark.parametrize("name", ["randomized_dominant", "randomized_importance"])
def test_make_selector_refuses_an_unknown_option_naming_the_accepted_ones(name):
    with pytest.raises(ValueError) as info:
        make_selector(name, oversampling=3, power_iter=5)  # typo of power_iters
    message = str(info.value)
    assert "power_iter:" in message or "power_iter " in message, message
    assert "accepted: oversampling | power_iters" in message


@pytest.mark.parametrize("name", ["randomized_dominant", "randomized_importance"])
@pytest.mark.parametrize("option,value", [("oversampling", -1), ("power_iters", 1.5), ("oversampling", True)])
def test_make_selector_refuses_invalid_option_values(name, option, value):
    with pytest.raises(ValueError) as info:
        make_selector(name, **{option: value})
    assert f"{option}: invalid value {value!r}" in str(info.value) and "integer >= 0" in str(info.value)


# ------------------------------------------------------------------------------------------ register_selector
@dataclasses.dataclass(frozen=True)
class ShiftedAxes(SubspaceSelector):
    """Test rule with one option: the coordinate axes ``shift .. shift + r - 1``; remembers the shifts it ran with."""

    name: ClassVar[str] = "test_shifted_axes"
    calls: ClassVar[list[int]] = []
    shift: int = 0

    def problems(self, prefix: str = "") -> list[str]:
        ok = isinstance(self.shift, int) and self.shift >= 0
        return [] if ok else [f"{prefix}.shift: invalid value {self.shift!r}; accepted: an integer >= 0"]

    def _basis(self, grad: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
        ShiftedAxes.calls.append(self.shift)
        return torch.eye(grad.shape[0], dtype=grad.dtype)[:, self.shift : self.shift + rank]


@pytest.fixture
def shifted_axes():
    ShiftedAxes.calls.clear()
    try:
        yield register_selector(ShiftedAxes)
    finally:
        SELECTORS.pop(ShiftedAxes.name, None)
        ShiftedAxes.calls.clear()


def test_register_selector_adds_a_rule_with_options(shifted_axes):
    assert shifted_axes is ShiftedAxes  # usable as a decorator
    assert SELECTORS["test_shifted_axes"] is ShiftedAxes
    selector = make_selector("test_shifted_axes", shift=2)
    assert isinstance(selector, ShiftedAxes) and selector.shift == 2
    assert make_selector("test_shifted_axes").shift == 0
    basis = selector.select(torch.ones(7, 4), 3, gen(0))
    assert torch.equal(basis, torch.eye(7)[:, 2:5])
    with pytest.raises(ValueError) as info:
        make_selector("test_shifted_axes", offset=2)
    assert "offset" in str(info.value) and "accepted: shift" in str(info.value)
    with pytest.raises(ValueError, match="shift: invalid value -1"):
        make_selector("test_shifted_axes", shift=-1)


def test_selector_options_reach_a_registered_rule_through_the_optimizer(shifted_axes):
    weight = nn.Parameter(torch.zeros(9, 6))  # m >= n: right side, oriented gradient (6, 9), basis (6, 2)
    opt = LowRankOptimizer(
        [
            {
                "params": [weight],
                "rank": 2,
                "selector": "test_shifted_axes",
                "selector_options": {"test_shifted_axes": {"shift": 3}},
            }
        ],
        lr=0.01,
    )
    weight.grad = torch.randn(9, 6, generator=gen(1))
    opt.step()
    assert ShiftedAxes.calls == [3]
    assert torch.equal(opt.state[weight]["lowrank_basis"], torch.eye(6)[:, 3:5])


def test_selector_options_of_the_switch_rule_are_its_own(shifted_axes):
    # importance until step 2, then the registered rule with its own options (keyed by its name).
    weight = nn.Parameter(torch.zeros(9, 6))
    opt = LowRankOptimizer(
        [
            {
                "params": [weight],
                "rank": 2,
                "selector": "importance",
                "selector_options": {"test_shifted_axes": {"shift": 1}},
            }
        ],
        lr=0.01,
        schedule=RefreshSchedule(update_gap=2, switch_at=0.5, switch_to="test_shifted_axes", max_steps=4),
    )
    for step in range(3):
        weight.grad = torch.randn(9, 6, generator=gen(step))
        opt.step()
    assert ShiftedAxes.calls == [1]  # steps 0 (importance) and 2 (switched)
    assert torch.equal(opt.state[weight]["lowrank_basis"], torch.eye(6)[:, 1:3])


def test_unknown_selector_option_in_the_optimizer_is_named(shifted_axes):
    group = {"params": [nn.Parameter(torch.zeros(9, 6))], "rank": 2, "selector": "test_shifted_axes"}
    with pytest.raises(ValueError) as info:
        LowRankOptimizer([{**group, "selector_options": {"test_shifted_axes": {"offset": 3}}}])
    message = str(info.value)
    assert "selector_options.test_shifted_axes.offset" in message and "accepted: shift" in message
    with pytest.raises(ValueError, match="selector_options.test_shifted_axes.shift: invalid value -2"):
        LowRankOptimizer([{**group, "selector_options": {"test_shifted_axes": {"shift": -2}}}])


def test_register_selector_refuses_what_is_not_a_selector():
    class NotASelector:
        name = "test_not_a_selector"

        def select(self, grad, rank, generator):
            return None

    class Nameless(SubspaceSelector):
        def _basis(self, grad, rank, generator):
            return grad[:, :rank]

    for bad in (NotASelector, Nameless, make_selector("dominant"), "dominant"):
        with pytest.raises(ValueError, match="register_selector"):
            register_selector(bad)
    assert "test_not_a_selector" not in SELECTORS and None not in SELECTORS


def test_options_change_the_randomized_result():
    # Without oversampling and power iterations the range finder is visibly less accurate on a flat spectrum.
    grad = with_spectrum(60, 50, [1.0 - 0.01 * i for i in range(50)], seed=3).float()
    exact = gram_eigh(grad)[1][:, :5]
    crude = make_selector("randomized_dominant", oversampling=0, power_iters=0).select(grad, 5, gen(0))
    sharp = make_selector("randomized_dominant", oversampling=40, power_iters=6).select(grad, 5, gen(0))
    assert overlap(exact, sharp) > overlap(exact, crude) + 0.1


# ------------------------------------------------------------------------------------------------- contract
SHAPES = [(40, 12), (12, 40)]  # tall and wide oriented gradients (d, k)
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_orthonormal_columns_of_the_right_shape_and_dtype(name, shape, dtype):
    grad = torch.randn(*shape, generator=gen(11), dtype=torch.float64).to(dtype)
    for rank in (1, 5, min(shape)):
        basis = make_selector(name).select(grad, rank, gen(rank))
        assert basis.shape == (shape[0], rank)
        assert basis.dtype.is_floating_point and torch.finfo(basis.dtype).bits >= 32
        assert torch.finfo(basis.dtype).eps <= torch.finfo(torch.float32).eps
        assert torch.isfinite(basis).all()
        assert_orthonormal(basis)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "kind",
    ["zero", "nan", "inf", "-inf"],
)
def test_non_refreshable_gradients_give_none(name, kind):
    grad = torch.randn(10, 6, generator=gen(0))
    if kind == "zero":
        grad = torch.zeros(10, 6)
    else:
        grad[3, 2] = float(kind)
    assert not is_refreshable(grad)
    assert make_selector(name).select(grad, 2, gen(0)) is None


def test_is_refreshable_accepts_a_tiny_finite_gradient():
    grad = torch.zeros(5, 4)
    grad[1, 2] = 1e-30
    assert is_refreshable(grad)
    assert is_refreshable(torch.randn(3, 3, generator=gen(1)).to(torch.bfloat16))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rank", [0, 7])
def test_invalid_rank_raises(name, rank):
    with pytest.raises(ValueError, match="rank"):
        make_selector(name).select(torch.randn(10, 6, generator=gen(0)), rank, gen(0))


@pytest.mark.parametrize("name", NAMES)
def test_non_matrix_gradient_raises(name):
    with pytest.raises(ValueError):
        make_selector(name).select(torch.randn(10, generator=gen(0)), 2, gen(0))


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_identical_basis_and_global_rng_untouched(name):
    grad = torch.randn(30, 20, generator=gen(2))
    selector = make_selector(name)
    results = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        results.append(selector.select(grad, 6, gen(77)))
        assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("name", ["importance", "random", "randomized_importance"])
def test_different_seeds_give_different_bases(name):
    grad = decaying(30, 20, seed=4, rate=0.95).float()
    bases = [make_selector(name).select(grad, 4, gen(s)) for s in range(6)]
    assert any(not torch.allclose(bases[0], b) for b in bases[1:])


@pytest.mark.parametrize("name", SVD_BASED)
@pytest.mark.parametrize("shape", SHAPES)
def test_sign_convention_largest_magnitude_entry_positive(name, shape):
    grad = torch.randn(*shape, generator=gen(5))
    for seed in range(5):
        basis = make_selector(name).select(grad, 6, gen(seed))
        pivot = basis.abs().argmax(dim=0)
        assert torch.all(basis[pivot, torch.arange(basis.shape[1])] > 0)


# ------------------------------------------------------------------------------------------------- dominant
GAP = [10.0, 9.0, 8.0, 7.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dominant_spans_top_eigenvectors_of_gram(shape, dtype):
    grad = with_spectrum(*shape, GAP, seed=6).to(dtype)
    _, vectors = gram_eigh(grad)  # oracle on the matrix actually given (after rounding to dtype)
    basis = make_selector("dominant").select(grad, 4, gen(0))
    assert overlap(vectors[:, :4], basis) > 1 - 1e-6
    # Column by column too: the i-th column is the i-th singular vector (distinct values), up to sign.
    cosines = (vectors[:, :4] * basis.to(torch.float64)).sum(0).abs()
    assert torch.allclose(cosines, torch.ones(4, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_randomized_dominant_overlaps_exact_top_r(shape):
    d, k = 120, 80
    grad = decaying(d, k, seed=7, rate=0.9).float()
    if shape[0] < shape[1]:
        grad = grad.T.contiguous()
    exact = gram_eigh(grad)[1][:, :8]
    for seed in range(3):
        basis = make_selector("randomized_dominant").select(grad, 8, gen(seed))
        assert overlap(exact, basis) > 0.99


# ------------------------------------------------------------------------------------------------- importance
def eigen_residual(grad: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column b: Rayleigh quotient b^T G G^T b and relative residual ||G G^T b - q b|| / ||G G^T||."""
    g = grad.to(torch.float64)
    gram = g @ g.T
    b = basis.to(torch.float64)
    gb = gram @ b
    q = (b * gb).sum(0)
    return q, (gb - b * q).norm(dim=0) / torch.linalg.matrix_norm(gram, ord=2)


@pytest.mark.parametrize("name", ["importance", "randomized_importance"])
@pytest.mark.parametrize("shape", SHAPES)
def test_importance_columns_are_singular_vectors(name, shape):
    sigma = [3.0 * 0.8**i for i in range(12)]  # distinct values: each singular vector is defined up to sign
    grad = with_spectrum(*shape, sigma, seed=8).float()
    values, _ = gram_eigh(grad)
    for seed in range(10):
        basis = make_selector(name).select(grad, 4, gen(seed))
        q, residual = eigen_residual(grad, basis)
        assert float(residual.max()) < 1e-4
        # Each Rayleigh quotient is one of the sigma_i^2, and the columns are distinct singular vectors.
        match = (q[:, None] - values[None, :12]).abs().argmin(dim=1)
        assert torch.allclose(q, values[match], rtol=1e-4, atol=1e-6)
        assert len(set(match.tolist())) == 4


@pytest.mark.parametrize("name", ["importance", "randomized_importance"])
@pytest.mark.parametrize("shape", [(40, 30), (30, 40)])
def test_importance_never_picks_a_null_direction_while_enough_exist(name, shape):
    # Rank 6 gradient (a wide spread of non-zero values, so the smallest are drawn often), r = 4.
    grad = with_spectrum(*shape, [5.0, 2.0, 1.0, 0.5, 0.2, 0.1], seed=9).float()
    values, vectors = gram_eigh(grad)
    range_basis = vectors[:, :6]
    assert float(values[6]) < 1e-10 * float(values[0])  # the oracle agrees the rest is null
    picked_smallest = 0
    for seed in range(60):
        basis = make_selector(name).select(grad, 4, gen(seed)).to(torch.float64)
        in_range = (range_basis.T @ basis).square().sum(0)  # (r,) squared norm of each column inside range(G)
        assert torch.allclose(in_range, torch.ones(4, dtype=torch.float64), atol=1e-6)
        q, _ = eigen_residual(grad, basis)
        picked_smallest += int((q - values[5]).abs().min() < 1e-3 * float(values[5]))
    assert picked_smallest > 0  # the draw does reach the smallest non-zero value


@pytest.mark.parametrize("name", ["importance", "randomized_importance"])
def test_importance_rank_deficient_fallback_contains_the_whole_range(name):
    # Rank 3 gradient, r = 5: all three range directions plus two (numerically) null ones.
    grad = with_spectrum(20, 15, [4.0, 2.0, 1.0], seed=10).float()
    range_basis = gram_eigh(grad)[1][:, :3]
    for seed in range(3):
        basis = make_selector(name).select(grad, 5, gen(seed))
        assert_orthonormal(basis)
        contained = (basis.to(torch.float64).T @ range_basis).square().sum(0)  # range vectors inside span(B)
        assert torch.allclose(contained, torch.ones(3, dtype=torch.float64), atol=1e-6)


def exact_inclusion(weights: list[float], rank: int) -> list[float]:
    total = math.fsum(weights)
    w = [x / total for x in weights]
    inclusion = [0.0] * len(w)
    for order in itertools.permutations(range(len(w)), rank):
        p, left = 1.0, 1.0
        for i in order:
            p *= w[i] / left
            left -= w[i]
        for i in order:
            inclusion[i] += p
    return inclusion


def test_importance_selector_draws_with_probability_proportional_to_sigma():
    # End to end: which singular vector each column is (by its Rayleigh quotient) against the exact law.
    sigma = [4.0, 2.0, 1.0, 0.5, 0.25]
    grad = with_spectrum(5, 7, sigma, seed=12).float()
    values, _ = gram_eigh(grad)
    inclusion = exact_inclusion([math.sqrt(max(v, 0.0)) for v in values.tolist()], 2)
    n = 3000
    counts = [0] * 5
    selector = make_selector("importance")
    generator = gen(13)
    for _ in range(n):
        q, _ = eigen_residual(grad, selector.select(grad, 2, generator))
        for i in (q[:, None] - values[None, :]).abs().argmin(dim=1).tolist():
            counts[i] += 1
    for count, p in zip(counts, inclusion):
        assert abs(count / n - p) <= 5 * math.sqrt(p * (1 - p) / n), (counts, inclusion)


# ------------------------------------------------------------------------------------------------- random
def test_random_basis_is_haar_overlap_and_mean():
    d, r, n = 12, 3, 1500
    fixed = haar(d, r, seed=14)
    selector = make_selector("random")
    grad = torch.randn(d, 8, generator=gen(15))
    generator = gen(16)
    overlaps, total = [], torch.zeros(d, r, dtype=torch.float64)
    for _ in range(n):
        basis = selector.select(grad, r, generator).to(torch.float64)
        overlaps.append(overlap(fixed, basis))
        total += basis
    x = torch.tensor(overlaps, dtype=torch.float64)
    standard_error = float(x.std()) / math.sqrt(n)
    assert abs(float(x.mean()) - r / d) < 4 * standard_error
    # Haar bases (not only Haar spans) have mean zero entry-wise; QR without the sign fix does not (its R has a
    # fixed-sign diagonal, which biases Q). Each entry has variance 1/d.
    assert float((total / n).abs().max()) < 5 * math.sqrt(1 / d / n)


def test_random_basis_independent_of_gradient_values():
    a = torch.randn(25, 10, generator=gen(17))
    b = torch.randn(25, 10, generator=gen(18)) * 1e3
    selector = make_selector("random")
    assert torch.equal(selector.select(a, 4, gen(19)), selector.select(b, 4, gen(19)))


@pytest.mark.parametrize("name", NAMES)
def test_transposed_view_gives_the_same_basis_as_a_contiguous_copy(name):
    # The projector hands selectors G^T as a (non-contiguous) view for a right projection.
    weight_grad = decaying(15, 25, seed=20).float()
    view = weight_grad.T
    assert not view.is_contiguous()
    a = make_selector(name).select(view, 4, gen(21))
    b = make_selector(name).select(view.contiguous(), 4, gen(21))
    assert torch.allclose(a, b, atol=1e-5)
