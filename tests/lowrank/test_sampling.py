"""SARA's importance draw against exact inclusion probabilities of successive sampling without replacement.

The oracle enumerates every ordered draw (i_1, ..., i_r) of distinct indices, whose probability is
prod_t w_{i_t} / (1 - sum_{s<t} w_{i_s}) with w = sigma / sum(sigma), in float64. It never calls torch.multinomial.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lowrank.sampling import importance_indices

N_DRAWS = 10000  # ~0.17 ms a call: 10000 keeps the file fast and still rejects sigma^2 weights by > 8 sd
N_SD = 5.0  # tolerance in binomial standard deviations


def exact_probabilities(weights: list[float], rank: int) -> tuple[list[float], dict[tuple[int, ...], float]]:
    """Inclusion probability of each index and probability of each (sorted) r-subset, by enumeration."""
    total = math.fsum(weights)
    w = [x / total for x in weights]
    inclusion = [0.0] * len(w)
    subsets: dict[tuple[int, ...], float] = {}
    for order in itertools.permutations(range(len(w)), rank):
        p, left = 1.0, 1.0
        for i in order:
            if left <= 0.0:
                p = 0.0
                break
            p *= w[i] / left
            left -= w[i]
        if p == 0.0:
            continue
        for i in order:
            inclusion[i] += p
        key = tuple(sorted(order))
        subsets[key] = subsets.get(key, 0.0) + p
    return inclusion, subsets


def draw_many(sigma: torch.Tensor, rank: int, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([importance_indices(sigma, rank, generator) for _ in range(n)])  # (n, rank)


def within_binomial(freq: float, p: float, n: int) -> bool:
    sd = math.sqrt(max(p * (1.0 - p), 1e-12) / n)
    return abs(freq - p) <= N_SD * sd


CASES = [
    # (sigma, rank, dtype): the second is unsorted on purpose (any order is accepted); spread so that weights sigma
    # and sigma^2 give clearly different laws.
    ([5.0, 3.0, 2.0, 1.0, 0.5], 2, torch.float32),
    ([0.7, 4.0, 1.5, 2.5, 0.3, 1.0], 3, torch.float64),
]


def test_oracle_has_power_against_squared_weights():
    # The tolerance below must be able to tell weights sigma from weights sigma^2 (the other common reading).
    for sigma, rank, _ in CASES:
        p_sigma, _ = exact_probabilities(sigma, rank)
        p_square, _ = exact_probabilities([s * s for s in sigma], rank)
        worst = max(abs(a - b) / (N_SD * math.sqrt(a * (1 - a) / N_DRAWS)) for a, b in zip(p_sigma, p_square))
        assert worst > 3.0
        assert math.isclose(math.fsum(p_sigma), rank, rel_tol=1e-12)


@pytest.mark.parametrize("sigma,rank,dtype", CASES)
def test_inclusion_frequencies_match_exact_successive_sampling(sigma, rank, dtype):
    inclusion, subsets = exact_probabilities(sigma, rank)
    draws = draw_many(torch.tensor(sigma, dtype=dtype), rank, N_DRAWS, seed=1234)
    counts = torch.bincount(draws.flatten(), minlength=len(sigma)).tolist()
    for i, (count, p) in enumerate(zip(counts, inclusion)):
        assert within_binomial(count / N_DRAWS, p, N_DRAWS), (i, count / N_DRAWS, p)
    # The joint law too: every r-subset's frequency against its exact probability.
    seen: dict[tuple[int, ...], int] = {}
    for row in draws.tolist():
        seen[tuple(row)] = seen.get(tuple(row), 0) + 1
    assert set(seen) <= set(subsets)
    for key, p in subsets.items():
        assert within_binomial(seen.get(key, 0) / N_DRAWS, p, N_DRAWS), (key, seen.get(key, 0) / N_DRAWS, p)


def test_fresh_generators_per_draw_match_exact_inclusion():
    sigma, rank, _ = CASES[0]
    inclusion, _ = exact_probabilities(sigma, rank)
    n = 2000
    s = torch.tensor(sigma, dtype=torch.float64)
    draws = torch.stack([importance_indices(s, rank, torch.Generator().manual_seed(seed)) for seed in range(n)])
    counts = torch.bincount(draws.flatten(), minlength=len(sigma)).tolist()
    for count, p in zip(counts, inclusion):
        assert within_binomial(count / n, p, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_sorted_unique_int64_on_sigma_device(dtype):
    sigma = torch.rand(30, generator=torch.Generator().manual_seed(0), dtype=dtype) + 0.1
    generator = torch.Generator().manual_seed(1)
    for rank in (1, 7, 30):
        for _ in range(20):
            idx = importance_indices(sigma, rank, generator)
            assert idx.dtype == torch.int64 and idx.shape == (rank,) and idx.device == sigma.device
            assert torch.all(idx[1:] > idx[:-1])  # strictly increasing: sorted and unique
            assert int(idx.min()) >= 0 and int(idx.max()) < 30
    assert torch.equal(importance_indices(sigma, 30, generator), torch.arange(30))


def test_near_zero_values_never_drawn_while_enough_others_exist():
    # Default rtol for float32 sigma: d * eps(float32); 1e-9 and 0 lie far below it, 1e-2 far above.
    sigma = torch.tensor([3.0, 0.0, 2.0, 1e-9, 1.0, 1e-2, 0.0], dtype=torch.float32)
    negligible = {1, 3, 6}
    draws = draw_many(sigma, 3, 1500, seed=7)
    drawn = set(draws.flatten().tolist())
    assert not drawn & negligible
    assert 5 in drawn  # a small but non-negligible value is still drawn sometimes (p ~ 1%)


def test_explicit_rtol_excludes_values_below_threshold():
    sigma = torch.tensor([1.0, 0.5, 0.04, 0.2, 0.06], dtype=torch.float64)
    n = 1500
    draws = draw_many(sigma, 2, n, seed=3)
    counts = torch.bincount(draws.flatten(), minlength=5)
    assert counts[2] > 0 and counts[4] > 0  # without rtol they are drawn
    generator = torch.Generator().manual_seed(3)
    thresholded = torch.stack([importance_indices(sigma, 2, generator, rtol=0.05) for _ in range(n)])
    counts = torch.bincount(thresholded.flatten(), minlength=5)
    assert counts[2] == 0  # 0.04 < 0.05 * 1.0
    assert counts[4] > 0  # 0.06 > 0.05 * 1.0
    # The thresholded law is successive sampling over the survivors.
    inclusion, _ = exact_probabilities([1.0, 0.5, 0.0, 0.2, 0.06], 2)
    for count, p in zip(counts.tolist(), inclusion):
        assert within_binomial(count / n, p, n)


def fallback_oracle(sigma: list[float], rtol: float) -> tuple[set[int], list[int]]:
    threshold = max(sigma) * rtol
    above = {i for i, s in enumerate(sigma) if s > threshold}
    rest = [i for i in range(len(sigma)) if i not in above]
    return above, rest


@pytest.mark.parametrize(
    "sigma,rank",
    [
        ([0.0, 5.0, 1e-12, 3.0, 1e-13, 0.0], 4),  # two positive, fill with 1e-12 and 1e-13
        ([0.0, 5.0, 1e-12, 3.0, 1e-13, 0.0], 5),  # ... and one of the exact zeros
        ([0.0, 5.0, 0.0, 3.0, 0.0], 4),  # ties among the negligible ones
        ([0.0, 0.0, 0.0, 0.0], 2),  # nothing above the threshold at all
        ([2.0, 1e-10, 1e-11, 1e-9], 3),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fallback_takes_all_non_negligible_then_largest_remaining(sigma, rank, seed):
    rtol = 1e-6
    above, rest = fallback_oracle(sigma, rtol)
    assert len(above) < rank  # the case under test
    generator = torch.Generator().manual_seed(seed)
    idx = importance_indices(torch.tensor(sigma, dtype=torch.float64), rank, generator, rtol=rtol)
    chosen = idx.tolist()
    assert chosen == sorted(set(chosen)) and len(chosen) == rank
    assert above <= set(chosen)
    filled = [i for i in chosen if i not in above]
    skipped = [i for i in rest if i not in filled]
    assert len(filled) == rank - len(above)
    # The filled slots hold the largest of the remaining values (any tie-break among equal values is fine).
    if skipped:
        assert min(sigma[i] for i in filled) >= max(sigma[i] for i in skipped)


def test_fallback_with_default_rtol_float32():
    # The default rtol is d * eps(dtype): for float32 and d = 6 about 7e-7, so 1e-9 and 1e-8 count as zero.
    sigma = [1.0, 1e-9, 1e-3, 1e-8, 0.0, 0.0]
    rtol = len(sigma) * torch.finfo(torch.float32).eps
    above, rest = fallback_oracle(sigma, rtol)
    largest_rest = sorted(rest, key=lambda i: -sigma[i])[: 4 - len(above)]
    assert len(set(sigma[i] for i in largest_rest)) == len(largest_rest)  # no ties: the expected set is unique
    idx = importance_indices(torch.tensor(sigma, dtype=torch.float32), 4, torch.Generator().manual_seed(0))
    assert idx.tolist() == sorted(above | set(largest_rest))


def test_same_seed_same_draw_different_seeds_differ():
    sigma = torch.rand(40, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.05
    a = importance_indices(sigma, 10, torch.Generator().manual_seed(42))
    b = importance_indices(sigma, 10, torch.Generator().manual_seed(42))
    assert torch.equal(a, b)
    draws = {tuple(importance_indices(sigma, 10, torch.Generator().manual_seed(s)).tolist()) for s in range(12)}
    assert len(draws) >= 10  # C(40, 10) ~ 8.5e8 subsets: collisions are essentially impossible


def test_draw_independent_of_global_rng_and_leaves_it_untouched():
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    results = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        results.append(importance_indices(sigma, 3, torch.Generator().manual_seed(9)))
        assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(results[0], results[1])
    # The fallback path as well.
    before = torch.get_rng_state()
    importance_indices(torch.zeros(5), 2, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("rank", [0, -1, 6, 100])
def test_invalid_rank_raises(rank):
    with pytest.raises(ValueError, match="rank"):
        importance_indices(torch.ones(5), rank, torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "sigma",
    [
        torch.ones(2, 3),
        torch.tensor([1.0, -0.5, 2.0]),
        torch.tensor([1.0, float("nan"), 2.0]),
        torch.tensor([1.0, float("inf"), 2.0]),
    ],
)
def test_invalid_sigma_raises(sigma):
    with pytest.raises(ValueError):
        importance_indices(sigma, 1, torch.Generator().manual_seed(0))
