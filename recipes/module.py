"""``LlamaPretrainModule``: next-token pretraining of ``lowrank_recipes.recipes.model.Llama`` with any ``lowrank``
optimizer.

Logs (TensorBoard tags): ``train/loss``, ``train/lr`` (the plain group's learning rate as the schedule sets it; per
group ``train/lr/<group>`` comes from Lightning's LearningRateMonitor), ``val/loss``, ``val/ppl`` (torchmetrics
Perplexity), ``train/peak_memory_gib``; tokens/s comes from Lightning's ThroughputMonitor. The optimizer's group table
is printed at start and logged as text.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.text import Perplexity

from lowrank import build_optimizer, optimizer_config_from_dict
from lowrank.poet import apply_poet
from lowrank.randomness import resolve_seed
from lowrank.trainable import select_trainable
from lowrank_recipes.recipes.model import Llama, LlamaConfig, causal_lm_loss
from lowrank_recipes.recipes.schedule import WarmupCosine
from lowrank_recipes.recipes.weights import initial_weights


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: allocator peak on CUDA, max resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class LlamaPretrainModule(pl.LightningModule):
    """Args are plain dicts (they are saved as hyperparameters: ``weights_only=True`` loading needs plain data).

    Args:
        model: ``LlamaConfig`` fields.
        optimizer: ``lowrank.OptimizerConfig`` fields.
        schedule: ``lowrank_recipes.recipes.config.ScheduleConfig`` fields.
        max_steps: run length in optimizer steps (the schedule's horizon).
        load_init_from: read ``model["init_from"]`` (False when the run resumes: the checkpoint's weights are
            restored instead; not a hyperparameter).
    """

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any],
        schedule: dict[str, Any],
        max_steps: int,
        load_init_from: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["load_init_from"])
        self.model_config = LlamaConfig(**model)
        self.model = Llama(self.model_config)
        if self.model_config.init_from is not None and load_init_from:  # weights only; not when resuming
            self.model.load_state_dict(initial_weights(self.model_config.init_from, self.model_config))
        config = optimizer_config_from_dict(optimizer)
        if config.name == "poet":  # W = R W0 P on the target linears, before any wrapper and before the optimizer
            apply_poet(self.model, config.poet, config.lowrank.targets, resolve_seed(config.lowrank.seed).value)
        # model.trainable: the rest gets requires_grad=False before the optimizer (and DDP / FSDP2) see the parameters
        self.trainable = select_trainable(self.model, self.model_config.trainable)
        self.val_ppl = Perplexity()
        self.group_table: str | None = None

    def configure_model(self) -> None:
        """FSDP2 (``trainer.strategy=fsdp2``, Lightning's ModelParallelStrategy): ``fully_shard`` each decoder layer,
        then the root, over the data-parallel mesh; the weights become row-sharded DTensors. Then, with
        ``model.compile``, each decoder block is compiled in place (``nn.Module.compile()``: its parameters, names and
        state-dict keys unchanged; compilation happens at the first forward pass)."""
        mesh = self.device_mesh
        if mesh is not None:
            from torch.distributed.fsdp import fully_shard

            dp_mesh = mesh["data_parallel"]
            for layer in self.model.layers:
                fully_shard(layer, mesh=dp_mesh)
            fully_shard(self.model, mesh=dp_mesh)
        if self.model_config.compile:
            for layer in self.model.layers:
                layer.compile()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        return self.model(input_ids)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"])  # (B, T, V)
        loss = causal_lm_loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, sync_dist=False)
        groups = [g for g in self.trainer.optimizers[0].param_groups if not g.get("companions")]
        self.log("train/lr", groups[-1]["lr"], prog_bar=False)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("train/peak_memory_gib", peak_memory_gib(self.device))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"])
        loss = causal_lm_loss(logits, batch["labels"])
        self.val_ppl.update(logits.float(), batch["labels"])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", self.val_ppl, prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        config = optimizer_config_from_dict(self.hparams.optimizer)
        optimizer = build_optimizer(self.model, config)
        self.group_table = str(optimizer.group_table)
        rank_zero_info("optimizer groups:\n" + self.group_table)
        sched = self.hparams.schedule
        max_steps = self.hparams.max_steps
        lr_lambda = WarmupCosine(round(sched["warmup_fraction"] * max_steps), max_steps, sched["min_lr_ratio"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        # what the config says; a resumed checkpoint's scheduler state replaces it until on_train_start
        self._configured_schedule = ([group["initial_lr"] for group in optimizer.param_groups], dict(vars(lr_lambda)))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    def on_train_start(self) -> None:
        self.apply_configured_schedule()

    def apply_configured_schedule(self) -> list[tuple[str, float, float]]:
        """Makes the learning-rate schedule the config's at the restored step; returns (group, lr before, lr after)
        for the groups whose lr changed.

        Restoring a checkpoint brings back its ``LambdaLR`` state (base lrs and the ``WarmupCosine`` horizon) and
        its groups' lrs, so a resumed run whose ``optimizer.lr``, ``trainer.max_steps`` or ``schedule.*`` changed
        would silently follow the old schedule. Here the base lrs and the multiplier are set back to the configured
        ones and each group's lr becomes ``base_lr * factor(s)`` at the scheduler's step s. Unchanged config (or a
        fresh run): nothing changes.
        """
        configured = getattr(self, "_configured_schedule", None)
        scheduler = self.lr_schedulers() if self._trainer is not None else None
        if configured is None or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return []
        base_lrs, multiplier = configured
        functions = {id(fn): fn for fn in scheduler.lr_lambdas}.values()
        if list(scheduler.base_lrs) == base_lrs and all(vars(fn) == multiplier for fn in functions):
            return []
        for fn in functions:
            fn.__dict__.update(multiplier)
        step, groups = scheduler.last_epoch, scheduler.optimizer.param_groups
        changed = []
        for i, (group, base, fn) in enumerate(zip(groups, base_lrs, scheduler.lr_lambdas)):
            before, group["initial_lr"], group["lr"] = group["lr"], base, base * fn(step)
            if group["lr"] != before:
                changed.append((str(group.get("name", f"group{i}")), before, group["lr"]))
        scheduler.base_lrs = list(base_lrs)
        scheduler._last_lr = [group["lr"] for group in groups]
        if changed:
            lrs = ", ".join(f"{name} {before:.6g} -> {after:.6g}" for name, before, after in changed)
            rank_zero_info(f"resume: the learning-rate schedule follows the config from step {step}: lr {lrs}")
        return changed

    def on_fit_start(self) -> None:
        logger = self.logger
        if logger is None or not self.trainer.is_global_zero or not hasattr(logger.experiment, "add_text"):
            return
        if self.group_table is not None:
            logger.experiment.add_text("optimizer/groups", "```\n" + self.group_table + "\n```", 0)
        digest = getattr(self.trainer.datamodule, "corpus_hash", None)
        if digest is not None:
            logger.experiment.add_text("data/corpus_sha256", digest, 0)


def module_kwargs(run: Any) -> dict[str, Any]:
    """The module's plain-dict arguments from a ``RunConfig``."""
    return {
        "model": dataclasses.asdict(run.model),
        "optimizer": dataclasses.asdict(run.optimizer),
        "schedule": dataclasses.asdict(run.schedule),
        "max_steps": run.trainer.max_steps,
    }
