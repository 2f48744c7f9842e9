"""Stop and resume through a Lightning checkpoint in the middle of a (staggered) schedule."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lowrank_recipes.callbacks import SubspaceOverlapMonitor, SubspaceResampler
from tests.callbacks.helpers import (
    WARNING_FILTERS,
    MLPModule,
    RecordingLogger,
    RecordTap,
    Tap,
    make_trainer,
    optimizer_config,
    regression_loader,
)

pytestmark = [*WARNING_FILTERS, pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")]

MAX_STEPS, STOP = 10, 5


def run(
    root: Path,
    max_steps: int,
    ckpt_path: str | None = None,
    every: int | None = None,
    update_gap: int = 3,
    stagger: int = 2,
):
    module = MLPModule(optimizer_config(update_gap=update_gap, stagger=stagger, selector="importance"), blocks=2)
    logger, tap = RecordingLogger(), RecordTap()
    resampler, monitor = SubspaceResampler(), SubspaceOverlapMonitor(per_layer=True, image_interval=None)
    callbacks = [resampler, monitor, Tap(tap)]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1))
    trainer = make_trainer(root, max_steps, callbacks, logger, enable_checkpointing=bool(every))
    trainer.fit(module, regression_loader(), ckpt_path=ckpt_path)
    return module, logger, tap, resampler, monitor


def test_resume_repeats_the_uninterrupted_refresh_steps_and_bases(tmp_path: Path) -> None:
    full_module, full_log, full, full_resampler, full_monitor = run(tmp_path / "full", MAX_STEPS)
    _, first_log, first, _, _ = run(tmp_path / "stop", STOP, every=STOP)
    (ckpt,) = (tmp_path / "stop" / "ckpt").glob("*.ckpt")
    saved = torch.load(ckpt, weights_only=True)["callbacks"]
    assert saved["SubspaceResampler"]["num_refreshes"] == 4 and saved["SubspaceResampler"]["last_refresh_step"] == 4
    module, second_log, second, resampler, monitor = run(tmp_path / "resume", MAX_STEPS, ckpt_path=str(ckpt))

    # Slice 0 (layers.0) at 0, 3, 6, 9; slice 1 (layers.1) at 0, 1, 4, 7: the stop at 5 is mid-period for both.
    assert full.steps() == [0, 1, 3, 4, 6, 7, 9]
    assert first.steps() + second.steps() == full.steps()
    resumed_rows = first.rows + second.rows
    assert [(r[0], r[1], r[2]) for r in resumed_rows] == [(r[0], r[1], r[2]) for r in full.rows]
    for got, want in zip(resumed_rows, full.rows):
        assert torch.equal(got[3], want[3]), f"basis of {want[1]} at step {want[0]} differs"
        assert got[4] == want[4]
    for tag in ("lowrank/overlap/mean", "lowrank/overlap_layer/layers.1.fc2.weight"):
        assert first_log.steps(tag) + second_log.steps(tag) == full_log.steps(tag)
        assert first_log.values(tag) + second_log.values(tag) == full_log.values(tag)
    assert resampler.num_refreshes == full_resampler.num_refreshes == 7
    assert monitor.state_dict() == full_monitor.state_dict()
    for (name, p), (_, q) in zip(module.named_parameters(), full_module.named_parameters()):
        assert torch.equal(p, q), name


def test_resuming_with_another_schedule_warns(tmp_path: Path) -> None:
    run(tmp_path / "stop", STOP, every=STOP)
    (ckpt,) = (tmp_path / "stop" / "ckpt").glob("*.ckpt")
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["SubspaceResampler"]
    assert {k: saved[k] for k in ("update_gap", "stagger", "switch_at", "switch_to")} == {
        "update_gap": 3,
        "stagger": 2,
        "switch_at": None,
        "switch_to": None,
    }
    with pytest.warns(UserWarning, match=r"another refresh schedule \(update_gap=3 -> 5, stagger=2 -> 1\)"):
        run(tmp_path / "resume", MAX_STEPS, ckpt_path=str(ckpt), update_gap=5, stagger=1)
    # The same schedule resumes silently.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(tmp_path / "same", MAX_STEPS, ckpt_path=str(ckpt))
    assert not [w for w in caught if "another refresh schedule" in str(w.message)]
