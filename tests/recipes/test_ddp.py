"""Two-process DDP runs (gloo) through a real Trainer: global batches and stream resume.

The ranks are spawned, not forked: forking the pytest process after it ran torch threads can deadlock a child.

* The global batch of every optimizer step with 2 ranks x accumulation 1 equals the one with
  1 process x accumulation 2 (map-style data).
* A sharded stream resumed from a rank-0-written checkpoint continues every rank exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lowrank_recipes.recipes.data.datamodule import DataConfig, PretrainDataModule

from .test_resume import SEQ_LEN, Recorder

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning"),
]


class RankRecorder(Recorder):
    """Writes the batches each rank saw to <out>/seen-<tag>-rank<r>.json when training ends."""

    def __init__(self, vocab_size: int, out: Path, tag: str) -> None:
        super().__init__(vocab_size)
        self.out, self.tag = out, tag

    def on_train_end(self) -> None:
        path = self.out / f"seen-{self.tag}-rank{self.global_rank}.json"
        path.write_text(json.dumps(self.seen))


def run(
    config: DataConfig,
    out: Path,
    tag: str,
    devices: int,
    accumulate: int,
    max_steps: int,
    every: int | None = None,
    ckpt_path: str | None = None,
) -> None:
    dm = PretrainDataModule(config)
    dm.prepare_data()
    dm.setup("fit")  # before fit, as a script sizing the model would; each rank must still get its own data
    assert dm.tokenizer is not None
    module = RankRecorder(dm.tokenizer.vocab_size, out, tag)
    callbacks = [ModelCheckpoint(dirpath=out / tag, every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",  # spawn: a fork after torch threads can deadlock
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        use_distributed_sampler=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=bool(every),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)


def seen(out: Path, tag: str, rank: int) -> list:
    return json.loads((out / f"seen-{tag}-rank{rank}.json").read_text())


def test_ddp_global_batches_equal_single_process(tmp_path: Path) -> None:
    config = DataConfig(
        max_documents=2,
        holdout_every=2,
        vocab_size=300,
        seq_len=SEQ_LEN,
        micro_batch_size=4,
        seed=5,
        cache_dir=str(tmp_path / "tok"),
    )
    steps = 6
    run(config, tmp_path, "single", devices=1, accumulate=2, max_steps=steps)
    run(config, tmp_path, "ddp", devices=2, accumulate=1, max_steps=steps)
    single = seen(tmp_path, "single", 0)
    ranks = [seen(tmp_path, "ddp", r) for r in range(2)]
    assert len(single) == 2 * steps and all(len(r) == steps for r in ranks)
    for k in range(steps):
        assert sorted(map(tuple, single[2 * k] + single[2 * k + 1])) == sorted(map(tuple, ranks[0][k] + ranks[1][k]))


def test_ddp_stream_resume(tmp_path: Path, c4_shards: dict[str, list[str]], tiny_tokenizer) -> None:
    tiny_tokenizer.tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = DataConfig(
        source="c4",
        train_files=c4_shards["train"],
        val_files=c4_shards["validation"],
        tokenizer=str(tmp_path / "tokenizer.json"),
        seq_len=SEQ_LEN,
        micro_batch_size=2,
        val_sequences=2,
    )
    run(config, tmp_path, "full", devices=2, accumulate=1, max_steps=8, every=3)
    (checkpoint,) = (tmp_path / "full").glob("*-step=3.ckpt")
    state = torch.load(checkpoint, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state[0]["world_size"] == 2 and len(state[0]["ranks"]) == 2  # both ranks' positions saved
    run(config, tmp_path, "resumed", devices=2, accumulate=1, max_steps=8, ckpt_path=str(checkpoint))
    for r in range(2):
        assert seen(tmp_path, "resumed", r) == seen(tmp_path, "full", r)[3:]
    assert seen(tmp_path, "full", 0) != seen(tmp_path, "full", 1)
