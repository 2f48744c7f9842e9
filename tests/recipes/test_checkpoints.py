"""The cheap checkpoint check, ``resume=auto``'s fallback from a bad ``last.ckpt``, and the recipe killed (SIGKILL)
again and again while it checkpoints every step: ``last.ckpt`` always names a complete checkpoint."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from lowrank_recipes.callbacks.atomic_checkpoint import TEMPORARY
from lowrank_recipes.recipes.checkpoints import (
    NoUsableCheckpointError,
    checkpoint_problem,
    resume_checkpoint,
    step_checkpoints,
    step_of,
)
from lowrank_recipes.recipes.config import load_run_config
from lowrank_recipes.recipes.pretrain import main
from lowrank_recipes.recipes.trainer import resume_path
from tests.recipes.test_pretrain import TINY

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process


def _file(path: Path, step: int = 1) -> Path:
    torch.save({"global_step": step, "state_dict": {"w": torch.full((64, 64), float(step))}}, path)
    return path


def _sharded(path: Path, step: int = 1) -> Path:
    """A sharded checkpoint as fsdp2 writes it: torch.distributed.checkpoint's files plus Lightning's meta.pt."""
    from torch.distributed.checkpoint import save

    save({"state_dict": {"w": torch.full((64, 64), float(step)), "b": torch.ones(64)}}, checkpoint_id=str(path))
    torch.save({"global_step": step}, path / "meta.pt")
    return path


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_a_complete_file_passes_and_a_truncated_one_fails(tmp_path):
    assert checkpoint_problem(_file(tmp_path / "a.ckpt")) is None
    for keep in (0.5, 0.99):
        bad = _truncate(_file(tmp_path / f"cut{keep}.ckpt"), keep)
        assert checkpoint_problem(bad).startswith("not a complete torch.save archive (BadZipFile"), keep
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert checkpoint_problem(tmp_path / "empty.ckpt").startswith("not a complete torch.save archive")
    assert checkpoint_problem(tmp_path / "nothing.ckpt") == "missing"


def test_a_zip_whose_members_run_past_the_end_fails(tmp_path):
    path = _file(tmp_path / "a.ckpt")
    data = bytearray(path.read_bytes())
    # Move the central directory's first header offset past the end of the file.
    entry = data.index(b"PK\x01\x02")
    data[entry + 42 : entry + 46] = (len(data) - 10).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    assert "ends at byte" in checkpoint_problem(path) and "past the file's" in checkpoint_problem(path)


def test_a_sharded_directory_needs_metadata_every_shard_and_meta_pt(tmp_path):
    good = _sharded(tmp_path / "good.ckpt")
    assert checkpoint_problem(good) is None

    (_sharded(tmp_path / "no-metadata.ckpt") / ".metadata").unlink()
    assert checkpoint_problem(tmp_path / "no-metadata.ckpt") == "sharded checkpoint without .metadata"

    _truncate(_sharded(tmp_path / "cut-metadata.ckpt") / ".metadata", 0.3)
    assert checkpoint_problem(tmp_path / "cut-metadata.ckpt").startswith("unreadable .metadata")

    (_sharded(tmp_path / "no-shard.ckpt") / "__0_0.distcp").unlink()
    assert checkpoint_problem(tmp_path / "no-shard.ckpt") == "shard file __0_0.distcp listed in .metadata is missing"

    _truncate(_sharded(tmp_path / "short-shard.ckpt") / "__0_0.distcp", 0.9)
    assert "shard file __0_0.distcp holds" in checkpoint_problem(tmp_path / "short-shard.ckpt")

    (_sharded(tmp_path / "no-meta.ckpt") / "meta.pt").unlink()
    assert checkpoint_problem(tmp_path / "no-meta.ckpt") == "meta.pt: missing"

    _truncate(_sharded(tmp_path / "cut-meta.ckpt") / "meta.pt")
    assert checkpoint_problem(tmp_path / "cut-meta.ckpt").startswith("meta.pt: not a complete torch.save archive")


def test_links_are_checked_through_their_target(tmp_path):
    _file(tmp_path / "step=000002.ckpt")
    _sharded(tmp_path / "step=000004.ckpt")
    for target in ("step=000002.ckpt", "step=000004.ckpt"):
        os.symlink(target, tmp_path / f"to-{target}")
        assert checkpoint_problem(tmp_path / f"to-{target}") is None
    os.symlink("step=000006.ckpt", tmp_path / "last.ckpt")
    assert checkpoint_problem(tmp_path / "last.ckpt") == "dangling link to 'step=000006.ckpt'"


def test_step_checkpoints_are_listed_newest_first_without_temporaries(tmp_path):
    for name in ("step=000002.ckpt", "step=000010.ckpt", "step=000009.ckpt", "last.ckpt", ".step=000011.ckpt.tmp-7"):
        _file(tmp_path / name)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step=000010.ckpt", "step=000009.ckpt", "step=000002.ckpt"]
    assert step_of("epoch=0-step=12.ckpt") == 12 and step_of("last.ckpt") is None
    assert step_checkpoints(tmp_path / "absent") == []


def test_resume_checkpoint_falls_back_to_the_newest_good_one(tmp_path):
    assert resume_checkpoint(tmp_path / "absent").path is None  # a fresh start
    assert resume_checkpoint(tmp_path).path is None
    (tmp_path / ".step=000005.ckpt.tmp-9").write_bytes(b"x")  # a temporary is not a checkpoint
    assert resume_checkpoint(tmp_path).path is None

    for step in (1, 2, 3):
        _file(tmp_path / f"step={step:06d}.ckpt", step)
    choice = resume_checkpoint(tmp_path)  # no last.ckpt (killed before the first link): the newest step
    assert choice.path == tmp_path / "step=000003.ckpt" and choice.fell_back
    assert choice.rejected == {tmp_path / "last.ckpt": "missing"}

    os.symlink("step=000003.ckpt", tmp_path / "last.ckpt")
    choice = resume_checkpoint(tmp_path)
    assert choice.path == tmp_path / "last.ckpt" and not choice.fell_back

    _truncate(tmp_path / "step=000003.ckpt")
    choice = resume_checkpoint(tmp_path)
    assert choice.path == tmp_path / "step=000002.ckpt"
    assert list(choice.rejected) == [tmp_path / "last.ckpt", tmp_path / "step=000003.ckpt"]

    for step in (1, 2):
        _truncate(tmp_path / f"step={step:06d}.ckpt")
    with pytest.raises(NoUsableCheckpointError) as raised:
        resume_checkpoint(tmp_path)
    message = str(raised.value)
    assert message.startswith(f"resume=auto: no usable checkpoint in {tmp_path} (checked {tmp_path / 'last.ckpt'}: ")
    for step in (1, 2, 3):
        assert f"{tmp_path / f'step={step:06d}.ckpt'}: not a complete torch.save archive" in message
    assert "Accepted: resume=PATH naming a good checkpoint, or a new out_dir" in message


def test_resume_path_says_which_checkpoint_it_uses_instead_of_a_bad_last(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    _file(folder / "step=000002.ckpt", 2)
    _sharded(folder / "step=000004.ckpt", 4)
    (folder / "step=000004.ckpt" / "__0_0.distcp").unlink()  # killed while the shards were written
    os.symlink("step=000004.ckpt", folder / "last.ckpt")
    run, _ = load_run_config("default", [*TINY, f"out_dir={tmp_path}"])
    with pytest.warns(UserWarning) as warned:
        assert resume_path(run) == str(folder / "step=000002.ckpt")
    (line,) = [str(w.message) for w in warned]
    assert line == (
        f"resume=auto: {folder / 'last.ckpt'} is unusable (shard file __0_0.distcp listed in .metadata is missing); "
        f"{folder / 'step=000004.ckpt'} is unusable (shard file __0_0.distcp listed in .metadata is missing); "
        f"resuming from {folder / 'step=000002.ckpt'}, the newest checkpoint that passes the check"
    )
    _truncate(folder / "step=000002.ckpt")
    with pytest.raises(NoUsableCheckpointError, match="no usable checkpoint in"):
        resume_path(run)


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")
@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
@pytest.mark.filterwarnings("ignore:When using the `ThroughputMonitor`, you need to define a `flops_per_batch`")
def test_the_recipe_resumes_from_the_newest_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    common = [*TINY, "trainer.checkpoint_every_n_steps=2", f"out_dir={out}"]
    assert main([*common, "trainer.max_steps=4"]) == 0
    folder = out / "checkpoints"
    assert os.readlink(folder / "last.ckpt") == "step=000004.ckpt"
    _truncate(folder / "step=000004.ckpt")  # as a kill during a non-atomic copy left it
    with pytest.warns(UserWarning, match=r"last.ckpt is unusable \(not a complete .*resuming from .*step=000002.ckpt"):
        assert main([*common, "trainer.max_steps=6"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "last.ckpt",
        "step=000002.ckpt",
        "step=000004.ckpt",
        "step=000006.ckpt",
    ]
    assert all(checkpoint_problem(p) is None for p in folder.iterdir())  # step 4 was written anew, whole
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 6


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")
@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
@pytest.mark.filterwarnings("ignore:When using the `ThroughputMonitor`, you need to define a `flops_per_batch`")
def test_no_usable_checkpoint_is_a_one_paragraph_error_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    common = [*TINY, "trainer.checkpoint_every_n_steps=2", "trainer.max_steps=2", f"out_dir={out}"]
    assert main(common) == 0
    _truncate(out / "checkpoints" / "step=000002.ckpt")
    before = sorted(p.name for p in out.iterdir())
    assert main(common) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no usable checkpoint in" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == before  # no config.1.yaml, nothing else


def _wait_for(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.0005)


@pytest.mark.slow
def test_killed_runs_leave_a_good_last_checkpoint_and_resume(tmp_path):
    """Three SIGKILLs at random moments while the recipe checkpoints every step (one of them as soon as a
    temporary shows that a checkpoint is being written), with ``$TMPDIR`` on another file system (/dev/shm): after
    each, ``last.ckpt`` passes the check, loads, and is further on than before; nothing went through ``$TMPDIR``; the
    next start resumes from it and removes the temporaries. A last run completes."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's folder")
    tmpdir = Path(tempfile.mkdtemp(prefix="lowrank-kill-", dir=shm))
    out, folder, log = tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "run.log"
    last = folder / "last.ckpt"
    env = {
        **os.environ,
        "TMPDIR": str(tmpdir),
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "LOWRANK_RECIPES_CACHE": str(tmp_path / "cache"),
    }
    steps = 80
    args = [
        sys.executable,
        str(ROOT / "recipes" / "pretrain.py"),
        *TINY,
        f"trainer.max_steps={steps}",
        "trainer.checkpoint_every_n_steps=1",
        "trainer.val_every_n_steps=1000",
        f"out_dir={out}",
    ]
    rng = random.Random(13)

    def last_step() -> int:
        return step_of(os.path.realpath(last)) or 0 if os.path.lexists(last) else 0

    def writing() -> bool:
        return any(TEMPORARY.match(name) for name in os.listdir(folder))

    try:
        before = 0
        for kill in range(3):
            with log.open("w") as handle:
                proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
            try:
                _wait_for(lambda: last_step() > before, proc, log, "new checkpoint")  # noqa: B023
                if kill == 1:
                    _wait_for(writing, proc, log, "checkpoint write", timeout=10)
                else:
                    time.sleep(rng.uniform(0.0, 0.4))
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.kill()
                proc.wait()
            assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
            if kill:
                assert f"Restored all states from the checkpoint at {last}" in log.read_text()
            assert checkpoint_problem(last) is None, (kill, sorted(os.listdir(folder)))
            assert torch.load(last, weights_only=True)["global_step"] == last_step() > before
            assert not list(tmpdir.iterdir())  # no checkpoint went through $TMPDIR
            before = last_step()

        with log.open("w") as handle:
            code = subprocess.run(args, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
        assert code == 0, log.read_text()[-3000:]
        assert f"Restored all states from the checkpoint at {last}" in log.read_text()
        assert torch.load(last, weights_only=True)["global_step"] == steps
        names = sorted(os.listdir(folder))
        assert names == ["last.ckpt", *(f"step={s:06d}.ckpt" for s in range(1, steps + 1))]  # no temporaries
        assert all(checkpoint_problem(folder / name) is None for name in names)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
