"""Builds Lightning's Trainer, logger and callbacks for a validated ``RunConfig`` and runs ``fit``."""

from __future__ import annotations

import copy
import dataclasses
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ThroughputMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from lowrank_recipes.callbacks import (
    AtomicModelCheckpoint,
    FiniteLossGuard,
    GracefulStop,
    OptimizerStatePrecision,
    PerLayerUpdates,
    POETMerges,
    ProjectGradients,
    RunStopped,
    SubspaceOverlapMonitor,
    SubspaceResampler,
)
from lowrank_recipes.recipes.checkpoints import resume_checkpoint
from lowrank_recipes.recipes.config import RunConfig
from lowrank_recipes.recipes.data.datamodule import PretrainDataModule
from lowrank_recipes.recipes.module import LlamaPretrainModule, module_kwargs
from lowrank_recipes.recipes.resume_config import CONFIG_KEY, check_resume
from lowrank_recipes.recipes.run_lock import run_lock


def world_devices(run: RunConfig) -> int:
    """Devices per node as a number ("auto": every GPU, or one CPU process)."""
    devices = run.trainer.devices
    if devices == "auto":
        return max(1, torch.cuda.device_count()) if run.trainer.accelerator in ("auto", "gpu", "cuda") else 1
    return int(devices)


def accumulation(run: RunConfig) -> int:
    """Micro-batches per optimizer step on each rank, from the global batch size."""
    per_step = run.data.micro_batch_size * world_devices(run) * run.trainer.num_nodes
    return run.trainer.global_batch_size // per_step


def _tokens(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].numel()


def _sequences(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].shape[0]


def subspace_callbacks(run: RunConfig) -> list[pl.Callback]:
    """For a low-rank run: what runs the refreshes of the optimizer's schedule (the resampler, or per-layer updates
    inside backward) and the overlap monitor; for POET the merges; none for full-rank AdamW."""
    if run.optimizer.name == "poet":
        return [POETMerges(run.optimizer.poet)]
    if run.optimizer.name != "lowrank":
        return []
    if run.trainer.per_layer_updates:
        refreshes: pl.Callback = PerLayerUpdates(clip_norm=run.trainer.per_layer_clip_norm)
    else:
        refreshes = SubspaceResampler()
    projected = [ProjectGradients(run.optimizer)] if run.optimizer.lowrank.projected_gradients else []
    return [*projected, refreshes, SubspaceOverlapMonitor(**dataclasses.asdict(run.monitor))]


def strategy(run: RunConfig) -> str | pl.strategies.Strategy:
    """Lightning's strategy for ``trainer.strategy``: ``fsdp2`` is ModelParallelStrategy, data parallel only, with
    sharded (directory) or full (single-file, gathered on rank 0) checkpoints as ``trainer.checkpoint_format`` says;
    the module applies ``fully_shard`` in ``configure_model``."""
    t = run.trainer
    if t.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(
            data_parallel_size=world_devices(run) * t.num_nodes,
            tensor_parallel_size=1,
            save_distributed_checkpoint=t.checkpoint_format != "full",
        )
    if t.strategy == "ddp" and run.optimizer.lowrank.projected_gradients:
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(gradient_as_bucket_view=True)  # R reduced in place: no second copy of the companions' grads
    return t.strategy


def build_trainer(run: RunConfig, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    t = run.trainer
    out = Path(run.out_dir)
    accumulate = accumulation(run)
    # Atomic step checkpoints; last.ckpt is a link to the newest, repointed atomically (callbacks/atomic_checkpoint.py).
    checkpoint = AtomicModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="step={step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every_n_steps,
        save_top_k=-1,
        save_last=True,
    )
    return pl.Trainer(
        max_steps=t.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=accumulate,
        devices=t.devices,
        num_nodes=t.num_nodes,
        accelerator=t.accelerator,
        strategy=strategy(run),
        precision=t.precision,
        gradient_clip_val=t.gradient_clip_val,
        val_check_interval=t.val_every_n_steps * accumulate,  # counted in micro-batches
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the data module slices the global batches per rank itself
        logger=TensorBoardLogger(save_dir=str(out), name="tensorboard", version="", default_hp_metric=False),
        callbacks=[
            FiniteLossGuard(),  # first: a non-finite loss stops the step before any other callback works on it
            checkpoint,
            GracefulStop(),  # SIGTERM / SIGINT: save at the next step boundary through `checkpoint`, exit 143 / 130
            LearningRateMonitor(logging_interval="step"),
            # train/device/items_per_sec is tokens/s per device (length_fn counts tokens), a rolling mean over 10
            # optimizer steps.
            ThroughputMonitor(batch_size_fn=_sequences, length_fn=_tokens, window_size=10),
            OptimizerStatePrecision(),
            *subspace_callbacks(run),
            *([run.delta.callback()] if run.delta.every_n_steps is not None else []),
            *(callbacks or []),
        ],
        default_root_dir=str(out),
    )


@rank_zero_only
def save_resolved_config(out_dir: str, resolved: dict[str, Any]) -> Path:
    """Writes the resolved config beside the logs without overwriting an earlier run's (config.yaml,
    config.1.yaml...)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path, index = out / "config.yaml", 0
    while path.exists():
        index += 1
        path = out / f"config.{index}.yaml"
    path.write_text(yaml.safe_dump(resolved, sort_keys=False))
    return path


def resume_path(run: RunConfig) -> str | None:
    """The checkpoint to resume from: an explicit path; under ``resume=auto``, in ``out_dir/checkpoints``,
    ``last.ckpt`` if it passes the cheap check of :mod:`lowrank_recipes.recipes.checkpoints`, else the newest step
    checkpoint that does (said in a warning naming both), None when there is no checkpoint at all; raises
    ``NoUsableCheckpointError`` naming every path checked when none passes."""
    if run.resume == "never":
        return None
    if run.resume != "auto":
        return run.resume
    choice = resume_checkpoint(Path(run.out_dir) / "checkpoints")
    if choice.fell_back:
        bad = "; ".join(f"{path} is unusable ({problem})" for path, problem in choice.rejected.items())
        rank_zero_warn(f"resume=auto: {bad}; resuming from {choice.path}, the newest checkpoint that passes the check")
    return None if choice.path is None else str(choice.path)


class RunConfigInCheckpoint(pl.Callback):
    """Stores the run's resolved config in every checkpoint (under ``resume_config.CONFIG_KEY``, plain data), so that
    a resumed run can tell what changed before its Trainer is built."""

    def __init__(self, resolved: dict[str, Any]) -> None:
        self.resolved = copy.deepcopy(resolved)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CONFIG_KEY] = copy.deepcopy(self.resolved)


def fit(run: RunConfig, resolved: dict[str, Any], callbacks: list[pl.Callback] | None = None) -> int:
    """Runs the recipe; ``out_dir`` is locked for the run (:mod:`lowrank_recipes.recipes.run_lock`). A resumed run's
    config is first compared with its checkpoint's (:mod:`lowrank_recipes.recipes.resume_config`): a refused change
    raises ``ConfigError`` before anything is written."""
    with run_lock(run.out_dir):
        checkpoint = resume_path(run)
        changes = check_resume(checkpoint, resolved) if checkpoint is not None else []
        rank_zero_info("resolved config:\n" + yaml.safe_dump(resolved, sort_keys=False))
        for line in changes:
            rank_zero_info(line)
        save_resolved_config(run.out_dir, resolved)
        pl.seed_everything(run.seed, workers=True)
        datamodule = PretrainDataModule(run.data)
        module = LlamaPretrainModule(**module_kwargs(run), load_init_from=checkpoint is None)
        trainer = build_trainer(run, [RunConfigInCheckpoint(resolved), *(callbacks or [])])
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint)
        except SystemExit:  # Lightning's exits: KeyboardInterrupt (a second Ctrl+C), its own SIGTERM exit
            stop = next((cb for cb in trainer.callbacks if isinstance(cb, GracefulStop)), None)
            if stop is None or stop.stopped_by is None:
                raise
            name = signal.Signals(stop.stopped_by).name
            raise RunStopped(
                stop.stopped_by,
                f"stopped by {name} during optimizer step {trainer.global_step + 1}; resume=auto continues from the "
                "last saved checkpoint",
            ) from None
    return 0
