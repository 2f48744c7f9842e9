"""``ProjectGradients`` on a foreign LightningModule (one process): the same weights as the ordinary path with a
``SubspaceResampler``, accumulation and gradient clipping off; the companions gone after fit; the refusals."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lowrank_recipes.callbacks import PerLayerUpdates, ProjectGradients, SubspaceResampler

from .helpers import WARNING_FILTERS, MLPModule, make_trainer, optimizer_config, regression_loader

pytestmark = WARNING_FILTERS


def _fit(tmp_path, callbacks, config) -> MLPModule:
    module = MLPModule(config)
    trainer = make_trainer(tmp_path, max_steps=9, callbacks=callbacks, accumulate_grad_batches=2)
    trainer.fit(module, regression_loader(samples=64, batch_size=8))
    return module


def test_projected_gradients_in_a_foreign_module_equal_the_ordinary_path(tmp_path):
    config = optimizer_config(rank=4, update_gap=3)
    ordinary = _fit(tmp_path / "a", [SubspaceResampler()], config)
    projected = _fit(tmp_path / "b", [ProjectGradients(config), SubspaceResampler()], config)
    for (name, param), (_, expected) in zip(projected.named_parameters(), ordinary.named_parameters(), strict=True):
        torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert [n for n, _ in projected.named_parameters()] == [n for n, _ in ordinary.named_parameters()]  # removed
    assert all(p.requires_grad for p in projected.parameters())


def test_projected_gradients_refuse_per_layer_updates_and_a_mismatched_config(tmp_path):
    config = optimizer_config(rank=4)
    with pytest.raises(MisconfigurationException, match="PerLayerUpdates steps inside backward"):
        _fit(tmp_path / "a", [ProjectGradients(config), PerLayerUpdates()], config)
    with pytest.raises(ValueError, match="register the companions from the same optimizer config"):
        _fit(tmp_path / "b", [ProjectGradients(optimizer_config(rank=2)), SubspaceResampler()], config)
