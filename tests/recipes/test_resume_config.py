"""Resuming with a changed config: refused keys stop the run before anything is written, applied keys take effect
(the learning-rate schedule and the selector switch step follow the new config at the restored step)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from lowrank_recipes.recipes.config import ConfigError, load_run_config
from lowrank_recipes.recipes.pretrain import main
from lowrank_recipes.recipes.resume_config import CONFIG_KEY, check_resume, config_changes, rule_for, stored_config
from lowrank_recipes.recipes.trainer import fit

from .test_pretrain import TINY


class _Lrs(pl.Callback):
    """The lr of every group as each optimizer step uses it, and the optimizer's refresh schedule."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.lrs: dict[int, list[float]] = {}
        self.schedule = None
        self.stop_at = stop_at

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs[trainer.global_step] = [group["lr"] for group in optimizer.param_groups]
        self.schedule = getattr(optimizer, "schedule", None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


def _fit(out: Path, *overrides: str, stop_at: int | None = None) -> _Lrs:
    recorder = _Lrs(stop_at)
    run, resolved = load_run_config(
        "default", [*TINY, "trainer.checkpoint_every_n_steps=2", *overrides, f"out_dir={out}"]
    )
    fit(run, resolved, callbacks=[recorder])
    return recorder


def _cosine(lr: float, step: int, warmup: int, max_steps: int, floor: float) -> float:
    """The reference schedule, written out again: linear warm-up, cosine to floor * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_every_checkpoint_holds_the_resolved_config(tmp_path):
    out = tmp_path / "run"
    _fit(out, "trainer.max_steps=2")
    _, resolved = load_run_config(
        "default", [*TINY, "trainer.checkpoint_every_n_steps=2", "trainer.max_steps=2", f"out_dir={out}"]
    )
    for path in (out / "checkpoints").iterdir():
        assert torch.load(path, weights_only=True)[CONFIG_KEY] == resolved, path.name
    config, step, source = stored_config(out / "checkpoints" / "last.ckpt")
    assert (config, step) == (resolved, 2) and source.startswith("checkpoint ")


def test_refused_changes_are_one_paragraph_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    _fit(out, "trainer.max_steps=2")
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    changed = [
        "optimizer.lowrank.rank=4",
        "model.hidden_size=64",
        "data.micro_batch_size=2",
        "optimizer.lowrank.selector=dominant",
        "seed=1",
    ]
    assert main([*TINY, "trainer.checkpoint_every_n_steps=2", "trainer.max_steps=4", *changed, f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: resume: the config differs from the one of checkpoint") and "(step 2)" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for needle in (
        "optimizer.lowrank.rank 8 -> 4",
        "model.hidden_size 32 -> 64",
        "data.micro_batch_size 4 -> 2",
        "optimizer.lowrank.selector 'importance' -> 'dominant'",
        "switch_at / switch_to",
        "seed 0 -> 1",
        "data.seed 0 -> 1",
        "another out_dir",
    ):
        assert needle in err, (needle, err)
    assert "trainer.max_steps" not in err  # an applied change is not listed among the refused ones
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before
    assert not (out / "config.1.yaml").exists()


def test_a_changed_lr_and_max_steps_rebuild_the_schedule_at_the_restored_step(tmp_path, caplog):
    out = tmp_path / "run"
    first = _fit(out, "trainer.max_steps=10", "optimizer.lr=0.01", stop_at=4)
    assert sorted(first.lrs) == [0, 1, 2, 3]
    caplog.clear()
    with caplog.at_level("INFO"):
        second = _fit(out, "trainer.max_steps=20", "optimizer.lr=0.02")
    text = caplog.text
    assert "trainer.max_steps 10 -> 20 applied" in text and "optimizer.lr 0.01 -> 0.02 applied" in text
    assert "the learning-rate schedule follows the config from step 4" in text
    assert sorted(second.lrs) == list(range(4, 20))
    for step, lrs in second.lrs.items():  # every group: lr 0.02, warm-up round(0.1 * 20) = 2, horizon 20, floor 0.1
        assert lrs == pytest.approx([_cosine(0.02, step, 2, 20, 0.1)] * len(lrs), rel=1e-12), step
    assert (out / "config.1.yaml").is_file()


def test_a_longer_run_moves_the_selector_switch(tmp_path, caplog):
    out = tmp_path / "run"
    switch = ["optimizer.refresh.switch_at=0.5", "optimizer.refresh.switch_to=random"]
    first = _fit(out, "trainer.max_steps=8", *switch, stop_at=2)
    assert first.schedule.switch_step == 4
    with caplog.at_level("INFO"):
        second = _fit(out, "trainer.max_steps=16", *switch)
    assert second.schedule.switch_step == 8
    assert "optimizer.refresh.max_steps 8 -> 16 applied: the selector switch step" in caplog.text


def test_a_checkpoint_without_a_config_is_compared_with_the_runs_config_file(tmp_path, capsys):
    out = tmp_path / "run"
    _fit(out, "trainer.max_steps=2")
    last = out / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    del checkpoint[CONFIG_KEY]  # as written before the config was stored
    torch.save(checkpoint, last.resolve())
    config, step, source = stored_config(last)
    assert step == 2 and source.startswith(str(out / "config.yaml"))
    assert config == yaml.safe_load((out / "config.yaml").read_text())
    assert main([*TINY, "trainer.checkpoint_every_n_steps=2", "optimizer.lowrank.rank=4", f"out_dir={out}"]) == 2
    assert "optimizer.lowrank.rank 8 -> 4" in capsys.readouterr().err


def test_rules_refuse_what_is_not_listed():
    assert rule_for("optimizer.lr").action == "apply"
    assert rule_for("optimizer.refresh.update_gap").action == "apply"
    assert rule_for("optimizer.lowrank.rank").action == "refuse"
    assert rule_for("data.seq_len").action == "refuse" and rule_for("data.val_sequences").action == "apply"
    assert rule_for("a_future_section.key") is None
    changes, one_sided = config_changes(
        {"a_future_section": {"key": 1}, "trainer": {"max_steps": 4}, "gone": 1, "out_dir": "a"},
        {"a_future_section": {"key": 2}, "trainer": {"max_steps": 8}, "new": 1, "out_dir": "b"},
    )
    assert [(c.key, c.refused) for c in changes] == [("a_future_section.key", True), ("trainer.max_steps", False)]
    assert one_sided == ["gone", "new"]


def test_a_sharded_checkpoint_is_read_from_its_meta_file_and_needs_fsdp2(tmp_path):
    _, resolved = load_run_config("default", [*TINY, "trainer.strategy=fsdp2"])
    directory = tmp_path / "checkpoints" / "last.ckpt"
    directory.mkdir(parents=True)
    torch.save({"global_step": 3, CONFIG_KEY: resolved}, directory / "meta.pt")
    assert stored_config(directory)[:2] == (resolved, 3)
    assert check_resume(directory, resolved) == []
    _, plain = load_run_config("default", TINY)
    with pytest.raises(ConfigError, match="a sharded checkpoint .* is read by trainer.strategy=fsdp2 only"):
        check_resume(directory, plain)
