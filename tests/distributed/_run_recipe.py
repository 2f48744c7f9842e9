"""Test-only launcher: runs the pretraining recipe (``lowrank_recipes.recipes.trainer.fit``) with a recording callback.

    python tests/distributed/_run_recipe.py [--stop-at N] [--record DIR] key=value ...

Takes the same ``key=value`` overrides as ``recipes/pretrain.py`` (config ``default``). Lightning's DDP launcher
re-executes this same script with the same argv for the other ranks, so every rank records. Files written:

* ``out_dir/record/losses-rank{r}.json``: ``{step: global mean loss}`` per optimizer step (1-based), the mean over
  every micro-batch of every rank of that step (``outputs["loss"]`` is the micro-batch loss divided by the
  accumulation count, so their sum over a step is the per-rank mean; ``trainer.strategy.reduce`` then averages
  over ranks). A resumed run writes only the steps it ran.
* ``out_dir/record/rank{r}.pt`` at the end of training: this rank's ``lowrank_basis`` tensors (by parameter name),
  its model ``state_dict`` and ``global_step``, plus ``local_shapes``: the local shard shape of every DTensor
  parameter (FSDP2; empty otherwise). DTensors (FSDP2 weights, bases) are recorded as full tensors.

``--stop-at N`` sets ``trainer.should_stop`` once N optimizer steps are done (a "kill" that still writes the
checkpoints of the steps run so far); ``--record DIR`` writes the records to ``out_dir/DIR`` instead of
``out_dir/record`` (a resumed run then keeps the first part's).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.distributed.tensor import DTensor

from lowrank_recipes.recipes.config import load_run_config
from lowrank_recipes.recipes.trainer import fit


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain copy of a tensor; a DTensor is gathered first (a collective: every rank calls it in the same order)."""
    tensor = tensor.detach()
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).clone()


class RecordRun(pl.Callback):
    """Records the global per-step loss, and each rank's final bases and weights, to the folder ``record``."""

    def __init__(self, record: Path, stop_at: int | None = None) -> None:
        self.record, self.stop_at = record, stop_at
        self.losses: dict[int, float] = {}
        self._step_sum: torch.Tensor | None = None
        self._steps_before = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._step_sum is None:
            self._step_sum = torch.zeros((), dtype=torch.float64)
            self._steps_before = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._step_sum += outputs["loss"].detach().double().cpu()  # already divided by the accumulation count
        if trainer.global_step == self._steps_before:  # mid-accumulation: no optimizer step yet
            return
        mean = trainer.strategy.reduce(self._step_sum.clone(), reduce_op="mean")  # over ranks
        self.losses[trainer.global_step] = float(mean)
        self._step_sum = None
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = self.record
        record.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        names = {id(p): n for n, p in pl_module.named_parameters()}
        state = trainer.optimizers[0].state
        bases = {names[id(p)]: _full(s["lowrank_basis"]) for p, s in state.items() if "lowrank_basis" in s}
        weights = {k: _full(v) for k, v in pl_module.state_dict().items()}
        local_shapes = {n: list(p.to_local().shape) for n, p in pl_module.named_parameters() if isinstance(p, DTensor)}
        torch.save(
            {"bases": bases, "weights": weights, "global_step": trainer.global_step, "local_shapes": local_shapes},
            record / f"rank{rank}.pt",
        )
        (record / f"losses-rank{rank}.json").write_text(json.dumps(self.losses))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--record", default="record", help="subfolder of out_dir for the records")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run, resolved = load_run_config("default", args.overrides)
    return fit(run, resolved, callbacks=[RecordRun(Path(run.out_dir) / args.record, args.stop_at)])


if __name__ == "__main__":
    sys.exit(main())
