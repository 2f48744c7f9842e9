"""SubspaceResampler on foreign LightningModules: the schedule, staggering, the selector switch, accumulation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from callbacks import SubspaceOverlapMonitor, SubspaceResampler
from lowrank import LowRankOptimizer, build_optimizer
from tests.callbacks.helpers import (
    WARNING_FILTERS, FixedGradModule, MLPModule, RecordingLogger, RecordTap, make_trainer, optimizer_config,
    regression_loader, scalar_loader,
)

pytestmark = WARNING_FILTERS

TYPE_TAGS = ("overlap", "overlap_chance", "overlap_normalized")


def expected_tags(kinds: tuple[str, ...]) -> set[str]:
    return {f"lowrank/{family}/{kind}" for family in TYPE_TAGS for kind in (*kinds, "mean")}


def test_refreshes_every_update_gap_steps_and_logs_exactly(tmp_path: Path) -> None:
    module = MLPModule(optimizer_config(update_gap=3))
    logger, tap = RecordingLogger(), RecordTap()
    resampler = SubspaceResampler()
    resampler.subscribe(tap)
    # The monitor comes first on purpose: it subscribes, so callback order does not matter.
    trainer = make_trainer(tmp_path, 8, [SubspaceOverlapMonitor(image_interval=None), resampler], logger)
    trainer.fit(module, regression_loader())

    assert tap.steps() == [0, 3, 6]
    assert all(tap.names_at(s) == ["fc1.weight", "fc2.weight"] for s in (0, 3, 6))
    calls = logger.lowrank_calls()
    assert [step for step, _ in calls] == [0, 3, 3, 6, 6]  # refresh_seconds, then the monitor's overlaps
    assert logger.steps("lowrank/refresh_seconds") == [0, 3, 6]
    assert all(seconds >= 0 for seconds in logger.values("lowrank/refresh_seconds"))
    for step in (3, 6):
        overlaps = calls[[s for s, _ in calls].index(step) + 1][1]
        assert set(overlaps) == expected_tags(("fc1", "fc2"))
        assert overlaps["lowrank/overlap_chance/fc1"] == pytest.approx(4 / 12)
        assert all(0.0 <= overlaps[f"lowrank/overlap/{k}"] <= 1.0 for k in ("fc1", "fc2", "mean"))
        o, c = overlaps["lowrank/overlap/fc2"], overlaps["lowrank/overlap_chance/fc2"]
        assert overlaps["lowrank/overlap_normalized/fc2"] == pytest.approx((o - c) / (1 - c))
        assert overlaps["lowrank/overlap/mean"] == pytest.approx(
            (overlaps["lowrank/overlap/fc1"] + overlaps["lowrank/overlap/fc2"]) / 2)
    assert resampler.num_refreshes == 3 and resampler.last_refresh_step == 6
    assert [r.step for r in resampler.last_records] == [6, 6]
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, LowRankOptimizer)
    assert optimizer.auto_refresh is True  # restored at teardown
    assert optimizer.param_groups[0]["lowrank_step"] == 8


def test_accumulation_refreshes_per_optimizer_step_from_the_accumulated_gradient(tmp_path: Path) -> None:
    module = FixedGradModule(optimizer_config(update_gap=3, selector="dominant"))
    logger, tap = RecordingLogger(), RecordTap()
    resampler = SubspaceResampler()
    resampler.subscribe(tap)
    trainer = make_trainer(tmp_path, 7, [resampler, SubspaceOverlapMonitor(image_interval=None)], logger,
                           accumulate_grad_batches=2)
    trainer.fit(module, scalar_loader([1.0, 3.0] * 7))

    assert tap.steps() == [0, 3, 6]
    assert logger.steps("lowrank/refresh_seconds") == [0, 3, 6]
    assert logger.steps("lowrank/overlap/mean") == [3, 6]
    # The loss is scaled by 1/2 per micro-batch: the full gradient is G * (1 + 3) / 2; after one micro-batch
    # it would be G / 2.
    for step in (0, 3, 6):
        torch.testing.assert_close(tap.grads[(step, "fc1.weight")], 2 * module.g1)
        torch.testing.assert_close(tap.grads[(step, "fc2.weight")], 2 * module.g2)


def test_staggered_schedule_refreshes_slices_once_per_period(tmp_path: Path) -> None:
    module = MLPModule(optimizer_config(update_gap=4, targets=("fc1", "fc2")), blocks=2)
    logger, tap = RecordingLogger(), RecordTap()
    resampler = SubspaceResampler(stagger=2)
    resampler.subscribe(tap)
    trainer = make_trainer(tmp_path, 11, [resampler, SubspaceOverlapMonitor(per_layer=True, image_interval=None)],
                           logger)
    trainer.fit(module, regression_loader())

    first, second = ["layers.0.fc1.weight", "layers.0.fc2.weight"], ["layers.1.fc1.weight", "layers.1.fc2.weight"]
    assert [(e.name, e.gap, e.offset) for e in resampler.schedule] == [
        (first[0], 4, 0), (first[1], 4, 0), (second[0], 4, 2), (second[1], 4, 2)]
    # Step 0 gives every weight its first basis; then slice 0 at 4, 8 and slice 1 at 2, 6, 10.
    assert tap.steps() == [0, 2, 4, 6, 8, 10]
    assert tap.names_at(0) == first + second
    assert all(tap.names_at(s) == first for s in (4, 8))
    assert all(tap.names_at(s) == second for s in (2, 6, 10))
    assert logger.steps("lowrank/refresh_seconds") == [0, 2, 4, 6, 8, 10]
    for name in first:
        assert logger.steps(f"lowrank/overlap_layer/{name}") == [4, 8]
    for name in second:
        assert logger.steps(f"lowrank/overlap_layer/{name}") == [2, 6, 10]
    assert set(logger.at(2)) == {"lowrank/refresh_seconds", *expected_tags(("fc1", "fc2")),
                                 *(f"lowrank/overlap_layer/{n}" for n in second)}


@pytest.mark.parametrize(("count", "gap", "stagger"), [(7, 5, 3), (4, 3, 3), (3, 2, 5), (5, 6, 1)])
def test_stagger_rule_refreshes_each_parameter_once_per_period(count: int, gap: int, stagger: int) -> None:
    module = MLPModule(optimizer_config(update_gap=gap, rank=2, targets=("fc1",)), blocks=count)
    optimizer, _ = build_optimizer(module, module.optimizer_config)
    resampler = SubspaceResampler(stagger=stagger)
    resampler._entries = resampler._build_schedule(optimizer)
    offsets = [e.offset for e in resampler.schedule]
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] < gap
    assert len(set(offsets)) == min(stagger, gap, count)
    for start in range(0, 4 * gap, gap):
        seen = [name for step in range(start, start + gap) for name in resampler.due(step)]
        assert sorted(seen) == sorted(e.name for e in resampler.schedule)


def test_update_gap_override_and_selector_switch(tmp_path: Path) -> None:
    module = MLPModule(optimizer_config(update_gap=100, selector="importance"))
    tap = RecordTap()
    resampler = SubspaceResampler(update_gap=2, selector="dominant", switch_at=0.5, switch_to="random")
    resampler.subscribe(tap)
    trainer = make_trainer(tmp_path, 8, [resampler], RecordingLogger())
    trainer.fit(module, regression_loader())

    assert resampler.switch_step == 4
    assert tap.steps() == [0, 2, 4, 6]
    assert [(row[0], row[2]) for row in tap.rows] == [
        (0, "dominant"), (0, "dominant"), (2, "dominant"), (2, "dominant"),
        (4, "random"), (4, "random"), (6, "random"), (6, "random")]
    assert [resampler.selector_at(s) for s in (0, 3, 4, 100)] == ["dominant", "dominant", "random", "random"]


def test_without_a_selector_override_the_groups_rule_is_used(tmp_path: Path) -> None:
    module = MLPModule(optimizer_config(update_gap=2, selector="random"))
    tap = RecordTap()
    resampler = SubspaceResampler()
    resampler.subscribe(tap)
    make_trainer(tmp_path, 3, [resampler]).fit(module, regression_loader())
    assert {row[2] for row in tap.rows} == {"random"}
    assert resampler.selector_at(2) is None
