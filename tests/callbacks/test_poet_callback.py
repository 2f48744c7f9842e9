"""``POETMerges`` on a foreign LightningModule: merges after the scheduled optimizer steps (accumulation counted in
optimizer steps), the same weights as a plain loop that merges by hand, its tags in a logger, and its refusals."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lowrank import build_optimizer
from lowrank.poet import PoetConfig, apply_poet, merge_due, merge_poet
from lowrank_recipes.callbacks import POETMerges

from .helpers import WARNING_FILTERS, RecordingLogger, make_trainer, regression_loader

pytestmark = WARNING_FILTERS
CONFIG = {"block_size": 4, "merge_every": 3, "lr": 0.05}
OPTIMIZER = {"name": "poet", "lr": 0.01, "poet": CONFIG, "lowrank": {"targets": ["fc1", "fc2"]}}


class PoetMLP(pl.LightningModule):
    """A foreign model whose two linears the user turned into POET layers."""

    def __init__(self, transform: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(12, 32), nn.Linear(32, 12)
        if transform:
            apply_poet(self, PoetConfig(**CONFIG), ["fc1", "fc2"], seed=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self, OPTIMIZER)


def _fit(tmp_path: Any, module: pl.LightningModule, callbacks: list, logger: Any = False) -> pl.Trainer:
    trainer = make_trainer(
        tmp_path, max_steps=8, callbacks=callbacks, logger=logger, accumulate_grad_batches=2, log_every_n_steps=1
    )
    trainer.fit(module, regression_loader(samples=64, batch_size=8))
    return trainer


def test_merges_follow_the_schedule_and_equal_a_plain_loop(tmp_path) -> None:
    logger = RecordingLogger()
    module = PoetMLP()
    reference = copy.deepcopy(module)
    callback = POETMerges(CONFIG, sample=2)
    _fit(tmp_path, module, [callback], logger=logger)
    assert callback.merges == 2  # after optimizer steps 3 and 6 (0-based 2 and 5), not per micro-batch
    assert logger.steps("poet/merge_seconds") == [3, 6]
    assert logger.values("poet/spectrum_drift")[-1] < 1e-5
    assert logger.steps("poet/orthogonality_error") == list(range(1, 9))  # every optimizer step (log_every_n_steps 1)
    assert 0 < max(logger.values("poet/q_norm_max")) < 1
    # the same run by hand: two micro-batches of 8 per step, merge after the due steps
    optimizer = build_optimizer(reference, OPTIMIZER)
    batches = list(regression_loader(samples=64, batch_size=8))
    config = PoetConfig(**CONFIG)
    assert len(batches) == 8  # 4 optimizer steps per epoch: the second epoch repeats the batches
    for step in range(8):
        for x, y in batches[(2 * step) % 8 : (2 * step) % 8 + 2]:
            (nn.functional.mse_loss(reference(x), y) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
        if merge_due(step, config):
            merge_poet(reference, optimizer, step + 1)
    for (name, mine), (_, theirs) in zip(module.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)


def test_a_module_without_poet_layers_and_a_bad_config_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="holds no POETLinear layer"):
        _fit(tmp_path, PoetMLP(transform=False), [POETMerges(CONFIG)])
    with pytest.raises(ValueError, match=r"POETMerges: poet.merge_every: invalid value 0; accepted: an integer >= 1"):
        POETMerges({**CONFIG, "merge_every": 0})
