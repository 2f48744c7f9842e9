"""Tests of GlobalBatchSampler: rank-count independence, coverage, resume, state validation."""

from __future__ import annotations

import itertools

import pytest

from lowrank_recipes.recipes.data.sampler import GlobalBatchSampler, pass_permutation


def take(sampler: GlobalBatchSampler, n: int) -> list[list[int]]:
    """The next n batches, across epoch ends (each `iter()` runs to the end of one nominal epoch)."""
    out: list[list[int]] = []
    while len(out) < n:
        out.extend(itertools.islice(iter(sampler), n - len(out)))
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_batches_do_not_depend_on_world_size(world_size: int) -> None:
    # 103 items, micro-batch 3, 4 micro-batches per optimizer step in total (W x accumulation = 4).
    n, micro, per_step, steps = 103, 3, 4, 30  # 30 steps = 360 items: several passes over 103
    single = take(GlobalBatchSampler(n, micro, 0, 1, seed=7), per_step * steps)
    ranks = [
        take(GlobalBatchSampler(n, micro, r, world_size, seed=7), per_step // world_size * steps)
        for r in range(world_size)
    ]
    accumulation = per_step // world_size
    for k in range(steps):
        reference = sorted(map(tuple, single[k * per_step : (k + 1) * per_step]))
        split = sorted(tuple(b) for r in ranks for b in r[k * accumulation : (k + 1) * accumulation])
        assert split == reference, f"step {k}"


def test_every_pass_is_a_permutation() -> None:
    n, micro = 20, 4
    batches = take(GlobalBatchSampler(n, micro, seed=1), 15)  # 60 positions = 3 passes
    stream = [i for b in batches for i in b]
    for p in range(3):
        assert sorted(stream[p * n : (p + 1) * n]) == list(range(n))
        assert stream[p * n : (p + 1) * n] == pass_permutation(n, 1, p).tolist()
    assert stream[:n] != stream[n : 2 * n]  # reshuffled each pass


def test_seed_fixes_the_order() -> None:
    a = take(GlobalBatchSampler(50, 5, seed=3), 8)
    assert a == take(GlobalBatchSampler(50, 5, seed=3), 8)
    assert a != take(GlobalBatchSampler(50, 5, seed=4), 8)


def test_nominal_epoch_length() -> None:
    sampler = GlobalBatchSampler(103, 3, 1, 4)
    assert len(sampler) == (103 // 3) // 4 == 8
    assert len(list(iter(sampler))) == 8
    assert len(list(iter(sampler))) == 8  # the next epoch continues the stream
    # A multiple of the accumulation, and the same epoch (in micro-batches) for every W x A split.
    assert [len(GlobalBatchSampler(103, 3, 0, w, accumulation=a)) for w, a in ((1, 4), (2, 2), (4, 1))] == [32, 16, 8]
    assert len(GlobalBatchSampler(103, 3, 0, 1, accumulation=3)) == 33
    assert len(GlobalBatchSampler(103, 3, 0, 2, accumulation=3)) == 15


@pytest.mark.parametrize("stop", [3, 8, 13])  # mid-epoch, at an epoch end, in the second epoch
def test_resume_continues_exactly(stop: int) -> None:
    reference = take(GlobalBatchSampler(43, 2, 1, 2, seed=5), 25)
    first = GlobalBatchSampler(43, 2, 1, 2, seed=5)
    head = take(first, stop)
    resumed = GlobalBatchSampler(43, 2, 1, 2, seed=5)
    resumed.load_state_dict(first.state_dict())
    assert head + take(resumed, 25 - stop) == reference
    # A resumed epoch runs to the end of the interrupted one (what Lightning expects), no further.
    rest = GlobalBatchSampler(43, 2, 1, 2, seed=5)
    rest.load_state_dict(first.state_dict())
    epoch = len(rest)  # 10 batches per rank
    assert len(list(iter(rest))) == epoch - stop % epoch


def test_state_is_rank_independent() -> None:
    # Rank 0's state (what Lightning checkpoints) restores any rank, and any world size it divides.
    ranks = [GlobalBatchSampler(60, 2, r, 2, seed=0) for r in range(2)]
    for s in ranks:
        take(s, 4)
    assert ranks[0].state_dict() == ranks[1].state_dict()
    single = GlobalBatchSampler(60, 2, 0, 1, seed=0)
    single.load_state_dict(ranks[0].state_dict())
    assert take(single, 2) == [ranks[0].global_batch(8), ranks[0].global_batch(9)]


def test_state_mismatch_names_the_key() -> None:
    state = GlobalBatchSampler(60, 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed=0 but this run has seed=1"):
        GlobalBatchSampler(60, 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="micro_batch_size=2 but this run has micro_batch_size=3"):
        GlobalBatchSampler(60, 3, seed=0).load_state_dict(state)
    odd = GlobalBatchSampler(60, 2, seed=0)
    take(odd, 3)
    with pytest.raises(ValueError, match="not divisible by world_size=2"):
        GlobalBatchSampler(60, 2, 0, 2, seed=0).load_state_dict(odd.state_dict())


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match=r"world_size x accumulation = 4"):
        GlobalBatchSampler(10, 4, 0, 4)
    with pytest.raises(ValueError, match="accumulation must be >= 1"):
        GlobalBatchSampler(10, 1, accumulation=0)
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        GlobalBatchSampler(10, 0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\)"):
        GlobalBatchSampler(10, 1, 2, 2)
