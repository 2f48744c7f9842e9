"""SubspaceResampler on foreign LightningModules: the schedule, staggering, the selector switch, accumulation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowrank import LowRankOptimizer, RefreshSchedule, build_optimizer
from lowrank_recipes.callbacks import SubspaceOverlapMonitor, SubspaceResampler
from tests.callbacks.helpers import (
    WARNING_FILTERS,
    FixedGradModule,
    MLPModule,
    RecordingLogger,
    RecordTap,
    Tap,
    make_trainer,
    optimizer_config,
    regression_loader,
    scalar_loader,
)

pytestmark = WARNING_FILTERS

TYPE_TAGS = ("overlap", "overlap_chance", "overlap_normalized")


def expected_tags(kinds: tuple[str, ...]) -> set[str]:
    return {f"lowrank/{family}/{kind}" for family in TYPE_TAGS for kind in (*kinds, "mean")}


def test_refreshes_every_update_gap_steps_and_logs_exactly(tmp_path: Path) -> None:
    module = MLPModule(optimizer_config(update_gap=3))
    logger, tap = RecordingLogger(), RecordTap()
    resampler = SubspaceResampler()
    # The monitor comes first on purpose: it listens to the optimizer, so callback order does not matter.
    trainer = make_trainer(tmp_path, 8, [SubspaceOverlapMonitor(image_interval=None), resampler, Tap(tap)], logger)
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
            (overlaps["lowrank/overlap/fc1"] + overlaps["lowrank/overlap/fc2"]) / 2
        )
    assert resampler.num_refreshes == 3 and resampler.last_refresh_step == 6
    assert [row[0] for row in tap.rows[-2:]] == [6, 6]
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, LowRankOptimizer)
    assert optimizer.schedule == RefreshSchedule(update_gap=3)  # the optimizer's own schedule, untouched
    assert optimizer.param_groups[0]["lowrank_step"] == 8


def test_accumulation_refreshes_per_optimizer_step_from_the_accumulated_gradient(tmp_path: Path) -> None:
    module = FixedGradModule(optimizer_config(update_gap=3, selector="dominant"))
    logger, tap = RecordingLogger(), RecordTap()
    trainer = make_trainer(
        tmp_path,
        7,
        [SubspaceResampler(), SubspaceOverlapMonitor(image_interval=None), Tap(tap)],
        logger,
        accumulate_grad_batches=2,
    )
    trainer.fit(module, scalar_loader([1.0, 3.0] * 7))

    assert tap.steps() == [0, 3, 6]
    assert logger.steps("lowrank/refresh_seconds") == [0, 3, 6]
    assert logger.steps("lowrank/overlap/mean") == [3, 6]
    # The loss is scaled by 1/2 per micro-batch: the full gradient is G * (1 + 3) / 2; after one micro-batch
    # it would be G / 2. (The tap reads the gradients after the optimizer step, which leaves them as they were
    # when the resampler refreshed in on_before_optimizer_step: no clipping, and Lightning zeroes them only before
    # the next backward.)
    for step in (0, 3, 6):
        torch.testing.assert_close(tap.grads[(step, "fc1.weight")], 2 * module.g1)
        torch.testing.assert_close(tap.grads[(step, "fc2.weight")], 2 * module.g2)


def test_staggered_schedule_refreshes_slices_once_per_period(tmp_path: Path) -> None:
    module = MLPModule(optimizer_config(update_gap=4, stagger=2, targets=("fc1", "fc2")), blocks=2)
    logger, tap = RecordingLogger(), RecordTap()
    resampler = SubspaceResampler()
    trainer = make_trainer(
        tmp_path, 11, [resampler, SubspaceOverlapMonitor(per_layer=True, image_interval=None), Tap(tap)], logger
    )
    trainer.fit(module, regression_loader())

    first, second = ["layers.0.fc1.weight", "layers.0.fc2.weight"], ["layers.1.fc1.weight", "layers.1.fc2.weight"]
    # Four weights in two slices: offsets 0 (layers.0) and 4 // 2 = 2 (layers.1); the optimizer's due sets agree.
    optimizer = trainer.optimizers[0]
    assert [sorted(d.name for d in optimizer.due(s)) for s in range(4)] == [first, [], second, []]
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
    assert set(logger.at(2)) == {
        "lowrank/refresh_seconds",
        *expected_tags(("fc1", "fc2")),
        *(f"lowrank/overlap_layer/{n}" for n in second),
    }


@pytest.mark.parametrize(("count", "gap", "stagger"), [(7, 5, 3), (4, 3, 3), (3, 2, 5), (5, 6, 1)])
def test_stagger_rule_refreshes_each_parameter_once_per_period(count: int, gap: int, stagger: int) -> None:
    module = MLPModule(optimizer_config(update_gap=gap, stagger=stagger, rank=2, targets=("fc1",)), blocks=count)
    optimizer = build_optimizer(module, module.optimizer_config)
    names = [f"layers.{i}.fc1.weight" for i in range(count)]  # the optimizer's places, in order
    # One step gives every weight its first basis; from then on only the schedule's rule decides what is due.
    for batch in regression_loader():
        module.training_step(batch, 0).backward()
    optimizer.step()
    due = {step: [d.name for d in optimizer.due(step)] for step in range(4 * gap)}
    offsets = [next(step for step in range(gap) if name in due[step]) for name in names]
    # The rule, computed here: place i of n in slice floor(i * k / n), offset floor(j * T / k).
    assert offsets == [(i * stagger // count) * gap // stagger for i in range(count)]
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] < gap
    assert len(set(offsets)) == min(stagger, gap, count)
    for start in range(0, 4 * gap, gap):
        seen = [name for step in range(start, start + gap) for name in due[step]]
        assert sorted(seen) == sorted(names)


def test_group_selector_then_the_schedules_switch(tmp_path: Path) -> None:
    module = MLPModule(optimizer_config(update_gap=2, selector="dominant", switch_at=0.5, switch_to="random"))
    tap = RecordTap()
    horizons: list[int | None] = []  # the schedule's max_steps while the refreshes run
    tap_max_steps = Tap(lambda trainer, *_: horizons.append(trainer.optimizers[0].schedule.max_steps))
    trainer = make_trainer(tmp_path, 8, [SubspaceResampler(), Tap(tap), tap_max_steps], RecordingLogger())
    trainer.fit(module, regression_loader())

    # switch_at 0.5 of trainer.max_steps 8 (filled in by the resampler): random from step 4 on.
    assert horizons == [8, 8, 8, 8]
    assert tap.steps() == [0, 2, 4, 6]
    assert [(row[0], row[2]) for row in tap.rows] == [
        (0, "dominant"),
        (0, "dominant"),
        (2, "dominant"),
        (2, "dominant"),
        (4, "random"),
        (4, "random"),
        (6, "random"),
        (6, "random"),
    ]
    optimizer = trainer.optimizers[0]
    assert optimizer.schedule.max_steps is None  # restored at teardown
    schedule = optimizer.schedule.with_max_steps(8)
    assert schedule.switch_step == 4
    assert [schedule.selector_at(s, "dominant") for s in (0, 3, 4, 100)] == ["dominant", "dominant", "random", "random"]


def test_without_a_switch_the_groups_rule_is_used(tmp_path: Path) -> None:
    module = MLPModule(optimizer_config(update_gap=2, selector="random"))
    tap = RecordTap()
    trainer = make_trainer(tmp_path, 3, [SubspaceResampler(), Tap(tap)])
    trainer.fit(module, regression_loader())
    assert [(row[0], row[2]) for row in tap.rows] == [(0, "random"), (0, "random"), (2, "random"), (2, "random")]
    assert trainer.optimizers[0].schedule.switch_at is None


def test_a_plain_loop_gets_the_same_refreshes_as_a_lightning_run(tmp_path: Path) -> None:
    steps = 9
    config = optimizer_config(update_gap=4, stagger=2, selector="importance", switch_at=0.5, switch_to="random")
    loader = regression_loader(samples=16, batch_size=4)  # 4 different batches, in order, epoch after epoch

    # Lightning: the resampler runs the refreshes (and fills the switch's max_steps from trainer.max_steps).
    tap = RecordTap()
    make_trainer(tmp_path, steps, [SubspaceResampler(), Tap(tap)]).fit(MLPModule(config, blocks=2), loader)

    # A plain loop over the same batches: the optimizer refreshes inside step(); the switch's horizon is set by hand.
    module = MLPModule({**config, "refresh": {**config["refresh"], "max_steps": steps}}, blocks=2)
    optimizer = build_optimizer(module, module.optimizer_config)
    plain: list[tuple[int, str, str, torch.Tensor]] = []
    optimizer.register_refresh_listener(
        lambda _, records: plain.extend((r.step, r.name, r.selector, r.new_basis.clone()) for r in records)
    )
    batches = iter([])
    for step in range(steps):
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        module.training_step(batch, step).backward()
        optimizer.step()
        optimizer.zero_grad()

    # Slices: layers.0 at 0, 4, 8; layers.1 at 0 (first basis), 2, 6; random from ceil(0.5 * 9) = 5 on.
    first = ["layers.0.fc1.weight", "layers.0.fc2.weight"]
    second = ["layers.1.fc1.weight", "layers.1.fc2.weight"]
    want = (
        [(0, n, "importance") for n in first + second]
        + [(2, n, "importance") for n in second]
        + [(4, n, "importance") for n in first]
        + [(6, n, "random") for n in second]
        + [(8, n, "random") for n in first]
    )
    assert [(row[0], row[1], row[2]) for row in tap.rows] == want
    assert [(row[0], row[1], row[2]) for row in plain] == want
    # Same model, data and draws: the same bases (compared up to the second refresh, before the runs' weights could
    # drift apart by rounding).
    early = [i for i, row in enumerate(want) if row[0] <= 2]
    assert len(early) == 6
    for i in early:
        torch.testing.assert_close(plain[i][3], tap.rows[i][3], rtol=0, atol=1e-6, msg=str(want[i]))
