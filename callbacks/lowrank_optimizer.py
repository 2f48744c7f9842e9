"""How the callbacks find the run's :class:`lowrank.LowRankOptimizer` and give its schedule what only the trainer
knows (``trainer.max_steps``, the horizon of a selector switch)."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lowrank import LowRankOptimizer, RefreshSchedule


def find_lowrank_optimizer(trainer: pl.Trainer, who: str) -> LowRankOptimizer:
    """The trainer's only optimizer, which must be a ``LowRankOptimizer`` with a low-rank group; ``who`` names the
    callback in the error."""
    optimizers = trainer.optimizers
    lowrank = [opt for opt in optimizers if isinstance(opt, LowRankOptimizer)]
    if len(optimizers) != 1 or not lowrank:
        found = ", ".join(type(opt).__name__ for opt in optimizers) or "none"
        raise MisconfigurationException(
            f"{who} needs exactly one lowrank.LowRankOptimizer, found: {found}. Return lowrank.build_optimizer(model, "
            "{'name': 'lowrank', ...}) from configure_optimizers, or remove the callback"
        )
    if not any(group["rank"] is not None for group in lowrank[0].param_groups):
        raise MisconfigurationException(
            f"{who}: the LowRankOptimizer has no low-rank group (no group sets 'rank'); check optimizer.lowrank.targets"
        )
    return lowrank[0]


def fill_max_steps(trainer: pl.Trainer, optimizer: LowRankOptimizer, who: str) -> RefreshSchedule | None:
    """Fills the schedule's ``max_steps`` from ``trainer.max_steps`` when a selector switch needs it and it is unset;
    returns the schedule as it was when it filled it (for teardown to restore), None when it changed nothing."""
    before = optimizer.schedule
    if before.switch_at is None or before.max_steps is not None:
        return None
    if trainer.max_steps is None or trainer.max_steps < 1:
        raise MisconfigurationException(
            f"{who}: the refresh schedule switches selector at switch_at={before.switch_at}, a fraction of the run's "
            "max_steps, and trainer.max_steps is not set: pass Trainer(max_steps=...), set the schedule's max_steps, "
            "or drop switch_at/switch_to"
        )
    optimizer.schedule = before.with_max_steps(trainer.max_steps)
    return before
