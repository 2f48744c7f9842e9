"""SIGTERM and SIGINT: the run finishes its optimizer step, saves it, and stops with 143 / 130; a second Ctrl+C stops
at once without saving; the saved step resumes exactly. In-process runs signal themselves at a chosen micro-batch
(deterministic); subprocess runs check the real exit status (marked slow); a 2-rank DDP run checks that the ranks
agree (marked multiprocess)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lowrank_recipes.callbacks import RunStopped
from lowrank_recipes.recipes.config import load_run_config
from lowrank_recipes.recipes.trainer import fit

from ..distributed.launch import launcher_free_environ
from .test_pretrain import TINY

pytestmark = [
    pytest.mark.slow,  # signal tests: several recipe runs each
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
    pytest.mark.filterwarnings("ignore:When using the `ThroughputMonitor`, you need to define a `flops_per_batch`"),
]

REPO = Path(__file__).resolve().parents[2]
# 2 micro-batches per optimizer step; no periodic checkpoint in the way
ACCUMULATED = [*TINY, "trainer.global_batch_size=8", "trainer.checkpoint_every_n_steps=1000"]


class _Signal(pl.Callback):
    """Sends ``signals`` to this process when micro-batch ``at`` starts, and records each step's last loss."""

    def __init__(self, at: int | None = None, signals: tuple[int, ...] = ()) -> None:
        self.at, self.signals = at, signals
        self.losses: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.at:
            for signum in self.signals:
                os.kill(os.getpid(), signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def _fit(out: Path, recorder: _Signal, *overrides: str) -> None:
    run, resolved = load_run_config("default", [*ACCUMULATED, *overrides, f"out_dir={out}"])
    fit(run, resolved, callbacks=[recorder])


def _saved_step(out: Path) -> int:
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    processed = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
    assert processed == 2 * checkpoint["global_step"], "saved mid-step"  # a step boundary: 2 micro-batches a step
    return checkpoint["global_step"]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_step_saves_that_step_and_the_resumed_run_repeats_the_uninterrupted_one(tmp_path, signum, code):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    full = _Signal()
    _fit(tmp_path / "full", full, "trainer.max_steps=6")

    stopped = _Signal(at=4, signals=(signum,))  # micro-batch 4: the first of optimizer step 3
    with pytest.raises(RunStopped) as raised:
        _fit(tmp_path / "split", stopped, "trainer.max_steps=6")
    assert raised.value.exit_code == code
    assert "after optimizer step 3 (saved " in str(raised.value)
    assert _saved_step(tmp_path / "split") == 3  # the step in progress was finished, then saved
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # nothing left installed

    resumed = _Signal()
    _fit(tmp_path / "split", resumed, "trainer.max_steps=6")
    assert {**stopped.losses, **resumed.losses} == full.losses  # same batches, draws and optimizer state


def test_a_second_sigint_stops_at_once_without_saving(tmp_path):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    recorder = _Signal(at=4, signals=(signal.SIGINT, signal.SIGINT))
    with pytest.raises(RunStopped) as raised:
        _fit(tmp_path / "run", recorder, "trainer.max_steps=6")
    assert raised.value.exit_code == 130 and "stopped by SIGINT during optimizer step 3" in str(raised.value)
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert max(recorder.losses) == 2  # nothing of step 3 ran to its end
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def _start(out: Path, *overrides: str) -> subprocess.Popen:
    # without the variables an earlier in-process DDP test leaves (the 2-rank run would wait to join that job)
    env = {**launcher_free_environ(), "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    args = [*ACCUMULATED, "trainer.global_batch_size=16", f"out_dir={out}", f"data.cache_dir={out.parent / 'cache'}"]
    return subprocess.Popen(
        [sys.executable, str(REPO / "recipes" / "pretrain.py"), *args, *overrides],
        env=env,
        cwd=out.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: _finish kills every rank if the run hangs
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """The run's output once it exits; past ``timeout`` its whole process group (DDP ranks included) is killed and
    the test fails with the output's tail, so that no rank outlives the test."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run did not end within {timeout} s:\n{proc.communicate()[0][-3000:]}")


def _wait_for_training(proc: subprocess.Popen, out: Path, timeout: float = 600) -> None:
    """Until the run has trained and saved its first periodic checkpoint (``checkpoint_every_n_steps=2``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "checkpoints" / "last.ckpt").exists():
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"the run saved no checkpoint within {timeout} s")


def _stopped_at(output: str, name: str) -> int:
    """The step of the recipe's closing line ``stopped: stopped by NAME after optimizer step N (saved ...)``."""
    pattern = rf"stopped: stopped by {name} after optimizer step (\d+) \(saved .*continue with resume=auto"
    match = re.search(pattern, output)
    assert match, output[-3000:]
    return int(match.group(1))


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_the_recipe_exits_with_128_plus_the_signal_after_saving_a_whole_step(tmp_path, signum, code):
    out = tmp_path / "run"
    proc = _start(out, "trainer.max_steps=100000", "trainer.checkpoint_every_n_steps=2")  # 4 micro-batches a step
    _wait_for_training(proc, out)
    proc.send_signal(signum)
    output = _finish(proc)
    assert proc.returncode == code, output[-3000:]
    step = _stopped_at(output, signal.Signals(signum).name)
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    processed = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
    assert checkpoint["global_step"] == step >= 2 and processed == 4 * step
    # and it resumes from there
    resumed = _start(out, f"trainer.max_steps={checkpoint['global_step'] + 2}")
    output = _finish(resumed)
    assert resumed.returncode == 0, output[-3000:]
    assert (
        torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == checkpoint["global_step"] + 2
    )


@pytest.mark.multiprocess
def test_two_ddp_ranks_agree_on_the_stop_after_sigterm_to_the_launching_process(tmp_path):
    out = tmp_path / "run"
    # 2 ranks x 2 micro-batches each per step of 16 sequences; SIGTERM only to rank 0, which Lightning forwards
    ddp = ("trainer.devices=2", "trainer.strategy=ddp")
    proc = _start(out, "trainer.max_steps=100000", "trainer.checkpoint_every_n_steps=2", *ddp)
    _wait_for_training(proc, out)
    proc.send_signal(signal.SIGTERM)
    output = _finish(proc)
    assert proc.returncode == 143, output[-3000:]
    step = _stopped_at(output, "SIGTERM")
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    processed = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
    assert checkpoint["global_step"] == step >= 2 and processed == 2 * step
