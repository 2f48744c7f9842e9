"""``model.compile: true`` in the recipe: each decoder block compiled in place. The losses follow the uncompiled run
(fp32 tolerance: compiled kernels may sum in another order), the checkpoints hold the same keys, and a compiled run
stopped after 4 steps resumes uncompiled (and back) to the uncompiled run's weights. Marked slow: compilation."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lowrank_recipes.recipes.config import load_run_config
from lowrank_recipes.recipes.trainer import fit

from .test_pretrain import TINY

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
    pytest.mark.filterwarnings("ignore:When using the `ThroughputMonitor`, you need to define a `flops_per_batch`"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

RUN = [*TINY, "trainer.max_steps=8", "optimizer.refresh.update_gap=3", "trainer.checkpoint_every_n_steps=4"]


class _Record(pl.Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: list[float] = []
        self.compiled: list[bool] = []
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.compiled = [layer._compiled_call_impl is not None for layer in pl_module.model.layers]
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


def _fit(out: Path, *overrides: str, stop_at: int | None = None) -> _Record:
    record = _Record(stop_at)
    run, resolved = load_run_config("default", [*RUN, f"out_dir={out}", *overrides])
    fit(run, resolved, callbacks=[record])
    return record


def _last(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_compiled_blocks_train_like_the_eager_run_and_resume_either_way(tmp_path):
    eager = _fit(tmp_path / "eager")
    compiled = _fit(tmp_path / "compiled", "model.compile=true")
    assert eager.compiled == [False, False] and compiled.compiled == [True, True]
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=1e-4, atol=1e-5)
    expected = _last(tmp_path / "eager")
    assert _last(tmp_path / "compiled").keys() == expected.keys()  # no _orig_mod. prefix
    for first, then in (("true", "false"), ("false", "true")):
        out = tmp_path / f"switch-{first}"
        _fit(out, f"model.compile={first}", stop_at=4)
        resumed = _fit(out, f"model.compile={then}", "resume=auto")
        assert resumed.compiled == [then == "true"] * 2 and len(resumed.losses) == 4
        for key, value in _last(out).items():
            torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5, msg=(first, key))
