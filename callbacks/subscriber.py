"""``RefreshSubscriber``: base of callbacks that hear every refresh of the run's :class:`lowrank.LowRankOptimizer`.

It registers :meth:`RefreshSubscriber.on_refresh` as a refresh listener of the optimizer in ``on_fit_start`` and
removes it at ``teardown``; meanwhile ``self.lowrank_optimizer`` is that optimizer. The optimizer calls its listeners
after every optimizer step that refreshed a basis, on every rank, whoever ran the refresh: the ``SubspaceResampler``
callback, the optimizer's own ``step()``, or per-layer updates inside backward (their records carry the overlap but not
the old basis).
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lowrank import LowRankOptimizer, RefreshRecord
from lowrank_recipes.callbacks.lowrank_optimizer import find_lowrank_optimizer


class RefreshSubscriber(Callback):
    """Subscribes :meth:`on_refresh` to the trainer's ``LowRankOptimizer`` for the duration of ``fit``."""

    def __init__(self) -> None:
        self._handle: RemovableHandle | None = None
        self.lowrank_optimizer: LowRankOptimizer | None = None  # the subscribed one, from on_fit_start to teardown

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = find_lowrank_optimizer(trainer, type(self).__name__)

        def listener(_: LowRankOptimizer, records: list[RefreshRecord]) -> None:
            self.on_refresh(trainer, pl_module, records)

        self._handle = optimizer.register_refresh_listener(listener)
        self.lowrank_optimizer = optimizer

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.lowrank_optimizer = None

    def on_refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule, records: list[RefreshRecord]) -> None:
        """The records of one optimizer step's refreshes (not empty), on every rank; ``records[0].step`` is the
        refresh step."""
        raise NotImplementedError
