"""End-to-end mid-epoch resume through a real Lightning Trainer (CPU, seconds).

An uninterrupted run records the token ids of every training batch; a second run resumes from a
checkpoint written mid-epoch and must see exactly the batches the first run saw after that point,
and end with the same weights.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lowrank_recipes.recipes.data.datamodule import DataConfig, PretrainDataModule
from lowrank_recipes.recipes.model import Llama, LlamaConfig, causal_lm_loss

pytestmark = [
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]

SEQ_LEN = 16


class Recorder(pl.LightningModule):
    """A tiny LLaMA that remembers the input ids of every training batch it sees."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Llama(
            LlamaConfig(
                vocab_size=vocab_size,
                hidden_size=16,
                intermediate_size=32,
                num_heads=2,
                num_layers=1,
                max_seq_len=SEQ_LEN,
            )
        )
        self.seen: list[list[list[int]]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["input_ids"].tolist())
        return causal_lm_loss(self.model(batch["input_ids"]), batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def fit(
    config: DataConfig,
    root: Path,
    max_steps: int,
    accumulate: int,
    every: int | None = None,
    ckpt_path: str | None = None,
) -> tuple[Recorder, PretrainDataModule]:
    dm = PretrainDataModule(config)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.tokenizer is not None
    module = Recorder(dm.tokenizer.vocab_size)
    callbacks = [ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        use_distributed_sampler=False,  # the datamodule slices per rank itself
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=bool(every),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=root,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, dm


def local_c4(c4_shards: dict[str, list[str]], tokenizer_path: str) -> DataConfig:
    return DataConfig(
        source="c4",
        train_files=c4_shards["train"],
        val_files=c4_shards["validation"],
        tokenizer=tokenizer_path,
        seq_len=SEQ_LEN,
        micro_batch_size=4,
        val_sequences=4,
    )


@pytest.mark.parametrize(
    ("case", "num_workers", "accumulate"),
    [("embedded", 0, 1), ("embedded", 2, 2), ("c4", 0, 1)],
)
def test_resume_mid_epoch_sees_the_same_batches(
    case: str, num_workers: int, accumulate: int, tmp_path: Path, c4_shards: dict[str, list[str]], tiny_tokenizer
) -> None:
    if case == "embedded":
        # Two documents, the second held out: one small training document, so the run crosses
        # several epoch ends (9 micro-batches of 8 sequences per epoch).
        config = DataConfig(
            max_documents=2,
            holdout_every=2,
            vocab_size=300,
            seq_len=SEQ_LEN,
            micro_batch_size=8,
            num_workers=num_workers,
            seed=11,
            cache_dir=str(tmp_path / "tok"),
        )
    else:
        tiny_tokenizer.tokenizer.save(str(tmp_path / "tokenizer.json"))
        config = local_c4(c4_shards, str(tmp_path / "tokenizer.json"))
    if case == "embedded":
        probe = PretrainDataModule(config, accumulate_grad_batches=accumulate)
        probe.prepare_data()
        probe.setup("fit")
        epoch = len(probe.train_dataloader())  # micro-batches per (nominal) epoch
        # Stop mid-epoch and run past at least two epoch ends.
        stop = next(s for s in range(3, 100) if (s * accumulate) % epoch)
        steps = max(stop + 5, -(-2 * epoch // accumulate) + 2)
    else:
        stop, steps = 4, 9  # the stream is one endless epoch
    full, _ = fit(config, tmp_path / "a", steps, accumulate, every=stop)
    (checkpoint,) = (tmp_path / "a").glob(f"*-step={stop}.ckpt")
    state = torch.load(checkpoint, weights_only=False)
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # Lightning saved the loader state

    resumed, _ = fit(config, tmp_path / "b", steps, accumulate, ckpt_path=str(checkpoint))
    assert len(full.seen) == steps * accumulate
    assert resumed.seen == full.seen[stop * accumulate :]
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
