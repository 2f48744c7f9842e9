"""Bad input gets a ValueError that names the key and the accepted values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank import LowRankOptimizer, build_optimizer, optimizer_config_from_dict


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 6, bias=False)
        self.up_proj = nn.Linear(8, 16, bias=False)
        self.norm = nn.LayerNorm(8)


def _low(**lowrank) -> dict:
    return {"name": "lowrank", "lowrank": {"rank": 2, "targets": ["q_proj", "up_proj"], **lowrank}}


@pytest.mark.parametrize(
    "config,needles",
    [
        (_low(selector="top"), ["optimizer.lowrank.selector", "'top'", "dominant", "importance", "random"]),
        (_low(rank=0), ["optimizer.lowrank.rank", "integer >= 1"]),
        (_low(rank=7), ["optimizer.lowrank.rank", "q_proj.weight", "1 .. 6"]),
        (_low(alpha=0.0), ["optimizer.lowrank.alpha", "> 0"]),
        (_low(update_gap=0), ["optimizer.lowrank.update_gap", ">= 1"]),
        (_low(moment_policy="spin"), ["optimizer.lowrank.moment_policy", "keep | rotate | reset"]),
        (_low(side="up"), ["optimizer.lowrank.side", "auto | left | right"]),
        (_low(base="sgd"), ["optimizer.lowrank.base", "adamw"]),
        (_low(base="adafactor", moment_policy="rotate"), ["optimizer.lowrank.moment_policy", "keep | reset"]),
        ({**_low(), "betas": [1.0, 0.9]}, ["optimizer.betas", "[0, 1)"]),
        ({**_low(), "betas": [0.9, -0.1]}, ["optimizer.betas", "[0, 1)"]),
        ({**_low(), "name": "sgd"}, ["optimizer.name", "adamw | lowrank"]),
        ({**_low(), "lr": -1}, ["optimizer.lr"]),
        (_low(targets=["q_proj", "gate_proj"]), ["optimizer.lowrank.targets", "gate_proj", "q_proj.weight"]),
        (_low(targets=["norm"]), ["optimizer.lowrank.targets", "norm"]),  # matches only 1-D parameters
        (_low(targets=["(unclosed"]), ["optimizer.lowrank.targets", "(unclosed"]),
        (_low(ranks=3), ["optimizer.lowrank.ranks", "did you mean optimizer.lowrank.rank"]),
        ({**_low(), "learning_rate": 1}, ["optimizer.learning_rate"]),
    ],
)
def test_build_optimizer_errors_name_key_and_accepted_values(config, needles):
    with pytest.raises(ValueError) as info:
        build_optimizer(Net(), config)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_validation_collects_every_problem():
    with pytest.raises(ValueError) as info:
        optimizer_config_from_dict({"lr": 0, "lowrank": {"rank": 0, "selector": "x", "update_gap": 0}})
    message = str(info.value)
    for key in ("optimizer.lr", "optimizer.lowrank.rank", "optimizer.lowrank.selector", "optimizer.lowrank.update_gap"):
        assert key in message


@pytest.mark.parametrize(
    "kwargs,needles",
    [
        ({"selector": "nope"}, ["selector", "dominant"]),
        ({"rank": 0}, ["rank", ">= 1"]),
        ({"rank": 9}, ["rank", "group0.param0", "1 .. 6"]),
        ({"alpha": -1.0}, ["alpha", "> 0"]),
        ({"update_gap": 0}, ["update_gap", ">= 1"]),
        ({"moment_policy": "x"}, ["moment_policy", "keep, rotate, reset"]),
        ({"side": "x"}, ["side", "auto, left, right"]),
        ({"fira_gamma": 1.0}, ["fira_gamma", "> 1"]),
        ({"base_options": {"betas": (0.9, 1.0)}}, ["beta"]),
        ({"colour": 1}, ["colour", "rank"]),
        ({"base": "adafactor", "moment_policy": "rotate"}, ["moment_policy", "keep, reset"]),
    ],
)
def test_optimizer_constructor_errors(kwargs, needles):
    params = [{"params": [nn.Parameter(torch.zeros(6, 8))], "rank": kwargs.pop("rank", 2)}]
    with pytest.raises(ValueError) as info:
        LowRankOptimizer(params, **kwargs)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_resample_rejects_unknown_selector():
    opt = LowRankOptimizer([{"params": [nn.Parameter(torch.zeros(6, 8))], "rank": 2}])
    with pytest.raises(ValueError, match="selector.*accepted"):
        opt.resample(selector="best")


def test_plain_adamw_is_torch_adamw_with_all_parameters():
    net = Net()
    opt, table = build_optimizer(net, {"name": "adamw", "lr": 1e-3, "eps": 1e-8})
    assert type(opt) is torch.optim.AdamW
    assert {row.group for row in table.rows} == {"plain"}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))
