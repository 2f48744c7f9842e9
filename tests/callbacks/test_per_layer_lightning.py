"""PerLayerUpdates in a Lightning run: same weights as the ordinary run, clear errors for what it cannot honour."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lowrank_recipes.callbacks import SubspaceOverlapMonitor
from lowrank_recipes.callbacks.per_layer import PerLayerUpdates
from lowrank_recipes.callbacks.resampler import SubspaceResampler
from tests.callbacks.helpers import (
    WARNING_FILTERS,
    MLPModule,
    RecordingLogger,
    RecordTap,
    Tap,
    make_trainer,
    optimizer_config,
    regression_loader,
)

pytestmark = WARNING_FILTERS


class ClippedMLP(MLPModule):
    """The oracle's clipping: torch's clip_grad_norm_ on each parameter separately, before the ordinary step."""

    def __init__(self, clip: float | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clip = clip
        self.alive_grads: list[int] = []

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.alive_grads.append(sum(p.grad is not None for p in self.parameters()))
        if self.clip is not None:
            for p in self.parameters():
                if p.grad is not None:
                    torch.nn.utils.clip_grad_norm_(p, self.clip)


def fit(root: Path, per_layer: bool, clip: float | None, selector: str) -> ClippedMLP:
    # update_gap=3 over 5 steps: refreshes at steps 0 and 3 (fc1, fc2 low-rank; biases plain).
    module = ClippedMLP(clip, optimizer=optimizer_config(rank=4, update_gap=3, selector=selector), blocks=0)
    callbacks = [PerLayerUpdates(clip_norm=clip)] if per_layer else []
    make_trainer(root, max_steps=5, callbacks=callbacks).fit(module, regression_loader(samples=16, batch_size=4))
    return module


@pytest.mark.parametrize("selector", ["dominant", "importance"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_same_weights_as_ordinary_run(tmp_path: Path, clip: float | None, selector: str) -> None:
    ref = fit(tmp_path / "ref", per_layer=False, clip=clip, selector=selector)
    got = fit(tmp_path / "got", per_layer=True, clip=clip, selector=selector)
    for (name, a), (_, b) in zip(ref.named_parameters(), got.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    assert ref.alive_grads == [4] * 5  # all gradients alive at the ordinary step
    assert got.alive_grads == [0] * 5  # freed inside backward
    assert got.trainer.optimizers[0].per_layer is None  # hooks removed at teardown
    assert got.trainer.optimizers[0].param_groups[0]["lowrank_step"] == 5


def trainer_error(root: Path, callbacks: list, **kwargs) -> str:
    module = MLPModule(optimizer_config())
    trainer = make_trainer(root, max_steps=2, callbacks=callbacks, **kwargs)
    with pytest.raises(MisconfigurationException) as info:
        trainer.fit(module, regression_loader())
    return str(info.value)


def test_accumulation_is_refused(tmp_path: Path) -> None:
    message = trainer_error(tmp_path, [PerLayerUpdates()], accumulate_grad_batches=2)
    assert "accumulate_grad_batches=2: each backward updates the weights" in message


def test_global_clipping_is_refused(tmp_path: Path) -> None:
    message = trainer_error(tmp_path, [PerLayerUpdates()], gradient_clip_val=1.0)
    assert "gradient_clip_val=1.0" in message and "PerLayerUpdates(clip_norm=...)" in message


@pytest.mark.parametrize("order", ["resampler_first", "resampler_last"])
def test_an_attached_resampler_has_nothing_to_run(tmp_path: Path, order: str) -> None:
    # The refreshes run inside backward; the resampler neither refreshes again nor logs a refresh time.
    resampler, logger = SubspaceResampler(), RecordingLogger()
    module = ClippedMLP(None, optimizer=optimizer_config(rank=4, update_gap=3, selector="importance"))
    callbacks = [PerLayerUpdates(), resampler] if order == "resampler_last" else [resampler, PerLayerUpdates()]
    make_trainer(tmp_path / "both", max_steps=5, callbacks=callbacks, logger=logger).fit(
        module, regression_loader(samples=16, batch_size=4)
    )
    alone = fit(tmp_path / "alone", per_layer=True, clip=None, selector="importance")
    for (name, a), (_, b) in zip(alone.named_parameters(), module.named_parameters()):
        assert torch.equal(b, a), name
    assert resampler.num_refreshes == 0 and resampler.last_refresh_step is None
    assert logger.steps("lowrank/refresh_seconds") == []
    assert module.alive_grads == [0] * 5


def test_ddp_is_refused(tmp_path: Path) -> None:
    message = trainer_error(tmp_path, [PerLayerUpdates()], strategy="ddp")
    assert "strategy DDPStrategy with world_size=1: per-layer updates run on a single device" in message


def test_all_problems_in_one_error(tmp_path: Path) -> None:
    message = trainer_error(tmp_path, [PerLayerUpdates(clip_norm=-1)], accumulate_grad_batches=2, gradient_clip_val=1.0)
    assert "accumulate_grad_batches=2" in message and "gradient_clip_val=1.0" in message
    assert "clip_norm: invalid value -1" in message


# ------------------------------------------------------------------------ the refresh schedule under per-layer updates
STEPS, GAP, STAGGER, SWITCH_AT = 8, 3, 2, 0.5


def expected_refreshes(
    names: list[str], steps: int, gap: int, stagger: int, switch_at: float, group: str, switch_to: str
) -> list[tuple[int, str, str]]:
    """(step, name, selector) of every refresh, from the schedule's definition: place i of n in slice
    floor(i * k / n) with offset floor(j * T / k), due when (s - offset) % T == 0; every weight at step 0 (no basis
    yet); the group's selector before ceil(switch_at * steps), switch_to from then on."""
    n, switch = len(names), math.ceil(switch_at * steps)
    rows = []
    for step in range(steps):
        for i, name in enumerate(names):
            offset = (i * stagger // n) * gap // stagger
            if step == 0 or (step >= offset and (step - offset) % gap == 0):
                rows.append((step, name, switch_to if step >= switch else group))
    return rows


def test_per_layer_updates_honour_stagger_and_switch(tmp_path: Path) -> None:
    config = optimizer_config(
        rank=4, update_gap=GAP, stagger=STAGGER, switch_at=SWITCH_AT, switch_to="random", selector="importance"
    )
    module = MLPModule(config, blocks=2)
    names = [f"layers.{i}.{kind}.weight" for i in range(2) for kind in ("fc1", "fc2")]
    tap, logger = RecordTap(), RecordingLogger()
    monitor = SubspaceOverlapMonitor(per_layer=True, image_interval=None)
    trainer = make_trainer(tmp_path, STEPS, [PerLayerUpdates(), monitor, Tap(tap)], logger)
    trainer.fit(module, regression_loader(samples=16, batch_size=4))

    want = expected_refreshes(names, STEPS, GAP, STAGGER, SWITCH_AT, "importance", "random")
    # by hand: slice 0 (layers.0) at 0, 3, 6; slice 1 (layers.1) at 0, 1, 4, 7; random from step 4 on
    assert sorted({step for step, _, _ in want}) == [0, 1, 3, 4, 6, 7]
    got = [(row[0], row[1], row[2]) for row in tap.rows]
    assert sorted(got) == sorted(want)
    assert [row[0] for row in tap.rows] == sorted(row[0] for row in tap.rows)  # delivered step by step
    assert tap.grads == {}  # freed inside backward

    # The records carry no old basis, but the overlap with the weight's previous basis, recomputed here.
    assert len(tap.old_bases) == len(want) and all(old is None for old in tap.old_bases)
    previous: dict[str, torch.Tensor] = {}
    for step, name, _, basis, overlap in tap.rows:
        if name not in previous:
            assert overlap is None, (step, name)
        else:
            assert overlap is not None, (step, name)
            old = previous[name]
            assert overlap == pytest.approx(float((old.T @ basis).square().sum()) / basis.shape[1], abs=1e-5)
        previous[name] = basis

    # The monitor hears them: the overlap tags at every step with an overlap, each weight's value its record's.
    with_overlap = sorted({step for step, name, _ in want if step > 0})
    assert logger.steps("lowrank/overlap/mean") == with_overlap == [1, 3, 4, 6, 7]
    for step, name, _, _, overlap in tap.rows:
        if overlap is not None:
            assert logger.at(step)[f"lowrank/overlap_layer/{name}"] == pytest.approx(overlap)
    latest: dict[str, float] = {}
    for step in with_overlap:
        latest.update({row[1]: row[4] for row in tap.rows if row[0] == step and row[4] is not None})
        assert logger.at(step)["lowrank/overlap/mean"] == pytest.approx(sum(latest.values()) / len(latest))
    assert trainer.optimizers[0].schedule.max_steps is None  # filled from trainer.max_steps for the run only
