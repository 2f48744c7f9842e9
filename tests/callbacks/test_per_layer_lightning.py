"""PerLayerUpdates in a Lightning run: same weights as the ordinary run, clear errors for what it cannot honour."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from callbacks.per_layer import PerLayerUpdates
from callbacks.resampler import SubspaceResampler
from tests.callbacks.helpers import WARNING_FILTERS, MLPModule, make_trainer, optimizer_config, regression_loader

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
def test_resampler_is_refused(tmp_path: Path, order: str) -> None:
    callbacks = [PerLayerUpdates(), SubspaceResampler()]
    message = trainer_error(tmp_path, callbacks[::-1] if order == "resampler_first" else callbacks)
    assert "SubspaceResampler attached" in message or "SubspaceResampler cannot run with per-layer updates" in message
    assert "drop" in message


def test_ddp_is_refused(tmp_path: Path) -> None:
    message = trainer_error(tmp_path, [PerLayerUpdates()], strategy="ddp")
    assert "strategy DDPStrategy with world_size=1: per-layer updates run on a single device" in message


def test_all_problems_in_one_error(tmp_path: Path) -> None:
    message = trainer_error(tmp_path, [PerLayerUpdates(clip_norm=-1)], accumulate_grad_batches=2,
                            gradient_clip_val=1.0)
    assert "accumulate_grad_batches=2" in message and "gradient_clip_val=1.0" in message
    assert "clip_norm: invalid value -1" in message
