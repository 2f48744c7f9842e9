"""GracefulStop's SIGTERM handler during training: it records the request and runs the handlers Lightning composed
with its own, but never Lightning's notifier, which broadcasts from inside the signal handler (on two ranks that
broadcast can pair with another collective and hang both). The end-to-end runs (exit status, saved step, 2 DDP
ranks) are in tests/recipes/test_signals.py."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

from lowrank_recipes.callbacks import GracefulStop, RunStopped

from .helpers import WARNING_FILTERS, MLPModule, make_trainer, optimizer_config, regression_loader

pytestmark = [*WARNING_FILTERS, pytest.mark.filterwarnings("ignore:GracefulStop. the trainer has no ModelCheckpoint")]


class _SendSigterm(pl.Callback):
    """Sends SIGTERM to this process when micro-batch ``at`` starts; notes the SIGTERM handler seen then."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.handler: Any = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.at:
            self.handler = signal.getsignal(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_training_skips_lightnings_broadcasting_notifier_and_keeps_other_handlers(tmp_path, monkeypatch):
    notified: list[int] = []
    monkeypatch.setattr(_SignalConnector, "_sigterm_notifier_fn", lambda self, signum, frame: notified.append(signum))
    user: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: user.append(signum))  # composed by Lightning
    try:
        stop, sender = GracefulStop(), _SendSigterm(at=2)
        module = MLPModule(optimizer_config(rank=4))
        trainer = make_trainer(tmp_path, max_steps=6, callbacks=[stop, sender])
        with pytest.raises(RunStopped) as raised:
            trainer.fit(module, regression_loader(samples=64, batch_size=8))
        assert raised.value.exit_code == 143
        assert sender.handler == stop._on_sigterm  # GracefulStop's own handler while training ran
        assert notified == [] and user == [signal.SIGTERM]  # Lightning's notifier skipped, the user's handler ran
        assert stop.stopped_by == signal.SIGTERM and trainer.global_step == 3  # stopped after that micro-batch's step
        restored = signal.getsignal(signal.SIGTERM)
        assert restored is not stop._on_sigterm  # nothing of the callback's left installed
    finally:
        signal.signal(signal.SIGTERM, before)


class _SigtermAtTrainStart(pl.Callback):
    """Listed before GracefulStop: its SIGTERM reaches Lightning's handler, before GracefulStop installs its own."""

    def on_train_start(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_that_reached_lightning_before_training_stops_after_the_first_step(tmp_path):
    stop = GracefulStop()
    trainer = make_trainer(tmp_path, max_steps=6, callbacks=[_SigtermAtTrainStart(), stop])
    with pytest.raises(RunStopped) as raised:
        trainer.fit(MLPModule(optimizer_config(rank=4)), regression_loader(samples=64, batch_size=8))
    assert raised.value.exit_code == 143 and trainer.global_step == 1  # one whole step, then the stop
    assert trainer._signal_connector.received_sigterm is False  # taken over: Lightning's loops never saw it
