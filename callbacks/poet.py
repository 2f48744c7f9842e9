"""``POETMerges``: merges a POET model's rotations into W0 on schedule, and watches the orthogonal blocks.

For any LightningModule whose linears were swapped by ``lowrank.apply_poet`` (W = R W0 P) and whose optimizer holds
their generators (``build_optimizer(..., {"name": "poet"})``, or any torch optimizer over them):

* ``on_train_batch_end`` after each optimizer step s (``trainer.global_step`` = s + 1; nothing between the
  micro-batches of an accumulated step): the layers whose merge is due (``lowrank.poet.merge_due``: after steps
  T_m - 1, 2 T_m - 1, ...) merge, W0 <- R W0 P, with new permutations for step s + 1, zeroed generators and their
  optimizer state reset (``lowrank.poet.merge_poet``). Every data-parallel rank does the same, without communication.
  A checkpoint saved at that step already holds the merged weights (Lightning runs checkpoint callbacks last). A merge
  whose rotations are too far from orthogonal (``max_merge_error``) raises ``lowrank.poet.PoetMergeError`` on every
  rank before anything is merged or saved: the last checkpoint stays the last good one.
* logs, every ``trainer.log_every_n_steps`` optimizer steps: ``poet/orthogonality_error`` (max over blocks of
  ||G^T G - I||_2) and ``poet/q_norm_max`` (max ||Q||_2; a warning once it reaches ``warn_q_norm``: the Neumann
  series is valid below 1); at every merge: ``poet/merge_seconds`` and ``poet/spectrum_drift``, over a sample of
  ``sample`` layers the largest change of W's singular values since the run started relative to the largest one,
  max_i |s_i - s_i(0)| / s_1(0) (rotations keep the singular values, so this is the accumulated orthogonality and
  rounding error; Weyl's inequality bounds it by ||W - W(0)'s rotation||_2 / ||W(0)||_2. Relative to each s_i it would
  be ill-conditioned: a square Gaussian W0 has singular values near 0). The initial singular values ride in the
  checkpoint (callback state).

Not with FSDP2 (a merge needs whole rows of W0): refused in ``setup``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from typing_extensions import override

from lowrank.poet import PoetConfig, merge_due, merge_poet, poet_modules
from lowrank.poet_linear import POETLinear
from lowrank.structured import from_mapping

TAGS = ("poet/orthogonality_error", "poet/q_norm_max", "poet/merge_seconds", "poet/spectrum_drift")


class POETMerges(Callback):
    """Merges on ``config``'s schedule and logs the POET metrics (module docstring).

    Args:
        config: the POET settings (``merge_every``, ``stagger``), a :class:`lowrank.poet.PoetConfig` or its fields.
        sample: layers whose singular values are followed (evenly spaced over the POET layers).
        warn_q_norm: warn once when max ||Q||_2 reaches this.
    """

    def __init__(self, config: PoetConfig | Mapping[str, Any], sample: int = 4, warn_q_norm: float = 0.9) -> None:
        self.config = config if isinstance(config, PoetConfig) else from_mapping(PoetConfig, config, "poet")
        problems = self.config.problems("poet")
        if problems:
            raise ValueError("POETMerges: " + "; ".join(problems))
        self.sample, self.warn_q_norm = sample, warn_q_norm
        self.initial: dict[str, torch.Tensor] = {}  # layer name -> singular values of W at the run's start
        self.merges = 0
        self._seen_step: int | None = None
        self._warned = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise ValueError(
                f"POETMerges: {type(trainer.strategy).__name__} shards W0, and a merge needs whole rows of it; "
                "accepted strategies: one device, ddp"
            )

    def _layers(self, pl_module: pl.LightningModule) -> list[tuple[str, POETLinear]]:
        layers = poet_modules(pl_module)
        if not layers:
            raise ValueError(
                "POETMerges: the module holds no POETLinear layer; transform it with lowrank.apply_poet(model, "
                "config, targets, seed) before training"
            )
        return layers

    def _sampled(self, layers: list[tuple[str, POETLinear]]) -> list[tuple[str, POETLinear]]:
        count = min(self.sample, len(layers))
        picks = sorted({round(i * (len(layers) - 1) / max(1, count - 1)) for i in range(count)})
        return [layers[i] for i in picks]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = self._layers(pl_module)
        self._seen_step = trainer.global_step
        if not self.initial:  # a resumed run keeps the run's own start (load_state_dict)
            self.initial = {name: _svdvals(layer) for name, layer in self._sampled(layers)}

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps done
        if step == self._seen_step:
            return  # between the micro-batches of an accumulated step
        self._seen_step = step
        layers = self._layers(pl_module)
        metrics: dict[str, float] = {}
        if step % max(1, trainer.log_every_n_steps) == 0:
            metrics["poet/orthogonality_error"] = max(float(layer.orthogonality_error()) for _, layer in layers)
            q_norm = max(float(layer.q_norm_max()) for _, layer in layers)
            metrics["poet/q_norm_max"] = q_norm
            if q_norm >= self.warn_q_norm and not self._warned:
                self._warned = True
                rank_zero_warn(
                    f"POET: max ||Q||_2 = {q_norm:.3f} at step {step}; the Cayley-Neumann series needs ||Q|| < 1: "
                    "lower optimizer.poet.lr or merge more often (optimizer.poet.merge_every)"
                )
        if any(merge_due(step - 1, self.config, place, len(layers)) for place in range(len(layers))):
            start = time.perf_counter()
            merge_poet(pl_module, trainer.optimizers[0] if trainer.optimizers else None, step, self.config)
            metrics["poet/merge_seconds"] = time.perf_counter() - start
            metrics["poet/spectrum_drift"] = self.spectrum_drift(layers)
            self.merges += 1
        if metrics:
            self._log(trainer, metrics, step)

    def spectrum_drift(self, layers: list[tuple[str, POETLinear]]) -> float:
        """max over the sampled layers of max_i |s_i - s_i(start)| / s_1(start), W's singular values s (descending)."""
        current = dict(layers)
        drifts = [
            float((_svdvals(current[name]) - start).abs().max() / start.max().clamp_min(1e-30))
            for name, start in self.initial.items()
            if name in current
        ]
        return max(drifts, default=0.0)

    @rank_zero_only
    def _log(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"initial": dict(self.initial), "merges": self.merges}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial = dict(state_dict.get("initial", {}))
        self.merges = int(state_dict.get("merges", 0))


def _svdvals(layer: POETLinear) -> torch.Tensor:
    """Singular values of W = R W0 P, float64, on the CPU."""
    return torch.linalg.svdvals(layer.effective_weight(torch.float64)).cpu()
