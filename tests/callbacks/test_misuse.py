"""Every misuse of the callbacks fails early with a message that names the problem and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lowrank import SELECTORS
from lowrank_recipes.callbacks import PerLayerUpdates, SubspaceOverlapMonitor, SubspaceResampler
from tests.callbacks.helpers import WARNING_FILTERS, MLPModule, make_trainer, optimizer_config, regression_loader

pytestmark = WARNING_FILTERS


class AdamWModule(MLPModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class ManualModule(MLPModule):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        optimizer.step()


def fit(root: Path, callbacks: list, module: MLPModule | None = None, **trainer_kwargs: Any) -> None:
    module = module or MLPModule(optimizer_config())
    trainer_kwargs.setdefault("max_steps", 2)
    make_trainer(root, callbacks=callbacks, **trainer_kwargs).fit(module, regression_loader())


def test_optimizer_that_is_not_lowrank(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match=r"needs exactly one lowrank.LowRankOptimizer, found: AdamW"):
        fit(tmp_path, [SubspaceResampler()], AdamWModule(optimizer_config()))


class RenamedResampler(SubspaceResampler):
    """A subclass with its own checkpoint key: Lightning's duplicate check lets it through, ours must not."""

    @property
    def state_key(self) -> str:
        return "RenamedResampler"


def test_two_resamplers(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match=r"2 SubspaceResampler callbacks are attached; keep exactly"):
        fit(tmp_path, [SubspaceResampler(), RenamedResampler()])
    # Two of the same class share a checkpoint key: Lightning itself refuses them when the Trainer is built.
    with pytest.raises(RuntimeError, match=r"more than one stateful callback of type `SubspaceResampler`"):
        fit(tmp_path, [SubspaceResampler(), SubspaceResampler()])


def test_manual_optimization(tmp_path: Path) -> None:
    with pytest.raises(
        MisconfigurationException,
        match=r"needs automatic optimization.*refreshes on its schedule "
        r"inside step\(\): remove the callback",
    ):
        fit(tmp_path, [SubspaceResampler()], ManualModule(optimizer_config()))


@pytest.mark.parametrize("callback", [SubspaceResampler, PerLayerUpdates])
def test_switch_without_max_steps(tmp_path: Path, callback: type) -> None:
    module = MLPModule(optimizer_config(switch_at=0.5, switch_to="random"))
    with pytest.raises(
        MisconfigurationException,
        match=rf"{callback.__name__}: the refresh schedule switches selector "
        r"at switch_at=0.5, a fraction of the run's max_steps, and trainer.max_steps is not set",
    ):
        fit(tmp_path, [callback()], module, max_steps=-1, max_epochs=1)


def test_the_resampler_takes_no_schedule_arguments() -> None:
    # The schedule is the optimizer's (optimizer config ``refresh`` section), not the callback's.
    removed = ({"update_gap": 3}, {"stagger": 2}, {"selector": "random"}, {"switch_at": 0.5, "switch_to": "random"})
    for kwargs in removed:
        with pytest.raises(TypeError):
            SubspaceResampler(**kwargs)


def fit_with_refresh(root: Path, **refresh: Any) -> None:
    fit(root, [SubspaceResampler()], MLPModule(optimizer_config(**refresh)))


@pytest.mark.parametrize("value", [0, -3])
def test_update_gap_below_one(tmp_path: Path, value: int) -> None:
    with pytest.raises(
        ValueError,
        match=rf"optimizer.refresh.update_gap: invalid value {value}; accepted: an "
        r"integer >= 1",
    ):
        fit_with_refresh(tmp_path, update_gap=value)


@pytest.mark.parametrize("value", [1.5, True, "3"])
def test_update_gap_not_an_integer(tmp_path: Path, value: Any) -> None:
    with pytest.raises(ValueError, match=r"optimizer.refresh.update_gap: expected int, got"):
        fit_with_refresh(tmp_path, update_gap=value)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (0, r"invalid value 0; accepted: an integer >= 1"),
        (-1, r"invalid value -1; accepted: an integer >= 1"),
        (2.0, r"expected int, got 2.0"),
    ],
)
def test_stagger_below_one(tmp_path: Path, value: Any, match: str) -> None:
    with pytest.raises(ValueError, match=rf"optimizer.refresh.stagger: {match}"):
        fit_with_refresh(tmp_path, stagger=value)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_switch_fraction_outside_unit_interval(tmp_path: Path, value: Any) -> None:
    with pytest.raises(
        ValueError,
        match=r"optimizer.refresh.switch_at: invalid value .*accepted: a fraction of .* "
        r"in \[0, 1\]",
    ):
        fit_with_refresh(tmp_path, switch_at=value, switch_to="random")


def test_switch_at_and_switch_to_go_together(tmp_path: Path) -> None:
    together = "optimizer.refresh.switch_at and optimizer.refresh.switch_to go together"
    with pytest.raises(ValueError, match=together):
        fit_with_refresh(tmp_path, switch_at=0.5)
    with pytest.raises(ValueError, match=together):
        fit_with_refresh(tmp_path, switch_to="random")


@pytest.mark.parametrize(("key", "where"), [("selector", "lowrank"), ("switch_to", "refresh")])
def test_unknown_selector_names(tmp_path: Path, key: str, where: str) -> None:
    kwargs = {"switch_at": 0.5, "switch_to": "random", key: "dominent"}
    accepted = " \\| ".join(sorted(SELECTORS))
    with pytest.raises(ValueError, match=rf"optimizer.{where}.{key}: invalid value 'dominent'; accepted: {accepted}"):
        fit_with_refresh(tmp_path, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_interval": 0}, "image_interval: invalid value 0"),
        ({"frozen_threshold": 0.0}, r"frozen_threshold: invalid value 0.0; accepted: a number in \(0, 1\]"),
        ({"frozen_threshold": 1.5}, "frozen_threshold: invalid value 1.5"),
        ({"frozen_patience": 0}, "frozen_patience: invalid value 0; accepted: an integer >= 1"),
    ],
)
def test_monitor_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SubspaceOverlapMonitor(**kwargs)
