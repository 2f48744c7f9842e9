"""Bad input gets a ValueError that names the key and the accepted values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank import GroupTable, LowRankOptimizer, RefreshSchedule, build_optimizer, optimizer_config_from_dict


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
        ({**_low(), "refresh": {"update_gap": 0}}, ["optimizer.refresh.update_gap", "0", ">= 1"]),
        ({**_low(), "refresh": {"stagger": 0}}, ["optimizer.refresh.stagger", ">= 1"]),
        ({**_low(), "refresh": {"switch_at": 1.5, "switch_to": "random"}}, ["optimizer.refresh.switch_at", "[0, 1]"]),
        (
            {**_low(), "refresh": {"switch_at": 0.5, "switch_to": "top"}},
            ["optimizer.refresh.switch_to", "'top'", "dominant | importance | random"],
        ),
        ({**_low(), "refresh": {"stager": 2}}, ["optimizer.refresh.stager", "did you mean optimizer.refresh.stagger"]),
        (
            _low(selector_options={"dominant": {"oversampling": 3}}),
            ["optimizer.lowrank.selector_options.dominant.oversampling", "accepted: none"],
        ),
        (
            _low(selector_options={"randomized_importance": {"power_iters": -1}}),
            ["optimizer.lowrank.selector_options.randomized_importance.power_iters", "-1", ">= 0"],
        ),
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
        optimizer_config_from_dict(
            {"lr": 0, "lowrank": {"rank": 0, "selector": "x"}, "refresh": {"update_gap": 0, "stagger": 0}}
        )
    message = str(info.value)
    for key in (
        "optimizer.lr",
        "optimizer.lowrank.rank",
        "optimizer.lowrank.selector",
        "optimizer.refresh.update_gap",
        "optimizer.refresh.stagger",
    ):
        assert key in message


@pytest.mark.parametrize(
    "kwargs,needles",
    [
        ({"selector": "nope"}, ["selector", "dominant"]),
        ({"rank": 0}, ["rank", ">= 1"]),
        ({"rank": 9}, ["rank", "group0.param0", "1 .. 6"]),
        ({"alpha": -1.0}, ["alpha", "> 0"]),
        ({"schedule": {"update_gap": 0}}, ["update_gap", ">= 1"]),
        ({"schedule": RefreshSchedule(stagger=0)}, ["stagger", ">= 1"]),
        ({"schedule": {"gap": 3}}, ["gap", "update_gap"]),
        ({"schedule": RefreshSchedule(switch_at=0.5)}, ["switch_at", "switch_to"]),
        ({"schedule": 3}, ["schedule", "RefreshSchedule"]),
        ({"moment_policy": "x"}, ["moment_policy", "keep | rotate | reset"]),
        ({"side": "x"}, ["side", "auto | left | right"]),
        ({"selector_options": {"dominant": {"oversampling": 3}}}, ["selector_options.dominant.oversampling", "none"]),
        (
            {"selector_options": {"randomized_dominant": {"oversampling": -1}}},
            ["selector_options.randomized_dominant.oversampling", "-1", ">= 0"],
        ),
        ({"fira_gamma": 1.0}, ["fira_gamma", "> 1"]),
        ({"base_options": {"betas": (0.9, 1.0)}}, ["beta"]),
        ({"colour": 1}, ["colour", "rank"]),
        ({"base": "adafactor", "moment_policy": "rotate"}, ["moment_policy", "keep | reset"]),
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
    opt = build_optimizer(net, {"name": "adamw", "lr": 1e-3, "eps": 1e-8})
    table = opt.group_table
    assert type(opt) is torch.optim.AdamW
    groups = {row.name: row.group for row in table.rows}
    assert groups == {
        "q_proj.weight": "plain",
        "up_proj.weight": "plain",
        "norm.weight": "plain_no_decay",  # 1-D: no weight decay
        "norm.bias": "plain_no_decay",
    }
    assert [g["name"] for g in opt.param_groups] == ["plain", "plain_no_decay"]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))


# ------------------------------------------------------------------------------------------- moved options
def _params() -> list[dict]:
    return [{"params": [nn.Parameter(torch.zeros(6, 8))], "rank": 2}]


@pytest.mark.parametrize(
    "key,says",
    [
        ("update_gap", "moved to"),
        ("oversampling", "moved to"),
        ("power_iters", "moved to"),
        ("auto_refresh", "removed"),
    ],
)
def test_old_optimizer_options_say_where_they_moved(key, says):
    with pytest.raises(ValueError) as info:
        LowRankOptimizer(_params(), **{key: 3})
    assert f"{key}: {says}" in str(info.value)
    group = {**_params()[0], key: 3}
    with pytest.raises(ValueError) as info:
        LowRankOptimizer([group])
    assert "invalid parameter group" in str(info.value) and f"{key}: {says}" in str(info.value)


def test_update_gap_moved_to_the_schedule():
    with pytest.raises(ValueError, match="update_gap: moved to .*schedule=RefreshSchedule"):
        LowRankOptimizer(_params(), update_gap=3)
    with pytest.raises(ValueError, match="moved to"):
        LowRankOptimizer([{**_params()[0], "update_gap": 3}])


@pytest.mark.parametrize(
    "data,needles",
    [
        ({"lowrank": {"update_gap": 3}}, ["optimizer.lowrank.update_gap", "moved to", "optimizer.refresh.update_gap"]),
        ({"lowrank": {"oversampling": 3}}, ["optimizer.lowrank.oversampling", "moved to", "selector_options"]),
        ({"lowrank": {"power_iters": 3}}, ["optimizer.lowrank.power_iters", "moved to", "selector_options"]),
        ({"refresh": {"stagger": 0}}, ["optimizer.refresh.stagger", "invalid value 0", ">= 1"]),
        ({"refresh": {"switch_at": 0.5}}, ["optimizer.refresh.switch_at", "optimizer.refresh.switch_to"]),
        ({"refresh": {"switch_to": "random"}}, ["optimizer.refresh.switch_at", "optimizer.refresh.switch_to"]),
        ({"refresh": {"max_steps": 0}}, ["optimizer.refresh.max_steps", "invalid value 0"]),
    ],
)
def test_config_moved_and_refresh_keys(data, needles):
    with pytest.raises(ValueError) as info:
        optimizer_config_from_dict(data)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_config_refresh_section_becomes_the_optimizer_schedule():
    config = optimizer_config_from_dict(
        {
            "lowrank": {"rank": 2, "targets": ["q_proj", "up_proj"]},
            "refresh": {"update_gap": 3, "stagger": 2, "switch_at": 0.5, "switch_to": "random", "max_steps": 10},
        }
    )
    expected = RefreshSchedule(update_gap=3, stagger=2, switch_at=0.5, switch_to="random", max_steps=10)
    assert config.refresh == expected
    assert build_optimizer(Net(), config).schedule == expected


@pytest.mark.parametrize(
    "option,value,needles",
    [
        ("alpha", 0, ["alpha: invalid value 0", "> 0"]),
        ("moment_policy", "spin", ["moment_policy: invalid value 'spin'", "keep | rotate | reset"]),
        ("side", "up", ["side: invalid value 'up'", "auto | left | right"]),
        ("fira_gamma", 1.0, ["fira_gamma: invalid value 1.0", "> 1"]),
        ("selector", "top", ["selector: invalid value 'top'", "dominant | importance | random"]),
    ],
)
def test_the_same_option_check_serves_config_and_optimizer(option, value, needles):
    with pytest.raises(ValueError) as from_optimizer:
        LowRankOptimizer(_params(), **{option: value})
    with pytest.raises(ValueError) as from_config:
        optimizer_config_from_dict({"lowrank": {option: value}})
    # The optimizer names the bare option, the config the same option under optimizer.lowrank: one check, one format.
    key_and_value, accepted = needles
    for message, prefix in ((str(from_optimizer.value), ""), (str(from_config.value), "optimizer.lowrank.")):
        assert prefix + key_and_value in message, (prefix + key_and_value, message)
        assert "accepted:" in message and accepted in message, (accepted, message)


@pytest.mark.parametrize("name", ["lowrank", "adamw"])
def test_build_optimizer_returns_an_optimizer_with_its_group_table(name):
    net = Net()
    opt = build_optimizer(net, {**_low(), "name": name})
    assert isinstance(opt, torch.optim.Optimizer) and not isinstance(opt, tuple)
    assert isinstance(opt, LowRankOptimizer) == (name == "lowrank")
    table = opt.group_table
    assert isinstance(table, GroupTable)
    groups = {row.name: row.group for row in table.rows}
    assert set(groups) == {n for n, _ in net.named_parameters()}
    if name == "lowrank":
        assert groups == {
            "q_proj.weight": "lowrank",
            "up_proj.weight": "lowrank",
            "norm.weight": "plain_no_decay",
            "norm.bias": "plain_no_decay",
        }
    else:
        assert set(groups.values()) == {"plain", "plain_no_decay"}
