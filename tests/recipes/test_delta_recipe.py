"""The ``delta`` section through the recipe: a fine-tuning run (``model.init_from`` a base run, only o_proj and its
companions trainable) logs per-module change against its start; frozen module types log exactly 0, the o_proj
change equals an independent float64 computation from the two checkpoints, and the heatmap image is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lowrank_recipes.recipes.config import ConfigError, load_run_config
from lowrank_recipes.recipes.pretrain import main

from .test_pretrain import TINY

pytestmark = [
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k: v.double() for k, v in state.items() if k.startswith("model.")}


@pytest.mark.slow
def test_a_fine_tuning_run_logs_module_change_against_its_start(tmp_path: Path) -> None:
    base = tmp_path / "base"
    assert main([*TINY, "optimizer.name=adamw", "trainer.max_steps=4", f"out_dir={base}"]) == 0
    tuned = tmp_path / "tuned"
    start = base / "checkpoints" / "last.ckpt"
    overrides = [*TINY, "optimizer.name=adamw", f"model.init_from={start}", "model.trainable=[sfn_oproj]"]
    assert main([*overrides, "trainer.max_steps=4", "delta.every_n_steps=2", f"out_dir={tuned}"]) == 0
    events = EventAccumulator(str(tuned / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert sorted(scalars["delta/o_proj/relative_l2"]) == [2, 4]
    for kind in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"):
        assert scalars[f"delta/{kind}/l2"][4] == 0.0, kind  # frozen: no change at all
    a, b = _weights(start), _weights(tuned / "checkpoints" / "last.ckpt")
    keys = [k for k in a if k.endswith("o_proj.weight")]
    change = sum(float((b[k] - a[k]).pow(2).sum()) for k in keys) ** 0.5
    reference = sum(float(a[k].pow(2).sum()) for k in keys) ** 0.5
    assert change > 0
    assert scalars["delta/o_proj/relative_l2"][4] == pytest.approx(change / reference, rel=1e-5)
    assert "delta/heatmap" in events.Tags()["images"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["delta.snapshot_dtype=fp8"], r"delta.snapshot_dtype: invalid value 'fp8'; accepted: float32 \| bfloat16"),
        (["optimizer.name=poet"], r"delta.every_n_steps: not supported with optimizer.name=poet .* accepted with poet"),
        (["delta.reference=/nonexistent.ckpt"], r"delta.reference: invalid value '/nonexistent.ckpt' \(no such file\)"),
    ],
)
def test_bad_delta_settings_are_refused_by_key(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_run_config("default", [*TINY, "delta.every_n_steps=2", *overrides, f"out_dir={tmp_path / 'r'}"])
    assert not (tmp_path / "r").exists()
