"""The recipe end to end: the default run's code path with tiny overrides, logs, checkpoints, resume."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lowrank_recipes.recipes.config import load_run_config
from lowrank_recipes.recipes.pretrain import main
from lowrank_recipes.recipes.trainer import fit

TINY = [
    "model.vocab_size=384",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_heads=2",
    "model.num_layers=2",
    "model.max_seq_len=32",
    "data.vocab_size=384",
    "data.seq_len=32",
    "data.max_documents=120",
    "data.micro_batch_size=4",
    "data.val_sequences=8",
    "trainer.global_batch_size=4",
    "optimizer.lowrank.rank=8",
    "optimizer.refresh.update_gap=4",
    "trainer.val_every_n_steps=5",
    "trainer.log_every_n_steps=1",
]


def _scalars(out_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(out_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    scalars.update({f"text:{tag}": [] for tag in acc.Tags()["tensors"]})  # add_text summaries
    return scalars


def test_default_path_runs_logs_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    assert main([*TINY, "trainer.max_steps=20", "trainer.checkpoint_every_n_steps=10", f"out_dir={out}"]) == 0
    scalars = _scalars(out)
    for tag in (
        "train/loss",
        "train/lr",
        "val/loss",
        "val/ppl",
        "train/lr/lowrank",
        "train/lr/plain",
        "train/peak_memory_gib",
    ):
        assert tag in scalars, (tag, sorted(scalars))
    assert "text:optimizer/groups/text_summary" in scalars and "text:data/corpus_sha256/text_summary" in scalars
    assert "train/device/items_per_sec" in scalars, sorted(scalars)  # tokens/s: length_fn counts tokens
    losses = scalars["train/loss"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3  # clearly falling
    assert scalars["val/loss"][-1] < scalars["val/loss"][0]
    # Peak lr 0.01 reached after warm-up (10% of 20 steps), cosine floor 0.1 x lr at the end.
    assert max(scalars["train/lr"]) == pytest.approx(0.01) and min(scalars["train/lr"]) >= 0.001 - 1e-6
    assert (out / "config.yaml").is_file()
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=000010.ckpt", "step=000020.ckpt"]
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 20
    assert checkpoint["hyper_parameters"]["optimizer"]["lowrank"]["rank"] == 8


class _Recorder(pl.Callback):
    """Records the loss of every optimizer step and, optionally, stops the run after ``stop_at`` steps."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


def test_resume_mid_epoch_repeats_the_uninterrupted_run(tmp_path):
    common = [*TINY, "trainer.max_steps=12", "trainer.checkpoint_every_n_steps=6", "optimizer.refresh.update_gap=4"]
    full = _Recorder()
    run, resolved = load_run_config("default", [*common, f"out_dir={tmp_path / 'full'}"])
    fit(run, resolved, callbacks=[full])

    first = _Recorder(stop_at=6)  # stopped after the refresh at step 4 and before the next one at step 8
    run, resolved = load_run_config("default", [*common, f"out_dir={tmp_path / 'split'}"])
    fit(run, resolved, callbacks=[first])
    assert (tmp_path / "split" / "checkpoints" / "last.ckpt").is_file()
    second = _Recorder()
    run, resolved = load_run_config("default", [*common, f"out_dir={tmp_path / 'split'}", "resume=auto"])
    fit(run, resolved, callbacks=[second])

    assert sorted(first.losses) == list(range(1, 7)) and sorted(second.losses) == list(range(7, 13))
    resumed = {**first.losses, **second.losses}
    assert resumed == full.losses  # same batches, same draws, same optimizer state: identical losses
    assert (tmp_path / "split" / "config.1.yaml").is_file()  # the first run's resolved config was kept


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_precisions_train(tmp_path, precision):
    recorder = _Recorder()
    overrides = [*TINY, "trainer.max_steps=6", f"trainer.precision={precision}", f"out_dir={tmp_path}"]
    run, resolved = load_run_config("default", overrides)
    fit(run, resolved, callbacks=[recorder])
    losses = [recorder.losses[step] for step in sorted(recorder.losses)]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    weight_dtype = checkpoint["state_dict"]["model.layers.0.self_attn.q_proj.weight"].dtype
    assert weight_dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    basis = checkpoint["optimizer_states"][0]["state"][0]["lowrank_basis"]
    assert basis.dtype == weight_dtype


@pytest.mark.parametrize("resumed_as", ["fp32", "bf16"])
def test_8bit_checkpoint_resumes_with_another_state_precision(tmp_path, resumed_as):
    common = [
        *TINY,
        "trainer.max_steps=6",
        "trainer.checkpoint_every_n_steps=3",
        f"out_dir={tmp_path}",
        "model.hidden_size=64",
        "model.intermediate_size=128",
    ]  # 24k-element embeddings: really 8-bit
    first = _Recorder(stop_at=3)
    run, resolved = load_run_config("default", [*common, "optimizer.state_precision=8bit"])
    fit(run, resolved, callbacks=[first])
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(v.dtype == torch.uint8 for e in saved["optimizer_states"][0]["state"].values() for v in e.values())
    second = _Recorder()
    run, resolved = load_run_config("default", [*common, f"optimizer.state_precision={resumed_as}"])
    fit(run, resolved, callbacks=[second])
    assert sorted(second.losses) == [4, 5, 6] and all(torch.isfinite(torch.tensor(list(second.losses.values()))))
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    dtypes = {v.dtype for e in final.values() for k, v in e.items() if k in ("exp_avg", "exp_avg_sq")}
    assert dtypes == ({torch.float32} if resumed_as == "fp32" else {torch.bfloat16})
    # Converted, not cast: torch's AdamW would have cast the uint8 codes to floats and kept their block scales.
    assert not any(k.endswith("_absmax") for e in final.values() for k in e)


def test_per_layer_updates_run_through_the_recipe(tmp_path):
    recorder = _Recorder()
    overrides = [
        *TINY,
        "trainer.max_steps=6",
        "trainer.per_layer_updates=true",
        "trainer.per_layer_clip_norm=1.0",
        f"out_dir={tmp_path}",
    ]
    run, resolved = load_run_config("default", overrides)
    fit(run, resolved, callbacks=[recorder])
    losses = [recorder.losses[s] for s in sorted(recorder.losses)]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_non_finite_training_stops_without_saving_it(tmp_path, capsys):
    """lr 1e6: the update of step 1 (finite loss) overflows the weights. The checkpoint due at step 2 is refused, the
    run exits 3 naming the step and the learning rate, and every checkpoint on disk holds finite weights."""
    out = tmp_path / "run"
    args = [*TINY, "optimizer.lr=1e6", "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=1", f"out_dir={out}"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: non-finite weights after optimizer step 1 with learning rate lowrank=")
    assert "the last good checkpoint is kept" in err
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == ["last.ckpt", "step=000001.ckpt"]
    for name in saved:
        checkpoint = torch.load(out / "checkpoints" / name, weights_only=True)
        assert checkpoint["global_step"] == 1
        assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values()), name


def test_infinite_learning_rate_is_refused(tmp_path, capsys):
    assert main([*TINY, "optimizer.lr=.inf", f"out_dir={tmp_path / 'run'}"]) == 2
    assert "optimizer.lr: invalid value inf; accepted: a finite number > 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_second_run_on_a_locked_out_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # another run holding the lock (flock conflicts across open files)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        assert main([*TINY, "trainer.max_steps=2", f"out_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: out_dir: {out} is in use by another run (pid 4242)"), err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    assert main([*TINY, "trainer.max_steps=2", f"out_dir={out}"]) == 0  # released: the run goes ahead
    assert (out / ".lock").read_text() == str(os.getpid())


def test_resume_never_refuses_an_out_dir_with_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=1", f"out_dir={out}"]) == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert main([*TINY, "trainer.max_steps=2", "resume=never", f"out_dir={out}"]) == 2
    assert "resume: never, but out_dir" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert not (out / "config.1.yaml").exists()


def test_adamw_with_the_two_rate_split_logs_both_rates(tmp_path):
    # optimizer.target_lr_scale: the attention and MLP matrices at lr x 0.25 through warm-up and cosine decay
    out = tmp_path / "run"
    overrides = ["optimizer.name=adamw", "optimizer.target_lr_scale=0.25", "trainer.max_steps=6"]
    assert main([*TINY, *overrides, f"out_dir={out}"]) == 0
    scalars = _scalars(out)
    plain, targets = scalars["train/lr/plain"], scalars["train/lr/targets"]
    assert len(plain) == len(targets) == 6 and max(plain) == pytest.approx(0.01)
    assert targets == pytest.approx([0.25 * lr for lr in plain])
