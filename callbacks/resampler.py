"""``SubspaceResampler``: the schedule on which a :class:`lowrank.LowRankOptimizer` refreshes its bases.

The schedule is a pure function of ``step = trainer.global_step``, the 0-based index of the optimizer step about to
run (one per ``accumulate_grad_batches`` micro-batches). With ``T_i`` the update gap of low-rank parameter ``i``
(``update_gap`` if given, else its optimizer group's ``update_gap``, i.e. the config's ``optimizer.lowrank.update_gap``)
and ``offset_i`` its stagger offset, parameter ``i`` is refreshed at step ``s`` when

    (s - offset_i) % T_i == 0            # without staggering offset_i = 0: steps 0, T, 2T, ...

Staggering (``stagger=k``) spreads the SVD cost over the period instead of a spike every T steps: the low-rank
parameters, in the optimizer's order (group by group, ``param_names`` order; for a LLaMA that is layer by layer),
are cut into k contiguous slices of nearly equal count, ``slice_i = floor(i * k / n)`` for n parameters, and slice j
gets ``offset = floor(j * T / k)``. Every parameter still refreshes exactly once per T steps; on a given step only
the slices whose offset matches refresh (k > T makes several slices share an offset). Independently of the rule,
a parameter without a basis yet (the first step of training) is refreshed on the first step it has a gradient, so
slice j's first interval is ``offset_j`` steps rather than T.

Selector: the groups' own ``selector`` (or ``selector`` here, if given) until ``switch_step = ceil(switch_at *
trainer.max_steps)``, ``switch_to`` from then on (GoLore: ``switch_to="random"`` after a dominant phase). The switch
takes effect at the first scheduled refresh at or after ``switch_step``; ``switch_at=1`` never switches.

Where it runs: ``on_before_optimizer_step``, i.e. once per optimizer step, inside the optimizer's closure (with a
16-bit AMP scaler: just before the scaler's step) after the backward of the last accumulated micro-batch and after
unscaling, before gradient clipping: the bases come from the real, accumulated, unclipped gradient, and the
optimizer step that follows already projects on them. The
refresh step is passed to ``resample(step=...)``, so the draws follow the project's randomness rule and a run
resumed from a checkpoint repeats the uninterrupted run's draws (the bases themselves are optimizer state, the
schedule is a function of the restored ``global_step``).

Consumers of the refreshes (``SubspaceOverlapMonitor``) either read :attr:`SubspaceResampler.last_records` or, better,
:meth:`SubspaceResampler.subscribe` to get every refresh's records as it happens, on every rank.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lowrank import SELECTORS, LowRankOptimizer, RefreshRecord

RefreshListener = Callable[["pl.Trainer", "pl.LightningModule", list[RefreshRecord]], None]
"""Called after every refresh with the trainer, the module and the refresh's records (possibly empty)."""

REFRESH_SECONDS_TAG = "lowrank/refresh_seconds"


@dataclasses.dataclass(frozen=True)
class ScheduleEntry:
    """Where one low-rank parameter sits in the schedule: refreshed when ``(step - offset) % gap == 0``."""

    name: str
    param: torch.Tensor
    gap: int
    offset: int


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_selector(key: str, name: str | None) -> None:
    if name is not None and name not in SELECTORS:
        raise ValueError(f"{key}: unknown selector {name!r}; accepted: {', '.join(sorted(SELECTORS))}")


class SubspaceResampler(Callback):
    """Refreshes the bases of the low-rank optimizer on a schedule (module docstring) and times each refresh.

    While it is attached the optimizer does not refresh on its own (``auto_refresh`` is set False in
    ``on_fit_start`` and restored at teardown). Each refresh logs ``lowrank/refresh_seconds`` (wall time of the
    ``resample`` call, rank zero, every logger of the trainer, ``step=trainer.global_step``).

    Args:
        update_gap: T, optimizer steps between two refreshes of a parameter; None (default) uses each optimizer
            group's own ``update_gap``.
        stagger: k, the number of slices the parameters are spread over within a period (1: all at once).
        selector: subspace rule before the switch; None (default) uses the groups' ``selector``.
        switch_at: fraction of ``trainer.max_steps`` in [0, 1] at which ``switch_to`` replaces the rule; None: never.
        switch_to: rule used from ``switch_at`` on (a name from ``lowrank.SELECTORS``); needs ``switch_at``.
        split_across_ranks: under DDP, each rank computes a round-robin share of a refresh's bases and broadcasts
            them (``LowRankOptimizer.resample(split_across_ranks=True)``, :mod:`lowrank.split_refresh`): about
            1/world of the SVDs per rank, one broadcast per basis. Off (default): every rank computes every basis, no
            communication. Not for FSDP2 (DTensor) parameters.

    Raises:
        ValueError: for an invalid argument (the message names it and the accepted values).
        MisconfigurationException: in ``on_fit_start``: manual optimization, an optimizer that is not a
            ``LowRankOptimizer`` (or one without low-rank groups), a second resampler, ``switch_at`` without
            ``trainer.max_steps``. (Two resamplers of the same class are already refused by Lightning when the
            ``Trainer`` is built: they share a checkpoint key.)

    Note:
        :attr:`last_records` keeps the records of the latest refresh with their overlaps but without the old bases
        (that would hold one extra basis per parameter between refreshes); subscribers get the full records.
    """

    def __init__(
        self,
        update_gap: int | None = None,
        stagger: int = 1,
        selector: str | None = None,
        switch_at: float | None = None,
        switch_to: str | None = None,
        split_across_ranks: bool = False,
    ) -> None:
        if update_gap is not None and not _is_int(update_gap, 1):
            raise ValueError(f"update_gap: invalid value {update_gap!r}; accepted: an integer >= 1, or None for the "
                             "optimizer groups' own update_gap")
        if not _is_int(stagger, 1):
            raise ValueError(f"stagger: invalid value {stagger!r}; accepted: an integer >= 1 (1 = no staggering)")
        _check_selector("selector", selector)
        _check_selector("switch_to", switch_to)
        if (switch_at is None) != (switch_to is None):
            raise ValueError("switch_at and switch_to go together: give both (e.g. switch_at=0.5, switch_to='random') "
                             "or neither")
        if switch_at is not None and not (
            isinstance(switch_at, (int, float)) and not isinstance(switch_at, bool) and 0.0 <= switch_at <= 1.0
        ):
            raise ValueError(
                f"switch_at: invalid value {switch_at!r}; accepted: a fraction of trainer.max_steps in [0, 1]"
            )
        if not isinstance(split_across_ranks, bool):
            raise ValueError(f"split_across_ranks: invalid value {split_across_ranks!r}; accepted: true | false")
        self.update_gap = update_gap
        self.stagger = stagger
        self.selector = selector
        self.switch_at = None if switch_at is None else float(switch_at)
        self.switch_to = switch_to
        self.split_across_ranks = split_across_ranks
        self.switch_step: int | None = None
        self.num_refreshes = 0
        self.last_refresh_step: int | None = None
        self._last_records: list[RefreshRecord] = []
        self._listeners: list[RefreshListener] = []
        self._optimizer: LowRankOptimizer | None = None
        self._entries: list[ScheduleEntry] = []
        self._previous_auto_refresh = True
        self._switch_announced = False

    # --------------------------------------------------------------------------------------------- public API
    @property
    def last_records(self) -> list[RefreshRecord]:
        """Records returned by the latest ``resample`` call (empty before the first refresh)."""
        return list(self._last_records)

    @property
    def schedule(self) -> list[ScheduleEntry]:
        """One entry per low-rank parameter (filled in ``on_fit_start``)."""
        return list(self._entries)

    def subscribe(self, listener: RefreshListener) -> None:
        """Calls ``listener(trainer, pl_module, records)`` after every refresh, on every rank (idempotent)."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    def unsubscribe(self, listener: RefreshListener) -> None:
        """Stops calling ``listener``; unknown listeners are ignored."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def due(self, step: int) -> list[str]:
        """Names of the parameters the schedule refreshes at ``step`` (those still without a basis come on top)."""
        return [e.name for e in self._entries if (step - e.offset) % e.gap == 0]

    def selector_at(self, step: int) -> str | None:
        """Rule for a refresh at ``step``: ``switch_to`` from ``switch_step`` on, else ``selector`` (None: groups')."""
        if self.switch_step is not None and step >= self.switch_step:
            return self.switch_to
        return self.selector

    # ------------------------------------------------------------------------------------------------- hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._optimizer = self._validate(trainer, pl_module)
        self._entries = self._build_schedule(self._optimizer)
        self.switch_step = None
        self._switch_announced = False
        if self.switch_at is not None:
            if trainer.max_steps is None or trainer.max_steps < 0:
                raise MisconfigurationException(
                    f"SubspaceResampler(switch_at={self.switch_at}) is a fraction of trainer.max_steps, which is not "
                    "set: pass Trainer(max_steps=...) or drop switch_at/switch_to"
                )
            self.switch_step = math.ceil(self.switch_at * trainer.max_steps)
        self._previous_auto_refresh = self._optimizer.auto_refresh
        self._optimizer.auto_refresh = False

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        lowrank = self._optimizer
        if lowrank is None:  # on_fit_start did not run (not fitting)
            return
        step = trainer.global_step
        names = set(self.due(step))
        # A parameter without a basis (first step) gets one now, through the callback, so that it is logged.
        names.update(e.name for e in self._entries if "lowrank_basis" not in lowrank.state.get(e.param, {}))
        if not names:
            return
        selector = self.selector_at(step)
        if self.switch_step is not None and step >= self.switch_step and not self._switch_announced:
            self._switch_announced = True
            rank_zero_info(f"SubspaceResampler: refreshes use the {selector!r} selector from step {step} on")
        ordered = [e.name for e in self._entries if e.name in names]
        self._synchronize(pl_module)
        start = time.perf_counter()
        records = lowrank.resample(step=step, params=ordered, selector=selector,
                                   split_across_ranks=self.split_across_ranks)
        self._synchronize(pl_module)
        seconds = time.perf_counter() - start
        self._last_records = [dataclasses.replace(record, old_basis=None) for record in records]
        self.last_refresh_step = step
        self.num_refreshes += 1
        self._log(trainer, {REFRESH_SECONDS_TAG: seconds}, step)
        for listener in list(self._listeners):
            listener(trainer, pl_module, records)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._optimizer is not None:
            self._optimizer.auto_refresh = self._previous_auto_refresh
            self._optimizer = None

    @override
    def state_dict(self) -> dict[str, Any]:
        # The schedule is a function of global_step; this is its position (for inspection and resume checks)
        # plus the settings, so that a resume with a different schedule is reported.
        return {
            "num_refreshes": self.num_refreshes,
            "last_refresh_step": -1 if self.last_refresh_step is None else self.last_refresh_step,
            "update_gap": self.update_gap,
            "stagger": self.stagger,
            "selector": self.selector,
            "switch_at": self.switch_at,
            "switch_to": self.switch_to,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_refreshes = int(state_dict.get("num_refreshes", 0))
        last = int(state_dict.get("last_refresh_step", -1))
        self.last_refresh_step = None if last < 0 else last
        settings = ("update_gap", "stagger", "selector", "switch_at", "switch_to")
        changed = [k for k in settings if k in state_dict and state_dict[k] != getattr(self, k)]
        if changed:
            was = ", ".join(f"{k}={state_dict[k]!r} -> {getattr(self, k)!r}" for k in changed)
            rank_zero_warn(f"SubspaceResampler: the checkpoint was written with another schedule ({was}); "
                           "the new schedule applies from the restored global_step on")

    # ------------------------------------------------------------------------------------------------ helpers
    def _validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> LowRankOptimizer:
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "SubspaceResampler needs automatic optimization (it refreshes once per optimizer step from "
                "on_before_optimizer_step); with manual optimization call optimizer.resample(step=...) yourself "
                "and remove the callback"
            )
        count = sum(isinstance(cb, SubspaceResampler) for cb in trainer.callbacks)
        if count > 1:
            raise MisconfigurationException(
                f"{count} SubspaceResampler callbacks are attached; keep exactly one (each would refresh the same "
                "bases on its own schedule)"
            )
        optimizers = trainer.optimizers
        lowrank = [opt for opt in optimizers if isinstance(opt, LowRankOptimizer)]
        if len(optimizers) != 1 or not lowrank:
            found = ", ".join(type(opt).__name__ for opt in optimizers) or "none"
            raise MisconfigurationException(
                f"SubspaceResampler needs exactly one lowrank.LowRankOptimizer, found: {found}. Return the optimizer "
                "of lowrank.build_optimizer(model, {'name': 'lowrank', ...}) from configure_optimizers, or remove "
                "the callback"
            )
        if getattr(lowrank[0], "per_layer", None) is not None:
            raise MisconfigurationException(
                "SubspaceResampler cannot run with per-layer updates: the gradients are freed inside backward, before "
                "on_before_optimizer_step; drop the SubspaceResampler (the optimizer refreshes each basis itself "
                "inside backward every update_gap steps)"
            )
        if not any(group["rank"] is not None for group in lowrank[0].param_groups):
            raise MisconfigurationException(
                "SubspaceResampler: the LowRankOptimizer has no low-rank group (no group sets 'rank'); check "
                "optimizer.lowrank.targets"
            )
        return lowrank[0]

    def _build_schedule(self, optimizer: LowRankOptimizer) -> list[ScheduleEntry]:
        flat = [
            (name, param, self.update_gap or group["update_gap"])
            for group in optimizer.param_groups if group["rank"] is not None
            for name, param in zip(group["param_names"], group["params"])
        ]
        n, k = len(flat), self.stagger
        # Slice j = floor(i * k / n) (contiguous, nearly equal counts); offset_j = floor(j * T / k).
        return [ScheduleEntry(name, param, gap, ((i * k) // n) * gap // k) for i, (name, param, gap) in enumerate(flat)]

    @staticmethod
    def _synchronize(pl_module: pl.LightningModule) -> None:
        # Kernels are asynchronous on CUDA: wait so that refresh_seconds measures the refresh itself.
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    @rank_zero_only
    def _log(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


class RefreshSubscriber(Callback):
    """Base of callbacks that hear every refresh of the Trainer's :class:`SubspaceResampler` (s): subscribes
    :meth:`on_refresh` in ``on_fit_start``, unsubscribes in ``teardown``. ``self.resamplers`` holds the ones found."""

    def __init__(self) -> None:
        self.resamplers: list[SubspaceResampler] = []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.resamplers = [cb for cb in trainer.callbacks if isinstance(cb, SubspaceResampler)]
        for resampler in self.resamplers:
            resampler.subscribe(self.on_refresh)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for resampler in self.resamplers:
            resampler.unsubscribe(self.on_refresh)
        self.resamplers = []

    def on_refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule, records: list[RefreshRecord]) -> None:
        """One refresh's records, on every rank (a :data:`RefreshListener`)."""
        raise NotImplementedError
