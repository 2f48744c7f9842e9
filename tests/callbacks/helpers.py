"""Small foreign LightningModules, a recording logger and a Trainer factory for the callback tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lowrank
from lowrank_recipes.callbacks import RefreshSubscriber

TAG = "lowrank/"

# Lightning's notes about tiny data sets and its own deprecations are noise in these tests.
WARNING_FILTERS = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]


class FakeExperiment:
    """Stands in for TensorBoard's SummaryWriter: records ``add_image`` calls."""

    def __init__(self) -> None:
        self.images: list[tuple[str, Any, int, str]] = []

    def add_image(self, tag: str, image: Any, global_step: int, dataformats: str = "CHW") -> None:
        self.images.append((tag, image, global_step, dataformats))


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call; ``with_images`` gives it an experiment with ``add_image``."""

    def __init__(self, with_images: bool = False) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []
        self._experiment = FakeExperiment() if with_images else object()

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> str:
        return "0"

    @property
    def experiment(self) -> Any:
        return self._experiment

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    # ---- views used by the asserts
    def lowrank_calls(self) -> list[tuple[int | None, dict[str, float]]]:
        return [
            (step, {k: v for k, v in m.items() if k.startswith(TAG)})
            for step, m in self.calls
            if any(k.startswith(TAG) for k in m)
        ]

    def steps(self, tag: str) -> list[int | None]:
        return [step for step, metrics in self.calls if tag in metrics]

    def values(self, tag: str) -> list[float]:
        return [metrics[tag] for _, metrics in self.calls if tag in metrics]

    def at(self, step: int, prefix: str = TAG) -> dict[str, float]:
        out: dict[str, float] = {}
        for s, metrics in self.calls:
            if s == step:
                out.update({k: v for k, v in metrics.items() if k.startswith(prefix)})
        return out


def optimizer_config(
    rank: int = 4,
    update_gap: int = 3,
    selector: str = "importance",
    targets: Sequence[str] = ("fc1", "fc2"),
    lr: float = 1e-2,
    stagger: int = 1,
    switch_at: float | None = None,
    switch_to: str | None = None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """The optimizer section of a low-rank run: ``lowrank`` (what is projected, how) and ``refresh`` (when bases
    refresh: the optimizer's ``RefreshSchedule``)."""
    refresh: dict[str, Any] = {"update_gap": update_gap, "stagger": stagger}
    if switch_at is not None or switch_to is not None:
        refresh.update(switch_at=switch_at, switch_to=switch_to)
    if max_steps is not None:
        refresh["max_steps"] = max_steps
    return {
        "name": "lowrank",
        "lr": lr,
        "lowrank": {"rank": rank, "targets": list(targets), "selector": selector},
        "refresh": refresh,
    }


class Block(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class MLPModule(pl.LightningModule):
    """A foreign model: ``fc1.weight``/``fc2.weight`` (blocks=0), or ``layers.<i>.fc1.weight``... (blocks > 0)."""

    def __init__(self, optimizer: dict[str, Any], width: int = 12, hidden: int = 32, blocks: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.optimizer_config = optimizer
        if blocks:
            self.layers = nn.ModuleList(Block(width, hidden) for _ in range(blocks))
        else:
            self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "layers"):
            for layer in self.layers:
                x = layer(x)
            return x
        return self.fc2(torch.tanh(self.fc1(x)))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return lowrank.build_optimizer(self, self.optimizer_config)


class FixedGradModule(pl.LightningModule):
    """loss = s * (<fc1.weight, G1> + <fc2.weight, G2>) with s the batch's scalar: the gradient of each weight is
    G times the mean of s over the accumulated micro-batches, whatever the weights are."""

    def __init__(self, optimizer: dict[str, Any], shape: tuple[int, int] = (16, 12)) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.optimizer_config = optimizer
        self.fc1 = nn.Linear(shape[1], shape[0], bias=False)
        self.fc2 = nn.Linear(shape[0], shape[1], bias=False)
        self.register_buffer("g1", torch.randn(shape, generator=g))
        self.register_buffer("g2", torch.randn(shape[::-1], generator=g))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        s = batch[0].sum()
        return s * ((self.fc1.weight * self.g1).sum() + (self.fc2.weight * self.g2).sum())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return lowrank.build_optimizer(self, self.optimizer_config)


def regression_loader(width: int = 12, samples: int = 8, batch_size: int = 8) -> DataLoader:
    """Fixed random regression data; with the defaults one batch per epoch, the same batch every step."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(samples, width, generator=g), torch.randn(samples, width, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def scalar_loader(values: Sequence[float]) -> DataLoader:
    return DataLoader(TensorDataset(torch.tensor(values, dtype=torch.float32)), batch_size=1, shuffle=False)


def make_trainer(
    root: Path, max_steps: int, callbacks: list[pl.Callback], logger: Logger | bool = False, **kwargs: Any
) -> pl.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
        **kwargs,
    )


class RecordTap:
    """A refresh listener ``(trainer, pl_module, records)`` that keeps (step, name, selector, new basis, overlap) of
    every refreshed parameter, and the parameter's gradient where it still exists when the listener runs.

    Listeners run at the end of the optimizer step, before Lightning's next ``zero_grad`` (which it calls before the
    next backward): in an ordinary run the gradient is the one the step (and its refresh) used. Under per-layer updates
    the gradients are freed inside backward: no gradient is kept then."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, str, str, torch.Tensor, float | None]] = []
        self.old_bases: list[torch.Tensor | None] = []
        self.grads: dict[tuple[int, str], torch.Tensor] = {}

    def __call__(self, trainer: pl.Trainer, pl_module: pl.LightningModule, records: list) -> None:
        params = dict(pl_module.named_parameters())
        for r in records:
            self.rows.append((r.step, r.name, r.selector, r.new_basis.clone(), r.overlap))
            self.old_bases.append(r.old_basis)
            grad = params[r.name].grad
            if grad is not None:
                self.grads[(r.step, r.name)] = grad.clone()

    def steps(self) -> list[int]:
        return sorted({row[0] for row in self.rows})

    def names_at(self, step: int) -> list[str]:
        return [row[1] for row in self.rows if row[0] == step]


class Tap(RefreshSubscriber):
    """Attaches a :class:`RecordTap` (or any ``(trainer, pl_module, records)`` listener) to the run's optimizer."""

    def __init__(self, listener: Callable[[pl.Trainer, pl.LightningModule, list], Any] | None = None) -> None:
        super().__init__()
        self.listener = listener if listener is not None else RecordTap()

    def on_refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule, records: list) -> None:
        self.listener(trainer, pl_module, records)
