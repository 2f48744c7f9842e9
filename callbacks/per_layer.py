"""``PerLayerUpdates``: per-layer weight updates (:mod:`lowrank.per_layer`) in a Lightning run.

Each weight is stepped inside backward as soon as its gradient is accumulated, then its gradient is freed, so the
full-size gradients of all layers never coexist. Lightning's automatic optimization works unchanged: it calls
``optimizer.step(closure)``, the closure's backward does the updates, and ``step`` only advances the counters.

Bases refresh inside backward on the optimizer's own :class:`lowrank.RefreshSchedule` (stagger and selector switch
included; this callback fills the schedule's ``max_steps`` from ``trainer.max_steps`` when a switch needs it), and the
optimizer's refresh listeners (``SubspaceOverlapMonitor``) hear them after each step. A ``SubspaceResampler``, if
attached, has nothing to run.

Checks in ``on_fit_start`` (every problem is collected, then one error names them all): exactly one
``LowRankOptimizer``; ``accumulate_grad_batches == 1`` (each backward updates the weights); no ``gradient_clip_val``
(global-norm clipping needs all gradients at once: use ``clip_norm``, per parameter, instead); a single-device
strategy (DDP/FSDP would reduce the gradients after the hooks stepped on them); no 16-bit AMP scaler (the gradients
would still be scaled in the hooks; use bf16).

Usage::

    trainer = Trainer(callbacks=[PerLayerUpdates(clip_norm=1.0), SubspaceOverlapMonitor()], ...)
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lowrank import LowRankOptimizer, RefreshSchedule
from lowrank.per_layer import PerLayerUpdater, per_layer_problems
from lowrank_recipes.callbacks.lowrank_optimizer import fill_max_steps


class PerLayerUpdates(Callback):
    """Steps every weight of the run's ``LowRankOptimizer`` inside backward (module docstring).

    Args:
        clip_norm: clip each parameter's gradient to this L2 norm before its update; None: no clipping.
    """

    def __init__(self, clip_norm: float | None = None) -> None:
        self.clip_norm = clip_norm
        self._updater: PerLayerUpdater | None = None
        self._schedule_before: RefreshSchedule | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        problems = trainer_problems(trainer)
        lowrank = [opt for opt in trainer.optimizers if isinstance(opt, LowRankOptimizer)]
        if len(trainer.optimizers) == 1 and lowrank:
            problems += per_layer_problems(lowrank[0], self.clip_norm)
        else:
            found = ", ".join(type(opt).__name__ for opt in trainer.optimizers) or "none"
            problems.append(f"needs exactly one lowrank.LowRankOptimizer, found: {found}")
        if problems:
            raise MisconfigurationException("PerLayerUpdates: " + "; ".join(problems))
        self._schedule_before = fill_max_steps(trainer, lowrank[0], "PerLayerUpdates")
        self._updater = PerLayerUpdater(lowrank[0], self.clip_norm)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._updater is not None:
            if self._schedule_before is not None:
                self._updater.optimizer.schedule = self._schedule_before
            self._updater.remove()
            self._updater = None
        self._schedule_before = None


def trainer_problems(trainer: pl.Trainer) -> list[str]:
    """Every Trainer setting that per-layer updates cannot honour (empty: none)."""
    problems = []
    if trainer.accumulate_grad_batches > 1:
        problems.append(
            f"accumulate_grad_batches={trainer.accumulate_grad_batches}: each backward updates the weights, so "
            "gradients cannot be accumulated; use accumulate_grad_batches=1 (a larger batch) or drop PerLayerUpdates"
        )
    if trainer.gradient_clip_val:
        problems.append(
            f"gradient_clip_val={trainer.gradient_clip_val}: clipping across parameters needs every gradient at once; "
            "drop gradient_clip_val and use PerLayerUpdates(clip_norm=...) (clips each parameter separately)"
        )
    strategy = trainer.strategy
    if trainer.world_size > 1 or not isinstance(strategy, SingleDeviceStrategy):
        problems.append(
            f"strategy {type(strategy).__name__} with world_size={trainer.world_size}: per-layer updates run on a "
            "single device (DDP/FSDP reduce gradients after the hooks would have stepped); use devices=1"
        )
    if getattr(strategy.precision_plugin, "scaler", None) is not None:
        problems.append(
            "a 16-bit AMP gradient scaler: the hooks would step on scaled gradients; use precision='bf16-mixed' or "
            "'32-true'"
        )
    return problems
