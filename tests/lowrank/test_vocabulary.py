"""GaLore's vocabulary (keys scale / proj_type / update_proj_gap; galore, golore, sara, fira as selector or optimizer
names) gets this project's word in the error, wherever it is given."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank import LowRankOptimizer, RefreshSchedule, make_selector, optimizer_config_from_dict


def _low(**lowrank) -> dict:
    return {"name": "lowrank", "lowrank": {"rank": 2, "targets": ["q_proj"], **lowrank}}


@pytest.mark.parametrize(
    "config,needles",
    [
        (_low(scale=0.25), ["optimizer.lowrank.scale", "optimizer.lowrank.alpha"]),
        (_low(galore_scale=0.25), ["optimizer.lowrank.galore_scale", "optimizer.lowrank.alpha"]),
        (_low(update_proj_gap=200), ["optimizer.lowrank.update_proj_gap", "optimizer.refresh.update_gap"]),
        (_low(proj_type="std"), ["optimizer.lowrank.proj_type", "optimizer.lowrank.side", "std is side auto"]),
        ({**_low(), "scale": 0.25}, ["optimizer.scale", "optimizer.lowrank.alpha"]),
        ({**_low(), "update_proj_gap": 200}, ["optimizer.update_proj_gap", "optimizer.refresh.update_gap"]),
        ({**_low(), "proj_type": "std"}, ["optimizer.proj_type", "optimizer.lowrank.side"]),
        (
            {**_low(), "refresh": {"update_proj_gap": 200}},
            ["optimizer.refresh.update_proj_gap", "optimizer.refresh.update_gap"],
        ),
        (_low(selector="galore"), ["optimizer.lowrank.selector", "'galore' is dominant"]),
        (_low(selector="GaLore"), ["optimizer.lowrank.selector", "'GaLore' is dominant"]),
        (_low(selector="sara"), ["optimizer.lowrank.selector", "'sara' is importance"]),
        (_low(selector="golore"), ["'golore' is random", "switch_at 0.5", "switch_to random"]),
        (_low(selector="fira"), ["'fira' is not a selector", "optimizer.lowrank.fira: true"]),
        (
            {**_low(), "refresh": {"switch_at": 0.5, "switch_to": "golore"}},
            ["optimizer.refresh.switch_to", "'golore' is random"],
        ),
        (
            _low(selector_options={"sara": {}}),
            ["optimizer.lowrank.selector_options.sara", "'sara' is importance"],
        ),
        ({**_low(), "name": "galore"}, ["optimizer.name", "'galore' is name: lowrank", "selector: dominant"]),
        ({**_low(), "name": "galore_adamw8bit"}, ["'galore_adamw8bit' is name: lowrank", "state_precision: 8bit"]),
        ({**_low(), "name": "sara"}, ["optimizer.name", "name: lowrank", "selector: importance"]),
        ({**_low(), "name": "golore"}, ["optimizer.name", "name: lowrank", "selector: random", "switch_to random"]),
        ({**_low(), "name": "fira"}, ["optimizer.name", "name: lowrank", "optimizer.lowrank.fira: true"]),
    ],
)
def test_config_errors_give_this_projects_word(config: dict, needles: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        optimizer_config_from_dict(config)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def _param() -> nn.Parameter:
    return nn.Parameter(torch.zeros(6, 8))


@pytest.mark.parametrize(
    "key,needles",
    [
        ("scale", ["scale", "alpha="]),
        ("update_proj_gap", ["update_proj_gap", "RefreshSchedule(update_gap=...)"]),
        ("proj_type", ["proj_type", "side="]),
    ],
)
def test_optimizer_options_and_galore_style_groups_give_this_projects_word(key: str, needles: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        LowRankOptimizer([{"params": [_param()], "rank": 2}], **{key: 1})
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    # galore-torch's param groups ({"params": ..., "rank": ..., "update_proj_gap": ..., "scale": ..., "proj_type": ...})
    # would otherwise be accepted and the GaLore keys silently ignored.
    with pytest.raises(ValueError) as info:
        LowRankOptimizer([{"params": [_param()], "rank": 2, key: 1}])
    assert "invalid parameter group" in str(info.value)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_selector_names_in_the_optimizer_api() -> None:
    with pytest.raises(ValueError, match="'sara' is importance"):
        LowRankOptimizer([{"params": [_param()], "rank": 2}], selector="sara")
    with pytest.raises(ValueError, match="'galore' is dominant"):
        LowRankOptimizer([{"params": [_param()], "rank": 2}]).resample(selector="galore")
    with pytest.raises(ValueError, match="'golore' is random"):
        make_selector("golore")
    with pytest.raises(ValueError, match="'golore' is random"):
        LowRankOptimizer(
            [{"params": [_param()], "rank": 2}], schedule=RefreshSchedule(switch_at=0.5, switch_to="golore")
        )
    with pytest.raises(ValueError, match=r"update_proj_gap.*RefreshSchedule\(update_gap"):
        LowRankOptimizer([{"params": [_param()], "rank": 2}], schedule={"update_proj_gap": 3})


def test_unknown_words_are_unchanged() -> None:
    with pytest.raises(ValueError) as info:
        optimizer_config_from_dict(_low(selector="top"))
    assert str(info.value).endswith(
        "accepted: dominant | importance | random | randomized_dominant | randomized_importance"
    )
