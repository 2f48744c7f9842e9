"""``AtomicModelCheckpoint``: Lightning's ``ModelCheckpoint`` whose checkpoints are either complete or absent, and whose
``last.ckpt`` always names a complete one, whenever the process is killed.

What is guaranteed (local file systems; the checkpoint folder holds one run at a time):

* Every checkpoint is first written under a temporary name in its own folder (``.step=000010.ckpt.tmp-<pid>``, the
  pid of global rank 0), made durable (a file: ``torch.save`` straight into it, then ``fsync``; a sharded directory
  of ``torch.distributed.checkpoint``, as fsdp2 writes it: every file in it and the directory fsynced), renamed to its
  step name with ``os.replace`` and the folder fsynced. Nothing goes through ``$TMPDIR``: Lightning's default writer
  (an fsspec transaction that moves a file from ``$TMPDIR``, a non-atomic copy across file systems) is swapped for a
  direct one during these saves; any other ``CheckpointIO`` plugin writes the temporary name its own way.
* ``last.ckpt`` is a relative symbolic link to the newest step checkpoint (a file or a sharded directory; ``torch.load``
  and ``Trainer.fit(ckpt_path=...)`` follow it), created under a temporary name and moved over the old one with
  ``os.replace``: at every instant it names a complete checkpoint. Nothing is ever written through it. When no step
  checkpoint exists for the current step, it is saved first; the end of training is always saved (Lightning alone
  saves it only when the run saved nothing before).
* Temporaries a killed run left (``.<name>.tmp-<pid>``, ``.<name>.old-<pid>``) are removed by global rank 0 in
  ``setup`` of ``fit``, before training. A failed write removes its temporary at once and leaves the previous
  checkpoints and ``last.ckpt`` untouched; a failure of rank 0's single-file write, of a rename or of the link raises
  :class:`CheckpointWriteError` on every rank (the ranks learn it through one broadcast), an exception inside the
  strategy's save (``torch.distributed.checkpoint``, the ``on_save_checkpoint`` hooks) propagates as it is.
* Step checkpoints keep their plain names: ``enable_version_counter`` defaults to False, so a step written again
  (after resuming from an older checkpoint) replaces the old one atomically instead of becoming ``-v1``.

:meth:`AtomicModelCheckpoint.save_now` saves the current step on demand (a graceful stop). The callback's state is
``ModelCheckpoint``'s, under its state key: checkpoints of either resume with either.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from weakref import proxy

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

# What a write in progress is called: ``.<final name>.tmp-<pid>``, and ``.<final name>.old-<pid>`` for a checkpoint
# moved aside while another replaces it.
TEMPORARY = re.compile(r"^\..+\.(?:tmp|old)-\d+$")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written or published; the message names it and the cause. Raised on every rank."""


def temporary_name(path: str, kind: str = "tmp") -> str:
    """The temporary beside ``path`` that becomes it: ``dir/.name.<kind>-<pid>``."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{kind}-{os.getpid()}")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """fsyncs a file, or every file and directory under a directory (the directory itself last)."""
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files:
                _fsync(os.path.join(root, name))
            for name in dirs:
                _fsync(os.path.join(root, name))
    _fsync(path)


def _is_real_directory(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _remove(path: str) -> None:
    if _is_real_directory(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def _replace(source: str, target: str) -> None:
    """``os.replace`` (atomic), or where rename cannot replace (a directory over anything, anything over a directory;
    links are not directories here) the old one moved aside first, then removed."""
    if _is_real_directory(target) or (_is_real_directory(source) and os.path.lexists(target)):
        aside = temporary_name(target, "old")
        _remove(aside)
        os.replace(target, aside)
        os.replace(source, target)
        _remove(aside)
    else:
        os.replace(source, target)


def publish(temporary: str, final: str) -> None:
    """Makes the written ``temporary`` (a file or a directory) durable and renames it to ``final``, in one folder."""
    _fsync_tree(temporary)
    _replace(temporary, final)
    _fsync(os.path.dirname(final) or ".")


def link_atomically(target: str, link: str) -> None:
    """Points ``link`` at ``target`` (a relative symbolic link): created under a temporary name, moved over ``link``."""
    temporary = temporary_name(link)
    _remove(temporary)
    os.symlink(os.path.relpath(target, os.path.dirname(link) or "."), temporary)
    try:
        _replace(temporary, link)
    except BaseException:
        _remove(temporary)
        raise
    _fsync(os.path.dirname(link) or ".")


def remove_temporaries(folder: str) -> list[str]:
    """Removes what writes in progress left in ``folder`` (names matching :data:`TEMPORARY`); returns their names."""
    if not os.path.isdir(folder):
        return []
    names = sorted(name for name in os.listdir(folder) if TEMPORARY.match(name))
    for name in names:
        _remove(os.path.join(folder, name))
    return names


class _DirectTorchCheckpointIO(TorchCheckpointIO):
    """Writes with ``torch.save`` straight into the (temporary) path, then fsyncs it. An exception is kept in
    ``error``, not raised: only rank 0 writes, and the callback tells every rank after the strategy's barrier."""

    def __init__(self) -> None:
        super().__init__()
        self.error: Exception | None = None

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"storage_options is not supported by {type(self).__name__}, got {storage_options!r}")
        try:
            os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
            torch.save(checkpoint, os.fspath(path))
            _fsync(os.fspath(path))
        except Exception as err:
            self.error = err


@contextmanager
def _direct_writes(strategy: pl.strategies.Strategy) -> Iterator[_DirectTorchCheckpointIO | None]:
    """Swaps Lightning's default ``TorchCheckpointIO`` (through ``$TMPDIR``) for the direct writer for the duration."""
    previous = strategy.checkpoint_io
    if type(previous) is not TorchCheckpointIO:
        yield None
        return
    direct = _DirectTorchCheckpointIO()
    strategy.checkpoint_io = direct
    try:
        yield direct
    finally:
        strategy.checkpoint_io = previous


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with atomic step checkpoints and ``last.ckpt`` as an atomically repointed link to the
    newest; takes ``ModelCheckpoint``'s arguments (``enable_version_counter`` defaults to False here)."""

    def __init__(self, *args: Any, enable_version_counter: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)
        if self.filename == self.CHECKPOINT_NAME_LAST:
            raise ValueError(f"filename: {self.filename!r} is the name of the link; accepted: any other template")
        self._resumed: tuple[str, int] | None = None  # (real path of the checkpoint resumed from, its step)

    @property
    @override
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.dirpath is None or not isinstance(get_filesystem(self.dirpath), LocalFileSystem):
            raise ValueError(f"dirpath: {self.dirpath!r} is not a local folder; accepted: a local path (os.replace)")
        if isinstance(trainer.strategy.checkpoint_io, AsyncCheckpointIO):
            raise ValueError(
                "AsyncCheckpointIO writes after save_checkpoint returns, so a checkpoint would be renamed before it is "
                "complete; accepted: the default or a synchronous CheckpointIO"
            )
        if trainer.is_global_zero and stage == "fit":
            removed = remove_temporaries(os.fspath(self.dirpath))
            if removed:
                rank_zero_info(f"removed temporaries of an interrupted checkpoint write in {self.dirpath}: {removed}")

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        resumed = trainer.ckpt_path
        if resumed and "global_step" in checkpoint:
            self._resumed = (os.path.realpath(resumed), int(checkpoint["global_step"]))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The end of training is always checkpointed: Lightning saves ``last`` there only when the run saved nothing,
        so a ``max_steps`` that is not a multiple of ``every_n_train_steps`` would lose the last steps."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_step_and_link(trainer, self._monitor_candidates(trainer))

    def save_now(self, trainer: pl.Trainer) -> str:
        """Saves the checkpoint of the current global step under its step name, unless this run saved it already (or
        resumed from it at this step), and points ``last.ckpt`` at it (when ``save_last``). Call it on every rank, at
        an optimizer-step boundary; returns the step checkpoint's path, complete on disk when it returns."""
        if self.dirpath is None:
            raise RuntimeError("save_now: the callback has no dirpath yet; call it once the Trainer's fit has started")
        return self._save_step_and_link(trainer, self._monitor_candidates(trainer))

    @override
    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        if self.save_last:
            self._save_step_and_link(trainer, monitor_candidates)

    def _save_step_and_link(self, trainer: pl.Trainer, monitor_candidates: dict[str, Tensor]) -> str:
        last = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        if self.save_last:
            self.last_model_path = last  # before saving: it is part of the callback's state in the checkpoint
        if self._last_checkpoint_saved and self._last_global_step_saved == trainer.global_step:
            path = self._last_checkpoint_saved
        else:
            path = self.format_checkpoint_name(monitor_candidates)
            if self._resumed != (os.path.realpath(path), trainer.global_step):
                self._save_checkpoint(trainer, path)
        if self.save_last:
            self._collectively(trainer, f"pointing {last} at {path}", lambda: link_atomically(path, last))
        return path

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        temporary = None
        if trainer.is_global_zero:
            temporary = temporary_name(filepath)
            _remove(temporary)
        temporary = trainer.strategy.broadcast(temporary)
        try:
            with _direct_writes(trainer.strategy) as direct:
                trainer.save_checkpoint(temporary, self.save_weights_only)
        except BaseException:
            if trainer.is_global_zero:
                _remove(temporary)
            raise

        def finish() -> None:
            if direct is not None and direct.error is not None:
                raise direct.error
            publish(temporary, filepath)

        try:
            self._collectively(trainer, f"writing {filepath}", finish)
        finally:
            if trainer.is_global_zero:
                _remove(temporary)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    @override
    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        last = os.path.join(os.fspath(self.dirpath or ""), self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        if os.path.islink(last) and os.path.realpath(last) == os.path.realpath(filepath):
            return  # top-k pruning must not leave last.ckpt dangling
        super()._remove_checkpoint(trainer, filepath)

    @staticmethod
    def _collectively(trainer: pl.Trainer, what: str, action: Callable[[], None]) -> None:
        """Runs ``action`` on global rank 0; a failure raises :class:`CheckpointWriteError` on every rank."""
        cause, error = None, None
        if trainer.is_global_zero:
            try:
                action()
            except Exception as err:
                cause = err
                error = f"{what} failed ({type(err).__name__}: {err}); the previous checkpoints and last.ckpt are kept"
        error = trainer.strategy.broadcast(error)
        if error is not None:
            raise CheckpointWriteError(error) from cause
