"""The monitor by module type on foreign models: GPT-2's two c_proj modules stay apart (tags and heatmap cells), and
grouped-query attention's k/v projections get their own chance level in the picture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import lowrank
from lowrank_recipes.callbacks import SubspaceOverlapMonitor, SubspaceResampler
from lowrank_recipes.callbacks import overlap_monitor as monitor_module
from tests.callbacks.helpers import WARNING_FILTERS, RecordingLogger, RecordTap, Tap, make_trainer, regression_loader

pytestmark = WARNING_FILTERS

WIDTH, RANK = 16, 4


class _Module(nn.Module):
    """A container whose children are given by keyword."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


class _Regressor(pl.LightningModule):
    """MSE regression with the low-rank optimizer of ``optimizer`` (subclasses build the layers and ``forward``)."""

    def __init__(self, optimizer: dict[str, Any]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.optimizer_config = optimizer

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return lowrank.build_optimizer(self, self.optimizer_config)


class TinyGPT2(_Regressor):
    """GPT-2's naming: ``h.<i>.attn.c_attn/c_proj``, ``h.<i>.mlp.c_fc/c_proj`` (plain Linear layers here)."""

    def __init__(self, optimizer: dict[str, Any]) -> None:
        super().__init__(optimizer)
        self.h = nn.ModuleList(
            _Module(
                attn=_Module(c_attn=nn.Linear(WIDTH, 3 * WIDTH), c_proj=nn.Linear(WIDTH, WIDTH)),
                mlp=_Module(c_fc=nn.Linear(WIDTH, 2 * WIDTH), c_proj=nn.Linear(2 * WIDTH, WIDTH)),
            )
            for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.h:
            q, k, v = block.attn.c_attn(x).chunk(3, dim=-1)
            x = x + block.attn.c_proj(torch.tanh(q) * k + v)
            x = x + block.mlp.c_proj(torch.relu(block.mlp.c_fc(x)))
        return x


class TinyGQA(_Regressor):
    """Grouped-query attention's shapes: q and o are (16, 16), k and v (8, 16) (half as many key/value heads)."""

    def __init__(self, optimizer: dict[str, Any]) -> None:
        super().__init__(optimizer)
        self.layers = nn.ModuleList(
            _Module(
                q_proj=nn.Linear(WIDTH, WIDTH, bias=False),
                k_proj=nn.Linear(WIDTH, WIDTH // 2, bias=False),
                v_proj=nn.Linear(WIDTH, WIDTH // 2, bias=False),
                o_proj=nn.Linear(WIDTH, WIDTH, bias=False),
            )
            for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
            x = x + layer.o_proj(torch.tanh(q) * (k * v).repeat(1, 2))  # each key/value head serves two queries
        return x


def _config(targets: list[str], update_gap: int = 1) -> dict[str, Any]:
    return {
        "name": "lowrank",
        "lr": 1e-2,
        "lowrank": {"rank": RANK, "targets": targets, "selector": "random"},
        "refresh": {"update_gap": update_gap},
    }


def _captured_pictures(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replaces the monitor's renderer: records its arguments, returns a blank picture."""
    calls: list[dict[str, Any]] = []

    def fake(cells: Any, history: Any, chances: Any, step: int) -> Any:
        calls.append({"cells": dict(cells), "history": list(history), "chances": chances, "step": step})
        return torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()

    monkeypatch.setattr(monitor_module, "render_overlap_figure", fake)
    return calls


def _overlap(old: torch.Tensor, new: torch.Tensor) -> float:
    """Float64 oracle: ||B_old^T B_new||_F^2 / r."""
    return float((old.double().T @ new.double()).square().sum() / old.shape[1])


def test_gpt2_c_proj_modules_get_their_own_tags_and_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pictures = _captured_pictures(monkeypatch)
    module = TinyGPT2(_config(["c_attn", "c_proj", "c_fc"]))
    logger, tap = RecordingLogger(with_images=True), RecordTap()
    callbacks = [SubspaceResampler(), SubspaceOverlapMonitor(image_interval=2), Tap(tap)]
    make_trainer(tmp_path, 4, callbacks, logger).fit(module, regression_loader(width=WIDTH))

    # Oracle: the latest overlap of every weight, from the bases the optimizer reported, by module path.
    latest: dict[str, float] = {}
    for (step, name, _, new, _), old in zip(tap.rows, tap.old_bases):
        if old is not None and step <= 3:
            latest[name] = _overlap(old, new)
    at3 = logger.at(3)
    for kind in ("attn.c_proj", "mlp.c_proj", "attn.c_attn", "mlp.c_fc"):
        values = [v for n, v in latest.items() if f".{kind}." in n]
        label = kind if kind.endswith("c_proj") else kind.split(".")[1]  # c_attn and c_fc are unique leaves
        assert at3[f"lowrank/overlap/{label}"] == pytest.approx(sum(values) / len(values), abs=1e-6), label
    assert "lowrank/overlap/c_proj" not in at3
    assert at3["lowrank/overlap_chance/mlp.c_proj"] == pytest.approx(RANK / WIDTH)  # (16, 32): left, d = 16

    cells = pictures[-1]["cells"]
    for block in (0, 1):
        for kind in ("attn.c_proj", "mlp.c_proj"):
            name = f"h.{block}.{kind}.weight"
            assert cells[(f"h.{block}", kind)] == pytest.approx(latest[name], abs=1e-6), name
    assert len(cells) == 8  # 2 blocks x 4 module types: nothing overwritten


def test_gqa_picture_gets_each_module_types_chance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pictures = _captured_pictures(monkeypatch)
    module = TinyGQA(_config(["q_proj", "k_proj", "v_proj", "o_proj"]))
    logger = RecordingLogger(with_images=True)
    make_trainer(tmp_path, 3, [SubspaceResampler(), SubspaceOverlapMonitor(image_interval=1)], logger).fit(
        module, regression_loader(width=WIDTH)
    )
    # Oracle from the shapes: side auto projects on the smaller dimension, d = min(m, n); chance r / d.
    expected = {"q_proj": RANK / 16, "k_proj": RANK / 8, "v_proj": RANK / 8, "o_proj": RANK / 16}
    assert pictures and pictures[-1]["chances"] == pytest.approx(expected)


def _dashed_levels(figure: Any) -> dict[str, float]:
    """label -> y of every horizontal dashed line of the curves panel."""
    (curves,) = [ax for ax in figure.axes if ax.get_title() == "mean overlap by module type"]
    return {
        line.get_label(): float(line.get_ydata()[0])
        for line in curves.get_lines()
        if line.get_linestyle() == "--" and len(set(line.get_ydata())) == 1
    }


def test_figure_draws_each_types_chance_level() -> None:
    from lowrank_recipes.callbacks.overlap_figure import overlap_figure

    cells = {("layers.0", kind): 0.5 for kind in ("q_proj", "k_proj", "v_proj", "o_proj")}
    history = [(1, {"q_proj": 0.3, "k_proj": 0.6, "v_proj": 0.55, "o_proj": 0.35})]
    chances = {"q_proj": 0.25, "k_proj": 0.5, "v_proj": 0.5, "o_proj": 0.25}
    levels = _dashed_levels(overlap_figure(cells, history, chances, 1))
    assert levels == {f"chance {kind} = {value:.3f}": value for kind, value in chances.items()}
    # One shared level: a single grey line.
    same = _dashed_levels(overlap_figure(cells, history, dict.fromkeys(chances, 0.25), 1))
    assert same == {"chance r/d = 0.250": 0.25}
