"""``AtomicModelCheckpoint``: step checkpoints published by rename from a temporary beside them, ``last.ckpt`` an
atomically repointed link to the newest, failed writes that leave the previous state untouched, orphaned temporaries
removed at start, ``save_now``; and the publishing helpers on sharded (directory) checkpoints."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from lowrank_recipes.callbacks import AtomicModelCheckpoint, CheckpointWriteError
from lowrank_recipes.callbacks.atomic_checkpoint import TEMPORARY, link_atomically, publish, temporary_name
from tests.callbacks.helpers import WARNING_FILTERS

pytestmark = [*WARNING_FILTERS, pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")]


def _fit(
    root: Path, max_steps: int, every: int = 2, callbacks: list[pl.Callback] | None = None, ckpt_path: str | None = None
) -> AtomicModelCheckpoint:
    checkpoint = AtomicModelCheckpoint(
        dirpath=root / "checkpoints",
        filename="step={step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=every,
        save_top_k=-1,
        save_last=True,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint, *(callbacks or [])],
        default_root_dir=root,
    )
    trainer.fit(BoringModel(), ckpt_path=ckpt_path)
    return checkpoint


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _last_step(folder: Path) -> int:
    return torch.load(folder / "last.ckpt", weights_only=True)["global_step"]


def test_steps_are_renamed_into_place_and_last_links_the_newest(tmp_path, monkeypatch):
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((str(a), str(b))), real_replace(a, b))[1])
    through_tmpdir: list[Any] = []
    real_mkstemp = tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, **k: (through_tmpdir.append((a, k)), real_mkstemp(*a, **k))[1])

    _fit(tmp_path, max_steps=4)

    assert through_tmpdir == []  # Lightning's default writer goes through a tempfile.mkstemp() in $TMPDIR
    folder = tmp_path / "checkpoints"
    assert _names(folder) == ["last.ckpt", "step=000002.ckpt", "step=000004.ckpt"]
    assert (folder / "last.ckpt").is_symlink() and os.readlink(folder / "last.ckpt") == "step=000004.ckpt"
    assert _last_step(folder) == 4
    # Every checkpoint and every link came from a temporary in the same folder.
    targets = [Path(b).name for _, b in replaced]
    assert targets == ["step=000002.ckpt", "last.ckpt", "step=000004.ckpt", "last.ckpt"]
    for source, target in replaced:
        assert Path(source).parent == Path(target).parent == folder and TEMPORARY.match(Path(source).name), source


def test_the_end_of_training_last_saves_its_step_first(tmp_path):
    _fit(tmp_path, max_steps=3, every=100)  # nothing periodic: Lightning saves `last` when training ends
    folder = tmp_path / "checkpoints"
    assert _names(folder) == ["last.ckpt", "step=000003.ckpt"]
    assert os.readlink(folder / "last.ckpt") == "step=000003.ckpt" and _last_step(folder) == 3


def test_the_last_steps_of_a_run_are_always_checkpointed(tmp_path):
    _fit(tmp_path, max_steps=5, every=2)  # 5 is not a multiple of 2: Lightning alone would leave last at step 4
    folder = tmp_path / "checkpoints"
    assert _names(folder) == ["last.ckpt", "step=000002.ckpt", "step=000004.ckpt", "step=000005.ckpt"]
    assert os.readlink(folder / "last.ckpt") == "step=000005.ckpt" and _last_step(folder) == 5


def _write_half_then_fail(real_save: Any, fail_at: int) -> Any:
    calls = []

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(f)
        real_save(obj, f, *args, **kwargs)
        if len(calls) != fail_at:
            return
        if isinstance(f, (str, os.PathLike)):
            os.truncate(f, os.path.getsize(f) // 2)  # half written, then the disk fills up
        else:
            f.truncate(f.tell() // 2)
        raise OSError(28, "No space left on device")

    return save


def test_an_interrupted_write_keeps_the_previous_last(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _write_half_then_fail(torch.save, fail_at=2))
    with pytest.raises(CheckpointWriteError, match=r"writing .*step=000004.ckpt failed \(OSError: .*No space left"):
        _fit(tmp_path, max_steps=6)
    folder = tmp_path / "checkpoints"
    assert _names(folder) == ["last.ckpt", "step=000002.ckpt"]  # no step=000004, no temporary left behind
    assert os.readlink(folder / "last.ckpt") == "step=000002.ckpt" and _last_step(folder) == 2

    monkeypatch.undo()
    _fit(tmp_path, max_steps=6, ckpt_path=str(folder / "last.ckpt"))  # resumes from step 2
    assert _names(folder) == ["last.ckpt", "step=000002.ckpt", "step=000004.ckpt", "step=000006.ckpt"]
    assert _last_step(folder) == 6


@pytest.mark.parametrize("failing", ["step=000004.ckpt", "last.ckpt"])
def test_a_failed_rename_keeps_the_previous_last(tmp_path, monkeypatch, failing):
    real_replace = os.replace

    def replace(source: Any, target: Any) -> None:
        if Path(target).name == failing and "000004" in (os.readlink(source) if failing == "last.ckpt" else source):
            raise OSError(5, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointWriteError, match=f"{failing}.* failed \\(OSError: .*Input/output error"):
        _fit(tmp_path, max_steps=6)
    folder = tmp_path / "checkpoints"
    written = ["step=000002.ckpt", "step=000004.ckpt"] if failing == "last.ckpt" else ["step=000002.ckpt"]
    assert _names(folder) == ["last.ckpt", *written]  # and no temporary
    assert os.readlink(folder / "last.ckpt") == "step=000002.ckpt" and _last_step(folder) == 2


def test_orphaned_temporaries_are_removed_at_start(tmp_path):
    _fit(tmp_path, max_steps=2)
    folder = tmp_path / "checkpoints"
    good = (folder / "step=000002.ckpt").read_bytes()
    # What SIGKILLs during writes leave: a half-written file, a link not yet moved, a half-written sharded directory,
    # a checkpoint moved aside while being replaced.
    (folder / ".step=000004.ckpt.tmp-4242").write_bytes(good[:1000])
    os.symlink("step=000004.ckpt", folder / ".last.ckpt.tmp-4242")
    (folder / ".step=000006.ckpt.tmp-4243").mkdir()
    (folder / ".step=000006.ckpt.tmp-4243" / "__0_0.distcp").write_bytes(b"\0" * 10)
    (folder / ".step=000002.ckpt.old-4244").write_bytes(good)
    (folder / "notes.txt").write_text("kept")  # not a temporary

    _fit(tmp_path, max_steps=4, ckpt_path=str(folder / "last.ckpt"))
    assert _names(folder) == ["last.ckpt", "notes.txt", "step=000002.ckpt", "step=000004.ckpt"]
    assert os.readlink(folder / "last.ckpt") == "step=000004.ckpt" and _last_step(folder) == 4


class _SaveNow(pl.Callback):
    """Calls the checkpoint callback's ``save_now`` twice at optimizer step ``at``, in ``hook`` (the checkpoint
    callback's own hooks run after this one's), recording the returned path and its modification time each time."""

    def __init__(self, at: int, hook: str) -> None:
        self.at, self.hook = at, hook
        self.calls: list[tuple[str, int]] = []

    def _save(self, trainer: pl.Trainer, hook: str) -> None:
        if hook == self.hook and trainer.global_step == self.at:
            for _ in range(2):
                path = trainer.checkpoint_callback.save_now(trainer)
                self.calls.append((path, os.stat(path).st_mtime_ns))

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._save(trainer, "on_train_batch_end")

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._save(trainer, "on_train_start")


def test_save_now_saves_the_current_step_once_and_links_it(tmp_path):
    folder = tmp_path / "checkpoints"
    first = _SaveNow(at=3, hook="on_train_batch_end")
    _fit(tmp_path, max_steps=4, every=4, callbacks=[first])
    (path, mtime), again = first.calls
    assert path == str(folder / "step=000003.ckpt") and again == (path, mtime)  # saved once
    assert _names(folder) == ["last.ckpt", "step=000003.ckpt", "step=000004.ckpt"]
    assert os.readlink(folder / "last.ckpt") == "step=000004.ckpt"

    # Right after resuming from step 4, that checkpoint is the current step's: nothing is written again.
    before = os.stat(folder / "step=000004.ckpt").st_mtime_ns
    second = _SaveNow(at=4, hook="on_train_start")
    _fit(tmp_path, max_steps=5, every=4, callbacks=[second], ckpt_path=str(folder / "last.ckpt"))
    assert second.calls == [(str(folder / "step=000004.ckpt"), before)] * 2
    # Step 5 is not due (every 4): this run saved nothing, so Lightning saves `last` when training ends.
    assert os.readlink(folder / "last.ckpt") == "step=000005.ckpt" and _last_step(folder) == 5


def _sharded(path: Path, value: float) -> Path:
    """A sharded checkpoint as fsdp2 writes it: torch.distributed.checkpoint's files plus Lightning's meta.pt."""
    from torch.distributed.checkpoint import save

    save({"state_dict": {"w": torch.full((4, 3), value)}}, checkpoint_id=str(path))
    torch.save({"global_step": int(value)}, path / "meta.pt")
    return path


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process: dcp saves without a group
def test_sharded_directories_are_published_and_linked_atomically(tmp_path, monkeypatch):
    final = tmp_path / "step=000004.ckpt"
    publish(str(_sharded(Path(temporary_name(str(final))), 4.0)), str(final))
    assert sorted(p.name for p in final.iterdir()) == [".metadata", "__0_0.distcp", "meta.pt"]
    last = tmp_path / "last.ckpt"
    _sharded(last, 2.0)  # a real directory, as ModelCheckpoint wrote sharded last.ckpt before
    link_atomically(str(final), str(last))
    assert os.readlink(last) == "step=000004.ckpt"
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 4
    # Repointed to another directory: one rename of a new link over the old, last.ckpt never missing.
    publish(
        str(_sharded(Path(temporary_name(str(tmp_path / "step=000002.ckpt"))), 2.0)), str(tmp_path / "step=000002.ckpt")
    )
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((str(a), str(b))), real_replace(a, b))[1])
    link_atomically(str(tmp_path / "step=000002.ckpt"), str(last))
    link_atomically(str(final), str(last))
    monkeypatch.undo()
    assert replaced == [(temporary_name(str(last)), str(last))] * 2 and os.readlink(last) == "step=000004.ckpt"
    # Written again (a resumed run reaching the step anew): replaced whole, the link still resolves.
    publish(str(_sharded(Path(temporary_name(str(final))), 5.0)), str(final))
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=000002.ckpt", "step=000004.ckpt"]
