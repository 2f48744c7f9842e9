"""``optimizer.lowrank.projected_gradients: true`` in the recipe (one process): the same losses as the ordinary path
across refreshes, checkpoints that resume either way, and bf16 autocast. The 2-rank DDP runs are in
tests/distributed/test_ddp_recipe.py; the float64 equality and the no-(m, n)-gradient check in
tests/lowrank/test_projected.py."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lowrank_recipes.recipes.config import load_run_config
from lowrank_recipes.recipes.trainer import fit

from .test_pretrain import TINY

pytestmark = [
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
    pytest.mark.filterwarnings("ignore:When using the `ThroughputMonitor`, you need to define a `flops_per_batch`"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
    pytest.mark.filterwarnings("ignore:Precision bf16-mixed is not supported by the model summary"),
]

# 2 micro-batches a step, refreshes at steps 0 (first bases), 3 and 6
RUN = [*TINY, "trainer.global_batch_size=8", "optimizer.refresh.update_gap=3", "trainer.checkpoint_every_n_steps=4"]


class _Losses(pl.Callback):
    """Every micro-batch's loss, in order, and the companions seen during training."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: list[float] = []
        self.companions = 0
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True  # after the step's checkpoint (checkpoint_every_n_steps=4)
        self.companions = sum(name.endswith("weight_projected") for name, _ in pl_module.named_parameters())


def _fit(out: Path, *overrides: str, stop_at: int | None = None) -> _Losses:
    recorder = _Losses(stop_at)
    run, resolved = load_run_config("default", [*RUN, "trainer.max_steps=8", f"out_dir={out}", *overrides])
    fit(run, resolved, callbacks=[recorder])
    return recorder


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_projected_run_matches_the_ordinary_run_and_its_checkpoints_resume_either_way(tmp_path):
    ordinary = _fit(tmp_path / "ordinary")
    projected = _fit(tmp_path / "projected", "optimizer.lowrank.projected_gradients=true")
    assert ordinary.companions == 0 and projected.companions == 14
    assert len(ordinary.losses) == len(projected.losses) == 16  # 8 steps of 2 micro-batches
    torch.testing.assert_close(torch.tensor(projected.losses), torch.tensor(ordinary.losses))
    expected = _weights(tmp_path / "ordinary")
    assert _weights(tmp_path / "projected").keys() == expected.keys()  # no companion in the checkpoint
    for key, value in _weights(tmp_path / "projected").items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)

    # stopped after 4 steps of one kind, resumed as the other kind: the ordinary run's weights
    for first, then in (("true", "false"), ("false", "true")):
        out = tmp_path / f"switch-{first}"
        _fit(out, f"optimizer.lowrank.projected_gradients={first}", stop_at=4)
        resumed = _fit(out, f"optimizer.lowrank.projected_gradients={then}", "resume=auto")
        assert len(resumed.losses) == 8  # steps 5 to 8
        for key, value in _weights(out).items():
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=(first, key))


def test_projected_run_under_bf16_autocast_trains(tmp_path):
    recorder = _fit(
        tmp_path / "bf16",
        "trainer.precision=bf16-mixed",
        "optimizer.lowrank.projected_gradients=true",
    )
    losses = recorder.losses
    assert len(losses) == 16 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4])  # it learns
