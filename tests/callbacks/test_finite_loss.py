"""FiniteLossGuard: a non-finite loss in any micro-batch stops the run before that optimizer step's update."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lowrank_recipes.callbacks import FiniteLossGuard, NonFiniteError, SubspaceResampler
from tests.callbacks.helpers import WARNING_FILTERS, FixedGradModule, make_trainer, optimizer_config, scalar_loader

pytestmark = WARNING_FILTERS


def _run(root: Path, max_steps: int, guard: bool = True):
    """A FixedGradModule and a Trainer with accumulation 2 (with the guard or without), not yet fitted."""
    torch.manual_seed(0)
    module = FixedGradModule(optimizer_config(update_gap=2, selector="dominant"))
    callbacks = [FiniteLossGuard(), SubspaceResampler()] if guard else [SubspaceResampler()]
    trainer = make_trainer(root, max_steps, callbacks, accumulate_grad_batches=2)
    return module, trainer


def _fit(root: Path, values: list[float], max_steps: int, guard: bool = True) -> FixedGradModule:
    module, trainer = _run(root, max_steps, guard)
    trainer.fit(module, scalar_loader(values))
    return module


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_micro_batch_stops_before_its_step(tmp_path: Path, bad: float) -> None:
    values = [1.0, 0.5, -1.0, 2.0, 1.5, bad, 1.0, 1.0]  # micro-batch 5 = the second of optimizer step 2
    # The weights stay those after steps 0 and 1: the same as a run that stopped there by itself.
    reference = _fit(tmp_path / "ref", values[:4], max_steps=2)
    module, trainer = _run(tmp_path / "bad", max_steps=4)
    with pytest.raises(NonFiniteError, match=r"optimizer step 2 \(micro-batch 1 of it gave (nan|inf) on rank 0\)"):
        trainer.fit(module, scalar_loader(values))
    assert trainer.global_step == 2
    for (name, got), want in zip(module.named_parameters(), reference.parameters()):
        assert torch.equal(got, want), name
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_finite_losses_pass_untouched(tmp_path: Path) -> None:
    values = [1.0, 0.5, -1.0, 2.0]
    guarded = _fit(tmp_path / "guarded", values, max_steps=2)
    plain = _fit(tmp_path / "plain", values, max_steps=2, guard=False)
    for got, want in zip(guarded.parameters(), plain.parameters()):
        assert torch.equal(got, want)
