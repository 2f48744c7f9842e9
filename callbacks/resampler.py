"""``SubspaceResampler``: runs the low-rank optimizer's scheduled refreshes at the right Lightning hook, times them and
logs the time.

*When* bases refresh is the optimizer's own :class:`lowrank.RefreshSchedule` (``optimizer.schedule``: update gap,
stagger, selector switch; in the recipe the ``optimizer.refresh`` section), a pure function of the optimizer step and
the parameter's place; without this callback the optimizer runs the same refreshes itself inside ``step()``. This
callback adds what only the trainer knows and does:

* ``on_fit_start``: fills the schedule's ``max_steps`` from ``trainer.max_steps`` when a selector switch
  (``switch_at``, a fraction of the run) needs it; warns when a resumed checkpoint was written with another schedule.
* ``on_before_optimizer_step``, i.e. once per optimizer step, inside the optimizer's closure (with a 16-bit AMP scaler:
  just before the scaler's step), after the backward of the last accumulated micro-batch and after unscaling, before
  gradient clipping: ``optimizer.resample()`` runs the refreshes due at the coming optimizer step, so the bases come
  from the real, accumulated, unclipped gradient and the optimizer step that follows projects on them (and does not
  refresh again). The draws are seeded by the optimizer's step counter (restored from a checkpoint), so a resumed run
  repeats the uninterrupted run's draws.
* logs ``lowrank/refresh_seconds`` (wall time of the refresh; rank zero, every logger, ``step=trainer.global_step``)
  at every step where a refresh was due.

Under per-layer updates (``PerLayerUpdates``) the refreshes run inside backward and the callback has nothing to run
(no ``refresh_seconds``). Listeners of the refreshes (``SubspaceOverlapMonitor``, any ``RefreshSubscriber``) register
on the optimizer and hear them whoever ran them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lowrank import LowRankOptimizer, RefreshSchedule
from lowrank_recipes.callbacks.lowrank_optimizer import fill_max_steps, find_lowrank_optimizer

REFRESH_SECONDS_TAG = "lowrank/refresh_seconds"
_COMPARED = ("update_gap", "stagger", "switch_at", "switch_to")  # schedule fields a resume should not change silently


class SubspaceResampler(Callback):
    """Runs the ``LowRankOptimizer``'s scheduled refreshes in ``on_before_optimizer_step`` and logs their wall time
    (module docstring). It takes no arguments: the schedule is the optimizer's.

    Raises:
        MisconfigurationException: in ``on_fit_start``: manual optimization, an optimizer that is not a
            ``LowRankOptimizer`` (or one without low-rank groups), a second resampler, a selector switch without
            ``trainer.max_steps``.
    """

    def __init__(self) -> None:
        self.num_refreshes = 0
        self.last_refresh_step: int | None = None
        self._optimizer: LowRankOptimizer | None = None
        self._schedule_before: RefreshSchedule | None = None
        self._saved_schedule: dict[str, Any] | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "SubspaceResampler needs automatic optimization (it refreshes once per optimizer step from "
                "on_before_optimizer_step); with manual optimization the optimizer refreshes on its schedule inside "
                "step(): remove the callback"
            )
        count = sum(isinstance(cb, SubspaceResampler) for cb in trainer.callbacks)
        if count > 1:
            raise MisconfigurationException(
                f"{count} SubspaceResampler callbacks are attached; keep exactly one (they would run the same "
                "refreshes twice)"
            )
        self._optimizer = find_lowrank_optimizer(trainer, "SubspaceResampler")
        self._schedule_before = fill_max_steps(trainer, self._optimizer, "SubspaceResampler")
        self._warn_if_schedule_changed(self._optimizer.schedule)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        lowrank = self._optimizer
        if lowrank is None or lowrank.per_layer is not None:  # not fitting, or refreshed inside backward
            return
        # The optimizer's own step counter (which the records carry and the draws are seeded by) picks what is due;
        # it equals trainer.global_step unless a step was skipped (an AMP scaler's inf step).
        if not lowrank.due():
            lowrank.resample()  # marks the step's (empty) scheduled refresh as done
            return
        step = trainer.global_step
        self._synchronize(pl_module)
        start = time.perf_counter()
        lowrank.resample()
        self._synchronize(pl_module)
        seconds = time.perf_counter() - start
        self.last_refresh_step = step
        self.num_refreshes += 1
        self._log(trainer, {REFRESH_SECONDS_TAG: seconds}, step)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._optimizer is not None and self._schedule_before is not None:
            self._optimizer.schedule = self._schedule_before
        self._optimizer = self._schedule_before = None

    @override
    def state_dict(self) -> dict[str, Any]:
        # The schedule is a function of global_step; this is its position (for inspection) and its settings, so that
        # a resume with a different schedule is reported.
        schedule = self._optimizer.schedule if self._optimizer is not None else None
        return {
            "num_refreshes": self.num_refreshes,
            "last_refresh_step": -1 if self.last_refresh_step is None else self.last_refresh_step,
            **({} if schedule is None else {k: getattr(schedule, k) for k in _COMPARED}),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_refreshes = int(state_dict.get("num_refreshes", 0))
        last = int(state_dict.get("last_refresh_step", -1))
        self.last_refresh_step = None if last < 0 else last
        self._saved_schedule = {k: state_dict[k] for k in _COMPARED if k in state_dict}

    # ------------------------------------------------------------------------------------------------ helpers
    def _warn_if_schedule_changed(self, schedule: RefreshSchedule) -> None:
        saved, self._saved_schedule = self._saved_schedule, None
        now = dataclasses.asdict(schedule)
        changed = [k for k in (saved or {}) if saved[k] != now[k]]
        if changed:
            was = ", ".join(f"{k}={saved[k]!r} -> {now[k]!r}" for k in changed)
            rank_zero_warn(
                f"SubspaceResampler: the checkpoint was written with another refresh schedule ({was}); "
                "the new schedule applies from the restored global_step on"
            )

    @staticmethod
    def _synchronize(pl_module: pl.LightningModule) -> None:
        # Kernels are asynchronous on CUDA: wait so that refresh_seconds measures the refresh itself.
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    @rank_zero_only
    def _log(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
