"""``GracefulStop``: SIGTERM or SIGINT stop a run at the next optimizer-step boundary, after saving ``last.ckpt``.

A cluster scheduler's SIGTERM (pre-emption, time limit) or a Ctrl+C would otherwise lose everything since the last
periodic checkpoint, and Lightning's own SIGTERM handling ends the run after the current *micro-batch* with exit
status 0. This callback builds on that handling rather than competing with it:

* SIGTERM: while training runs, the callback's own handler (installed in ``on_train_start`` in place of Lightning's,
  put back when training ends) records the request, forwards the signal to the ranks Lightning's launcher started (as
  Lightning's handler does) and runs any other handler Lightning had composed with its own (SLURM's, a user's). It
  does not run Lightning's notifier: that one broadcasts a tensor from inside the signal handler, at whatever point the
  main thread of each rank happens to be, so on two ranks the broadcast can pair with a different collective (a DDP
  gradient all-reduce) and both ranks hang. A SIGTERM that reached Lightning's connector before training started set
  its ``received_sigterm`` flag, on which Lightning's loops would end the run after the first micro-batch with nothing
  saved; ``on_train_start`` takes it over as the callback's own request and clears the flag.
* SIGINT: while training runs, the callback's handler (installed in ``on_train_start``, after Lightning registered
  its own handlers, removed when training ends) records the first Ctrl+C and prints what happens next; a second one
  raises ``KeyboardInterrupt`` at once, which Lightning handles (no checkpoint is saved) and which ends as exit 130.
* At an optimizer-step boundary (the ``on_train_batch_end`` after the step) the ranks agree with one all-reduce (max
  of the requests; several ranks only), every rank saves the step's checkpoint through the ``ModelCheckpoint``
  (``save_now`` of ``AtomicModelCheckpoint``, so ``last.ckpt`` points at it) and raises :class:`RunStopped` with exit
  status 128 + signal: 143 for SIGTERM, 130 for SIGINT. The recipe returns that status; resume with ``resume=auto``.

Finishing the current optimizer step can take long with a large gradient accumulation (it runs every remaining
micro-batch); a scheduler's grace period between SIGTERM and SIGKILL (SLURM's ``KillWait``, Kubernetes'
``terminationGracePeriodSeconds``) must cover one optimizer step plus one checkpoint save.

A SIGTERM before Lightning registers its handlers (while the checkpoint is restored, say) ends the process at once
(the default action: status 143, nothing new saved); one between that and the start of training is taken over as
said above: the run stops after its first optimizer step, saving it.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose, _SignalConnector
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class RunStopped(RuntimeError):
    """The run stopped on a signal; ``exit_code`` is 128 + the signal number (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class GracefulStop(Callback):
    """Saves ``last.ckpt`` and stops at the next optimizer-step boundary after SIGTERM or SIGINT (module docstring).

    After the run, ``stopped_by`` is the signal that stopped it (also set when a second SIGINT interrupted it at
    once, or when Lightning ended it on SIGTERM itself), else None.
    """

    def __init__(self) -> None:
        self.requested: int = 0  # the signal number asked for on this rank, 0: none (SIGTERM outranks SIGINT)
        self.stopped_by: int | None = None
        self._stepped = False  # an optimizer step ran since the last micro-batch ended
        self._sigint_seen = False  # a first Ctrl+C came: the next one stops at once
        self._previous_sigint: Any = None
        self._previous_sigterm: Any = None
        self._launcher: Any = None  # the trainer's launcher: forwards SIGTERM to the ranks it started
        self._installed = False

    # ------------------------------------------------------------------------------------------------ SIGINT
    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._sigint_seen:  # the second Ctrl+C: no waiting, no checkpoint
            self._uninstall()
            raise KeyboardInterrupt
        self._sigint_seen = True
        self.requested = max(self.requested, signal.SIGINT)
        print(
            "\nSIGINT: saving last.ckpt at the end of this optimizer step, then stopping (exit 130); press Ctrl+C "
            "again to stop at once without saving",
            file=sys.stderr,
            flush=True,
        )

    # ----------------------------------------------------------------------------------------------- SIGTERM
    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """Records the request; no collective here (module docstring): the ranks agree at the step boundary."""
        first = self.requested != signal.SIGTERM
        self.requested = signal.SIGTERM
        if first:
            kill = getattr(self._launcher, "kill", None)
            if callable(kill):
                kill(signum)  # the ranks this process started, as Lightning's handler does
            print(
                "\nSIGTERM: saving last.ckpt at the end of this optimizer step, then stopping (exit 143)",
                file=sys.stderr,
                flush=True,
            )
        for handler in _other_sigterm_handlers(self._previous_sigterm):
            handler(signum, frame)

    def _install(self, trainer: pl.Trainer) -> None:
        if threading.current_thread() is threading.main_thread() and not self._installed:
            self._launcher = trainer.strategy.launcher
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True

    def _uninstall(self) -> None:
        if self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        self._installed = False
        self._launcher = None

    # --------------------------------------------------------------------------------------------- the hooks
    # ------------------------------------------------------------------------------------------------ SIGTERM
    def _take_early_sigterm(self, trainer: pl.Trainer) -> None:
        """A SIGTERM that reached Lightning's connector before training started set its ``received_sigterm`` flag, on
        which Lightning's loops would end the run after the first micro-batch with nothing saved: the request becomes
        this callback's and the flag is cleared. During training only this callback's handler runs, which leaves the
        flag alone."""
        connector = trainer._signal_connector
        if connector.received_sigterm:
            self.requested = signal.SIGTERM
            connector.received_sigterm = False

    # --------------------------------------------------------------------------------------------- the hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.requested, self.stopped_by, self._stepped, self._sigint_seen = 0, None, False, False
        self._take_early_sigterm(trainer)
        self._install(trainer)

    def _release(self) -> None:
        self._uninstall()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._stepped = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        at_boundary, self._stepped = self._stepped, False  # this micro-batch ended an optimizer step
        if not at_boundary:
            return
        agreed = self._agree(trainer, self.requested)
        if not agreed:
            return
        path = save_checkpoint_now(trainer)
        self.stopped_by = agreed
        self._release()
        where = f"saved {path}" if path else "no ModelCheckpoint: nothing saved"
        raise RunStopped(
            agreed,
            f"stopped by {NAMES.get(agreed, agreed)} after optimizer step {trainer.global_step} ({where}); continue "
            "with resume=auto",
        )

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()
        if isinstance(exception, KeyboardInterrupt):
            self.stopped_by = signal.SIGINT
        elif isinstance(exception, SystemExit) and trainer.received_sigterm:  # Lightning's own exit, before training
            self.stopped_by = signal.SIGTERM

    @staticmethod
    def _agree(trainer: pl.Trainer, requested: int) -> int:
        """The signal any rank asked for (max over ranks; one all-reduce when there are several), 0 if none."""
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return requested
        flag = torch.tensor([requested], dtype=torch.int32, device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


def _other_sigterm_handlers(previous: Any) -> list[Any]:
    """The Python callables of the SIGTERM handler that training replaced: Lightning's composition without its notifier
    (which broadcasts), or a plain handler as itself; none for the default and ignore dispositions (ints)."""
    handlers = previous.signal_handlers if isinstance(previous, _HandlersCompose) else [previous]
    return [
        handler
        for handler in handlers
        if callable(handler) and getattr(handler, "__func__", None) is not _SignalConnector._sigterm_notifier_fn
    ]


def save_checkpoint_now(trainer: pl.Trainer) -> str | None:
    """Saves the current step through the trainer's ``ModelCheckpoint`` (every rank calls this): its ``save_now``
    when it has one (the step's checkpoint, ``last.ckpt`` pointing at it), else ``last.ckpt`` in its folder."""
    checkpoint = trainer.checkpoint_callback
    if not isinstance(checkpoint, ModelCheckpoint) or checkpoint.dirpath is None:
        rank_zero_warn("GracefulStop: the trainer has no ModelCheckpoint with a folder; nothing is saved")
        return None
    save_now = getattr(checkpoint, "save_now", None)
    if callable(save_now):
        return str(save_now(trainer))
    path = str(Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}")
    trainer.save_checkpoint(path)
    return path
