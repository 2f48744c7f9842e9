"""``FiniteLossGuard``: stops a run at the first non-finite loss, before the optimizer step that would spread it, and
never lets a checkpoint be written from non-finite weights.

Every micro-batch's loss is kept (on its device, no synchronisation) in ``on_before_backward`` and all are checked
with one device-to-host read per step; in ``on_before_optimizer_step`` (once per optimizer step,
after the last accumulated backward, before the step and before any other callback's work on it when the guard is
listed first) the ranks agree on one flag with a single all-reduce (``strategy.reduce_boolean_decision``), and a
non-finite loss on any rank raises :class:`NonFiniteError` on every rank. The weights, the optimizer state and the
checkpoints on disk stay those of the last good step, and the recipe exits non-zero with the error's message.

A finite loss can still end in non-finite weights (an update that overflows, e.g. a learning rate of 1e6): the next
step's loss catches it, but a checkpoint may be due in between. ``on_save_checkpoint`` (called on every rank before
anything is written) checks the parameters, the ranks agree, and non-finite weights raise instead of overwriting the
last good checkpoint. The check costs one pass over the weights per checkpoint, nothing per step.

Only the loss is checked: under 16-bit AMP a step whose gradients overflow is skipped by the grad scaler, which is its
normal working and not a failure.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class NonFiniteError(RuntimeError):
    """A loss, or the weights about to be saved, were NaN or infinite; the message names the optimizer step and the
    learning rates."""


class FiniteLossGuard(Callback):
    """Raises :class:`NonFiniteError` before an optimizer step whose loss, on any rank, was not finite."""

    def __init__(self) -> None:
        self._losses: list[
            torch.Tensor
        ] = []  # this step's micro-batch losses, on their device (no sync per micro-batch)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach().reshape(()))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        losses, self._losses = self._losses, []
        bad = _first_non_finite(losses)  # one device-to-host read per optimizer step
        if not trainer.strategy.reduce_boolean_decision(bad is not None, all=False):  # any rank
            return
        where = f"micro-batch {bad[0]} of it gave {bad[1]} on rank {trainer.global_rank}" if bad else "on another rank"
        raise NonFiniteError(
            f"non-finite loss at optimizer step {trainer.global_step} ({where}) with learning rate "
            f"{_learning_rates(optimizer)}: the run stopped before this step's update; the weights and the last "
            "checkpoint are those of the previous step. Lower optimizer.lr, set trainer.gradient_clip_val, or use "
            "precision 32-true or bf16-mixed"
        )

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        local = [getattr(p, "_local_tensor", p).detach() for p in pl_module.parameters()]  # FSDP2: this rank's shard
        finite = bool(torch.stack([torch.isfinite(t).all() for t in local if t.numel()]).all()) if local else True
        if not trainer.strategy.reduce_boolean_decision(not finite, all=False):
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        raise NonFiniteError(
            f"non-finite weights after optimizer step {trainer.global_step - 1} with learning rate "
            f"{_learning_rates(optimizer)}: the checkpoint of step {trainer.global_step} is not written and the last "
            "good checkpoint is kept. Lower optimizer.lr or set trainer.gradient_clip_val"
        )


def _first_non_finite(losses: list[torch.Tensor]) -> tuple[int, float] | None:
    """(micro-batch index, value) of the first non-finite loss of a step, or None; reads the device once."""
    if not losses:
        return None
    values = torch.stack(losses).float().cpu()
    bad = (~torch.isfinite(values)).nonzero()
    return None if bad.numel() == 0 else (int(bad[0, 0]), float(values[bad[0, 0]]))


def _learning_rates(optimizer: Any) -> str:
    groups = getattr(optimizer, "param_groups", [])
    return ", ".join(f"{group.get('name', f'group{i}')}={group['lr']:g}" for i, group in enumerate(groups))
