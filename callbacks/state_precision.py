"""``OptimizerStatePrecision``: keeps the optimizer-state precision (fp32 | bf16 | 8bit) consistent across
strategies and checkpoints.

The precision itself is chosen when the optimizer is built (``optimizer.state_precision`` in the config,
``lowrank.build_optimizer``); this callback

* checks at ``setup`` that the strategy can hold such states: bf16 and 8-bit moments are plain tensors, fine on a
  single device and under DDP (every rank holds the same replicated state); sharded strategies (FSDP2 through
  ``ModelParallelStrategy``, FSDP1, DeepSpeed) get a clear error for bf16 / 8bit;
* converts, in ``on_load_checkpoint``, a full (non-sharded) checkpoint saved with another precision to this run's
  precision before Lightning loads it into the optimizer (the run's precision wins). The compact optimizers also
  convert on load; the conversion here is what lets an fp32 run (torch's AdamW, which only reads float moments)
  resume from a bf16 or 8-bit checkpoint. A sharded checkpoint (a directory) with another precision is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lowrank.moment_storage import ADAM_MOMENTS, convert_state, stored_precision

SUPPORTED = {
    "fp32": "every strategy this project supports",
    "bf16": "single device and DDP",
    "8bit": "single device and DDP",
}


def optimizer_precision(optimizer: torch.optim.Optimizer) -> str:
    """The state precision an optimizer was built with (``fp32`` for torch's own optimizers)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the real one
    precisions = {group.get("state_precision", "fp32") for group in optimizer.param_groups}
    return precisions.pop() if len(precisions) == 1 else "fp32"


def _is_sharded(strategy: pl.strategies.Strategy) -> bool:
    name = type(strategy).__name__
    return any(key in name for key in ("ModelParallel", "FSDP", "DeepSpeed"))


class OptimizerStatePrecision(Callback):
    """Checks the strategy for the optimizer's state precision and converts resumed states to it.

    Lightning calls ``on_load_checkpoint`` before the optimizers exist (except for strategies that restore after
    setup), and loads the optimizer states after ``on_fit_start``: the checkpoint is kept until ``on_fit_start`` and
    converted there, in place, before Lightning reads it.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            precision = optimizer_precision(optimizer)
            if precision != "fp32" and _is_sharded(trainer.strategy):
                raise MisconfigurationException(
                    f"optimizer.state_precision={precision!r} is not supported with {type(trainer.strategy).__name__}: "
                    f"bf16 / 8-bit optimizer states are supported on {SUPPORTED[precision]}; use "
                    "optimizer.state_precision=fp32 with a sharded strategy"
                )
        if self._pending is not None:
            self._convert(trainer, self._pending)
            self._pending = None

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.optimizers:
            self._convert(trainer, checkpoint)
        else:
            self._pending = checkpoint

    def _convert(self, trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("optimizer_states")
        if not saved:
            return
        ckpt_path = getattr(trainer, "ckpt_path", None)
        for optimizer, state_dict in zip(trainer.optimizers, saved):
            target = optimizer_precision(optimizer)
            found = {
                stored_precision(entry, key)
                for entry in state_dict["state"].values()
                for key in ADAM_MOMENTS
                if key in entry
            }
            if not found or found <= {target} or target != "fp32":
                continue  # already in this run's precision, or a compact optimizer that converts on load itself
            if ckpt_path is not None and Path(ckpt_path).is_dir():
                raise MisconfigurationException(
                    f"checkpoint {ckpt_path} is sharded and holds {sorted(found)} optimizer states; this run uses "
                    f"{target!r}: resume with optimizer.state_precision={sorted(found)[0]} (a sharded "
                    "checkpoint cannot be converted)"
                )
            params = [p for group in optimizer.param_groups for p in group["params"]]
            for index, entry in list(state_dict["state"].items()):
                dtype = params[int(index)].dtype
                state_dict["state"][index] = convert_state(entry, "fp32", dtype=dtype)
