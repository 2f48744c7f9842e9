"""One training run of ``bench/quality.py``: the recipe's own ``fit`` with a callback that records what it measures.

Kept apart from the orchestration so that worker processes (``--jobs``) import only this and the recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lowrank import LowRankOptimizer, RefreshRecord
from lowrank.overlap import overlap_metrics
from lowrank_recipes.callbacks.subscriber import RefreshSubscriber


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run: a method at a learning rate and seed, and every recipe override it needs (out_dir excluded).

    Attributes:
        method: the row of the results table (``galore``, ``adamw``, ...).
        lr: ``optimizer.lr`` (the plain group's; low-rank weights move by lr * alpha).
        seed: the run seed (model init, data order, subspace draws).
        phase: ``sweep`` (learning-rate sweep), ``seeds`` (extra seeds at the best lr) or ``randomized``.
        overrides: ``key=value`` overrides of configs/default.yaml, lr and seed included.
    """

    method: str
    lr: float
    seed: int
    phase: str
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.method}-lr{self.lr:g}-s{self.seed}"


class QualityRecorder(RefreshSubscriber):
    """Records validation loss and perplexity at every validation and, for a low-rank run, the overlap of every refresh
    (mean over the refreshed matrices, their mean chance level r/d and the mean per module type).

    The overlaps come from the run's ``LowRankOptimizer`` (a refresh listener registered in ``on_fit_start``, whoever
    runs the refreshes: the ``SubspaceResampler`` or per-layer updates), aggregated by
    :func:`lowrank.overlap.overlap_metrics`, as ``SubspaceOverlapMonitor`` aggregates what it logs to TensorBoard
    (here over the weights of each refresh only).
    """

    def __init__(self) -> None:
        super().__init__()
        self.validations: list[dict[str, float]] = []
        self.refreshes: list[dict[str, Any]] = []
        self.train_sequences: int | None = None  # of the training set (map-style sources), for the epochs read

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        train_set = getattr(trainer.datamodule, "train_set", None)
        if train_set is not None and hasattr(train_set, "__len__"):
            self.train_sequences = len(train_set)
        # A full-rank (AdamW) run has no refreshes to hear, and RefreshSubscriber refuses an optimizer that is not a
        # LowRankOptimizer: listen only to low-rank runs (validations are recorded either way).
        if any(isinstance(optimizer, LowRankOptimizer) for optimizer in trainer.optimizers):
            super().on_fit_start(trainer, pl_module)

    @override
    def on_refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule, records: list[RefreshRecord]) -> None:
        metrics = overlap_metrics({r.name: (r.overlap, r.chance) for r in records if r.overlap is not None})
        if not metrics:  # the first refresh has no previous basis
            return
        prefix = "lowrank/overlap/"
        self.refreshes.append(
            {
                "step": max(r.step for r in records),  # the refresh step
                "overlap": metrics[prefix + "mean"],
                "chance": metrics["lowrank/overlap_chance/mean"],
                "by_type": {
                    key[len(prefix) :]: value
                    for key, value in metrics.items()
                    if key.startswith(prefix) and key != prefix + "mean"
                },
            }
        )

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        loss = float(metrics["val/loss"])
        ppl = float(metrics["val/ppl"]) if "val/ppl" in metrics else math.exp(loss)
        self.validations.append({"step": trainer.global_step, "loss": loss, "ppl": ppl})


def _quiet_lightning() -> None:
    """Keeps the per-run start-up chatter (resolved config, device summary) out of the benchmark's output."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_one(spec: RunSpec, work_dir: str, threads: int, config: str = "default") -> dict[str, Any]:
    """Runs the recipe (``config`` plus ``spec.overrides``) with outputs (TensorBoard, checkpoints, log) under
    ``work_dir/<run name>``.

    Returns the run's record: the spec, wall seconds, the validation curve, the refresh overlaps and the final
    validation loss and perplexity (the last validation, at ``trainer.max_steps``); ``error`` when it failed.
    """
    from lowrank_recipes.recipes.config import load_run_config
    from lowrank_recipes.recipes.trainer import fit

    torch.set_num_threads(threads)
    _quiet_lightning()
    out = Path(work_dir) / spec.name
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {**dataclasses.asdict(spec), "name": spec.name, "threads": threads}
    recorder = QualityRecorder()
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            run, resolved = load_run_config(config, [*spec.overrides, f"out_dir={out}", "resume=never"])
            fit(run, resolved, [recorder])
        except Exception as err:  # noqa: BLE001 - one failed run is reported, the benchmark goes on
            record["error"] = f"{type(err).__name__}: {err}"
    record["seconds"] = time.perf_counter() - start
    record["validations"] = recorder.validations
    record["refreshes"] = recorder.refreshes
    record["train_sequences"] = recorder.train_sequences
    last = recorder.validations[-1] if recorder.validations else None
    record["final_loss"] = None if last is None else last["loss"]
    record["final_ppl"] = None if last is None else last["ppl"]
    if last is None and "error" not in record:
        record["error"] = f"no validation recorded (see {out / 'log.txt'})"
    return record
