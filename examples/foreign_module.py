"""Low-rank training with subspace monitoring on a LightningModule that knows nothing of this project.

Three lines make the difference: build the optimizer with ``lowrank.build_optimizer`` in ``configure_optimizers``
(its config's ``refresh`` section says when the subspaces refresh) and add ``SubspaceResampler()`` and
``SubspaceOverlapMonitor()`` to the Trainer's callbacks. Runs in seconds on a CPU; open the TensorBoard logs it
prints to see ``lowrank/overlap/*`` and the ``lowrank/overlap_heatmap`` picture::

    python examples/foreign_module.py [--out DIR] [--selector NAME]   # any name of lowrank.SELECTORS
"""

from __future__ import annotations

import argparse
import tempfile

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lowrank
from lowrank_recipes.callbacks import SubspaceOverlapMonitor, SubspaceResampler


class MLP(pl.LightningModule):
    """A two-layer MLP regressor; its weights are called ``fc1.weight`` and ``fc2.weight``."""

    def __init__(self, selector: str, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.selector = selector
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # (1) the low-rank optimizer: rank-8 projections of fc1/fc2, plain AdamW for the biases, and its refresh
        # schedule: every 10 steps, the two layers on alternating steps (stagger 2).
        config = {
            "name": "lowrank",
            "lr": 1e-2,
            "lowrank": {"rank": 8, "targets": ["fc1", "fc2"], "selector": self.selector},
            "refresh": {"update_gap": 10, "stagger": 2},
        }
        optimizer = lowrank.build_optimizer(self, config)
        print(optimizer.group_table)
        return optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="log directory (default: a fresh temporary directory)")
    parser.add_argument("--selector", default="dominant", choices=sorted(lowrank.SELECTORS))
    parser.add_argument("--max-steps", type=int, default=200)
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="lowrank-foreign-")

    torch.set_num_threads(1)  # matrices this small run faster on one thread than on several competing ones
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 32))  # a target worth learning
    x = torch.randn(2048, 32)
    with torch.no_grad():
        y = teacher(x)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.max_steps,
        log_every_n_steps=10,
        logger=TensorBoardLogger(out, name="foreign_module"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        # (2) and (3): the resampler runs (and times) the optimizer's scheduled refreshes; the monitor logs them.
        callbacks=[SubspaceResampler(), SubspaceOverlapMonitor(image_interval=5)],
    )
    trainer.fit(MLP(args.selector), loader)
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}
    print(f"final metrics: {metrics}")
    print(f"TensorBoard logs: tensorboard --logdir {trainer.logger.log_dir}")


if __name__ == "__main__":
    main()
