"""Exact resume in a foreign project needs a resumable data loader: with torchdata's ``StatefulDataLoader`` a run
stopped mid-epoch and resumed repeats the uninterrupted run bit for bit; a plain shuffled ``DataLoader`` resumes
with another order. The documentation says so where it promises exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import lowrank_recipes.callbacks
from lowrank_recipes.callbacks import SubspaceOverlapMonitor, SubspaceResampler
from tests.callbacks.helpers import WARNING_FILTERS, MLPModule, Tap, make_trainer, optimizer_config

pytestmark = [
    *WARNING_FILTERS,
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),  # torchdata's own
]

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS, STOP = 20, 5  # 8 batches per epoch: the stop is mid-epoch, two more epochs follow


def _loader(kind: str) -> DataLoader:
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(64, 12, generator=g), torch.randn(64, 12, generator=g))
    if kind == "stateful":  # its own shuffling generator, which its state holds (a generator= argument is not saved)
        return StatefulDataLoader(data, batch_size=8, shuffle=True)
    return DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))


class _Recorder(Tap):
    """Keeps every step's loss (a refresh subscriber too, so that the refreshes run as in a real run)."""

    def __init__(self) -> None:
        super().__init__(lambda *args: None)
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        self.losses[trainer.global_step - 1] = float(outputs["loss"])


def _run(root: Path, kind: str, max_steps: int, ckpt_path: str | None = None, every: int | None = None):
    torch.manual_seed(7)
    module = MLPModule(optimizer_config(update_gap=3, selector="importance"))
    recorder = _Recorder()
    callbacks = [SubspaceResampler(), SubspaceOverlapMonitor(image_interval=None), recorder]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1))
    trainer = make_trainer(root, max_steps, callbacks, enable_checkpointing=bool(every))
    trainer.fit(module, _loader(kind), ckpt_path=ckpt_path)
    return module, recorder.losses


def _stop_and_resume(root: Path, kind: str):
    full, full_losses = _run(root / "full", kind, MAX_STEPS)
    _, first = _run(root / "stop", kind, STOP, every=STOP)
    (ckpt,) = (root / "stop" / "ckpt").glob("*.ckpt")
    torch.manual_seed(123)  # another process state at resume
    resumed, second = _run(root / "resume", kind, MAX_STEPS, ckpt_path=str(ckpt))
    return full, full_losses, resumed, {**first, **second}


def test_stateful_loader_resumes_bit_exactly(tmp_path: Path) -> None:
    full, full_losses, resumed, losses = _stop_and_resume(tmp_path, "stateful")
    assert losses == full_losses and sorted(losses) == list(range(MAX_STEPS))
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_plain_shuffled_loader_resumes_with_another_order(tmp_path: Path) -> None:
    _, full_losses, _, losses = _stop_and_resume(tmp_path, "plain")
    assert [losses[s] for s in range(STOP)] == [full_losses[s] for s in range(STOP)]
    assert max(abs(losses[s] - full_losses[s]) for s in range(STOP, MAX_STEPS)) > 1e-3


def test_the_documentation_says_so_where_it_promises_exact_resume() -> None:
    readme = (ROOT / "README.md").read_text()
    for text in (readme, lowrank_recipes.callbacks.__doc__, (ROOT / "docs" / "design.md").read_text()):
        assert "StatefulDataLoader" in text and "DataLoader" in text
    assert "0.235" in readme
