"""The refresh schedule: the pure rule (against a brute force of its documented formula), the optimizer's due set
against the refreshes that really happen, and the selector switch."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from lowrank import DueRefresh, LowRankOptimizer, RefreshSchedule

T = 4
STAGGERS = [1, 3, 7]  # 7 > T: several slices share an offset


def brute_force_due(step: int, n: int, update_gap: int, stagger: int) -> list[int]:
    """The documented rule, written out: slice j = floor(i k / n), offset o_j = floor(j T / k), due when s >= 0 and
    (s - o_j) % T == 0."""
    due = []
    for i in range(n):
        j = math.floor(i * stagger / n)
        offset = math.floor(j * update_gap / stagger)
        if step >= 0 and (step - offset) % update_gap == 0:
            due.append(i)
    return due


# Offsets of the five places for T = 4, worked out by hand from the docstring's formula.
HAND_OFFSETS = {
    1: [0, 0, 0, 0, 0],  # one slice
    3: [0, 0, 1, 1, 2],  # j = 0, 0, 1, 1, 2 -> floor(4 j / 3)
    7: [0, 0, 1, 2, 2],  # j = 0, 1, 2, 4, 5 -> floor(4 j / 7)
}


@pytest.mark.parametrize("stagger", STAGGERS)
def test_due_places_follow_the_documented_formula(stagger):
    schedule, n = RefreshSchedule(update_gap=T, stagger=stagger), 5
    for step in range(-3, 6 * T):
        assert schedule.due_places(step, n) == brute_force_due(step, n, T, stagger), step
    for step in range(0, 3 * T):  # the hand-computed table, independently of the brute force
        assert schedule.due_places(step, n) == [i for i in range(n) if step % T == HAND_OFFSETS[stagger][i]], step
    assert all(schedule.due_places(step, n) == [] for step in range(-2 * T, 0))


@pytest.mark.parametrize("stagger", STAGGERS)
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_every_place_is_due_once_in_every_window_of_update_gap_steps(stagger, n):
    schedule = RefreshSchedule(update_gap=T, stagger=stagger)
    due = [schedule.due_places(step, n) for step in range(6 * T)]
    for start in range(len(due) - T + 1):
        counts = [0] * n
        for places in due[start : start + T]:
            for place in places:
                counts[place] += 1
        assert counts == [1] * n, (start, counts)


def test_stagger_one_refreshes_everything_at_multiples_of_the_gap():
    schedule = RefreshSchedule(update_gap=T)
    for step in range(5 * T):
        assert schedule.due_places(step, 6) == (list(range(6)) if step % T == 0 else [])


# ----------------------------------------------------------------------------------------------- optimizer
NAMES = [f"layers.{i}.proj.weight" for i in range(5)]


class Stack(nn.Module):
    """Five small linear weights (low-rank) in a chain, with biases (plain)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(6, 6) for _ in range(5)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _optimizer(model: Stack, schedule, selector: str = "dominant") -> LowRankOptimizer:
    return LowRankOptimizer(
        [
            {"params": [layer.weight for layer in model.layers], "param_names": NAMES, "rank": 2, "selector": selector},
            {"params": [layer.bias for layer in model.layers]},
        ],
        lr=0.01,
        schedule=schedule,
    )


def _loss(model: Stack, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(50 + step)
    return (model(torch.randn(8, 6, generator=g)) - torch.randn(8, 6, generator=g)).square().mean()


def _run(opt: LowRankOptimizer, model: Stack, steps: int) -> tuple[list[list[DueRefresh]], dict[int, list]]:
    """Per step: ``opt.due()`` before forward/backward, and the records the listener got, by record step."""
    refreshed: dict[int, list] = {}
    calls = []

    def listener(optimizer, records):
        assert optimizer is opt
        calls.append(len(records))
        for record in records:
            refreshed.setdefault(record.step, []).append(record)

    opt.register_refresh_listener(listener)
    due = []
    for step in range(steps):
        due.append(opt.due())
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
        assert opt.param_groups[0]["lowrank_step"] == step + 1
    assert len(calls) == sum(1 for d in due if d)  # one call per step that refreshed
    return due, refreshed


@pytest.mark.parametrize("stagger", STAGGERS)
def test_due_is_what_refreshes(stagger):
    model = Stack()
    opt = _optimizer(model, RefreshSchedule(update_gap=T, stagger=stagger))
    due, refreshed = _run(opt, model, steps=10)
    for step in range(10):
        expected = set(NAMES) if step == 0 else {NAMES[i] for i in brute_force_due(step, 5, T, stagger)}
        assert {d.name for d in due[step]} == expected, step
        assert sorted(r.name for r in refreshed.get(step, [])) == sorted(expected), step
        assert all(d.selector == "dominant" for d in due[step])
    assert set(refreshed) <= set(range(10))
    # The staggered runs spread the refreshes: never more than ceil(n / min(k, T)) at once after step 0.
    assert max(len(refreshed.get(s, [])) for s in range(1, 10)) <= math.ceil(5 / min(stagger, T))


def test_due_of_a_given_step_and_resample_at_that_step():
    model = Stack()
    opt = _optimizer(model, {"update_gap": T, "stagger": 3})
    assert opt.schedule == RefreshSchedule(update_gap=T, stagger=3)  # a mapping of fields works too
    _run(opt, model, steps=1)  # every weight has a basis now
    for step in range(1, 2 * T):
        assert [d.name for d in opt.due(step)] == [NAMES[i] for i in brute_force_due(step, 5, T, 3)], step
    _loss(model, 1).backward()
    records = opt.resample(step=6)  # 6 % 4 == 2: the slice with offset 2 (place 4)
    assert [(r.name, r.step) for r in records] == [(NAMES[4], 6)]


def test_a_weight_without_a_basis_is_due_at_its_first_step():
    model = Stack()
    opt = _optimizer(model, RefreshSchedule(update_gap=T, stagger=3))
    late = nn.Parameter(torch.zeros(6, 6))
    opt.add_param_group({"params": [late], "param_names": ["late.weight"], "rank": 2})
    _run(opt, model, steps=3)
    # Six places now; at step 3 the rule refreshes none of slice 2 (place 5, offset 2): only the missing basis makes
    # late.weight due.
    rule = brute_force_due(3, 6, T, 3)
    assert 5 not in rule
    assert [d.name for d in opt.due()] == [NAMES[i] for i in rule] + ["late.weight"]
    late.grad = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
    records = []
    opt.register_refresh_listener(lambda o, rs: records.extend(rs))
    opt.step()
    assert "lowrank_basis" in opt.state[late]
    assert ("late.weight", 3) in {(r.name, r.step) for r in records}


# ----------------------------------------------------------------------------------------------- switch
def test_selector_switches_at_the_fraction_of_max_steps():
    model = Stack()
    schedule = RefreshSchedule(update_gap=2, switch_at=0.5, switch_to="random", max_steps=8)
    opt = _optimizer(model, schedule, selector="dominant")
    due, refreshed = _run(opt, model, steps=8)
    assert sorted(refreshed) == [0, 2, 4, 6]
    for step, records in refreshed.items():
        expected = "dominant" if step < 4 else "random"  # switch step ceil(0.5 * 8) = 4
        assert sorted(r.name for r in records) == sorted(NAMES)
        assert {r.selector for r in records} == {expected}, step
        assert {d.selector for d in due[step]} == {expected}, step


def test_switch_without_max_steps_raises_at_a_refresh():
    model = Stack()
    opt = _optimizer(model, RefreshSchedule(update_gap=2, switch_at=0.5, switch_to="random"))
    _loss(model, 0).backward()
    with pytest.raises(ValueError, match="max_steps"):
        opt.step()
    opt.schedule = dataclasses.replace(opt.schedule, max_steps=8)  # the schedule is assignable (callbacks fill it)
    opt.step()
    assert opt.param_groups[0]["lowrank_step"] == 1


def test_with_max_steps_fills_only_an_unset_value():
    schedule = RefreshSchedule(switch_at=0.25, switch_to="random")
    assert schedule.with_max_steps(100).max_steps == 100 and schedule.with_max_steps(100).switch_step == 25
    assert RefreshSchedule(max_steps=10).with_max_steps(100).max_steps == 10
    assert RefreshSchedule().switch_step is None
