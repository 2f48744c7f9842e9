"""POET through the recipe (``optimizer.name=poet``): it trains, merges after the scheduled optimizer steps under
gradient accumulation, logs its tags, resumes exactly between merges, and refuses what it cannot run."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lowrank.poet import PoetMergeError, poet_modules
from lowrank_recipes.recipes.config import ConfigError, load_run_config
from lowrank_recipes.recipes.trainer import fit

from .test_pretrain import TINY, _scalars

pytestmark = [
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]
POET = [
    "optimizer.name=poet",
    "optimizer.poet.block_size=8",
    "optimizer.poet.merge_every=5",
    "optimizer.poet.lr=0.01",
    "trainer.global_batch_size=8",  # micro-batch 4: two accumulated micro-batches per optimizer step
]


class _Watch(pl.Callback):
    """Per optimizer step: the loss, and whether every generator is zero right after it (a merge just happened)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.zeroed: dict[int, bool] = {}
        self.stop_at = stop_at
        self._sum = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sum += float(outputs["loss"])
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        step = trainer.global_step
        self.losses[step], self._sum = self._sum, 0.0
        layers = poet_modules(pl_module)
        self.zeroed[step] = all(not layer.q_out.detach().any() and not layer.q_in.detach().any() for _, layer in layers)
        if self.stop_at is not None and step >= self.stop_at:
            trainer.should_stop = True


def _fit(out: Path, *extra: str, watch: _Watch | None = None) -> _Watch:
    watch = watch or _Watch()
    run, resolved = load_run_config("default", [*TINY, *POET, f"out_dir={out}", *extra])
    fit(run, resolved, callbacks=[watch])
    return watch


def test_poet_trains_merges_on_schedule_and_logs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    watch = _fit(out, "trainer.max_steps=12")
    assert sorted(watch.losses) == list(range(1, 13))
    # POETMerges runs before the watcher (the recipe's callbacks come first): after steps 5 and 10 the generators
    # are zero, after every other step they have moved
    assert [s for s, zero in watch.zeroed.items() if zero] == [5, 10]
    losses = [watch.losses[s] for s in range(1, 13)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    scalars = _scalars(out)
    for tag in ("poet/orthogonality_error", "poet/q_norm_max", "poet/merge_seconds", "poet/spectrum_drift"):
        assert tag in scalars, (tag, sorted(scalars))
    assert len(scalars["poet/merge_seconds"]) == 2 and max(scalars["poet/spectrum_drift"]) < 1e-5
    assert max(scalars["poet/orthogonality_error"]) < 1e-5 and 0 < max(scalars["poet/q_norm_max"]) < 1
    assert "train/lr/poet" in scalars and "lowrank/refresh_seconds" not in scalars
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    keys = checkpoint["state_dict"].keys()
    assert "model.layers.0.self_attn.q_proj.weight0" in keys and "model.layers.0.self_attn.q_proj.perm_in" in keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys


def test_group_table_counts_trainable_and_frozen(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO"):
        _fit(tmp_path / "run", "trainer.max_steps=1")
    text = caplog.text
    # TINY: vocab 384, hidden 32, intermediate 64, 2 layers, b = 8; 35 tensors train (2 x 14 generators, embeddings,
    # head, 5 norms). Generators per layer: q/k/v/o (32x32) (4 + 4) x 28
    # each, gate/up (64x32) (8 + 4) x 28, down (32x64) (4 + 8) x 28; embeddings and head 2 x 384 x 32; norms 5 x 32
    generators = 2 * (4 * 8 * 28 + 3 * 12 * 28)
    trainable = generators + 2 * 384 * 32 + 5 * 32
    frozen = 2 * (4 * 32 * 32 + 3 * 64 * 32)  # W0 of 7 linears per layer
    line = (
        f"trainable: {trainable:,} elements in 35 tensors; frozen (no gradient, no optimizer state): {frozen:,} "
        "elements in 14 tensors"
    )
    assert line in text, text[-3000:]


def test_a_run_stopped_between_merges_resumes_exactly(tmp_path: Path) -> None:
    common = ["trainer.max_steps=12", "trainer.checkpoint_every_n_steps=7"]
    full = _fit(tmp_path / "full", *common)
    first = _fit(tmp_path / "split", *common, watch=_Watch(stop_at=7))  # after the merge at 5, before the one at 10
    second = _fit(tmp_path / "split", *common, "resume=auto")
    assert sorted(first.losses) == list(range(1, 8)) and sorted(second.losses) == list(range(8, 13))
    assert {**first.losses, **second.losses} == full.losses
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.strategy=fsdp2"], "optimizer.name: poet is not supported with trainer.strategy=fsdp2"),
        (["trainer.per_layer_updates=true"], "trainer.per_layer_updates: needs optimizer.name=lowrank; accepted with"),
        (["optimizer.poet.block_size=1"], "optimizer.poet.block_size: invalid value 1; accepted: an integer >= 2"),
        (["optimizer.poet.init=xavier"], "optimizer.poet.init: invalid value 'xavier'; accepted: normalized | normal"),
        (["optimizer.lowrank.projected_gradients=true"], "needs optimizer.name=lowrank; accepted with poet: false"),
        (["optimizer.poet.max_merge_error=0"], "optimizer.poet.max_merge_error: invalid value 0.0; accepted: a finite"),
    ],
)
def test_what_poet_cannot_run_is_refused_before_anything_is_written(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises((ConfigError, ValueError), match=message):
        load_run_config("default", [*TINY, *POET, f"out_dir={tmp_path / 'run'}", *overrides])
    assert not (tmp_path / "run").exists()


def test_a_merge_past_the_series_range_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # poet.lr 0.5 drives ||Q||_2 far past 1 within 5 steps; the merge after step 5 refuses to fold that into W0
    with pytest.raises(PoetMergeError, match=r"POET merge before step 5: .* above optimizer.poet.max_merge_error"):
        _fit(out, "trainer.max_steps=12", "trainer.checkpoint_every_n_steps=3", "optimizer.poet.lr=0.5")
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3  # the step-3 checkpoint, not one written from the refused merge's step
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
