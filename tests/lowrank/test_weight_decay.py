"""Weight decay follows the common convention: matrices decay, norms and biases (1-D) do not, ``no_decay`` patterns
exempt more; the groups say which (``plain_no_decay``, ``lowrank_no_decay``); state dicts of the former layout (one
plain group) still load, matched by parameter name."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from lowrank import LowRankOptimizer, OptimizerConfig, build_optimizer, optimizer_config_from_dict
from lowrank.compact_adamw import CompactAdamW

LR, WD, EPS = 0.01, 0.1, 1e-6


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(30, 8)
        self.q_proj = nn.Linear(8, 8, bias=False)
        self.up_proj = nn.Linear(8, 16)  # with a bias
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 30, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(tokens)
        h = h + self.q_proj(h) + torch.relu(self.up_proj(h))[..., :8]
        return self.lm_head(self.norm(h))


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    tokens = torch.randint(0, 30, (4, 6), generator=torch.Generator().manual_seed(100 + step))
    return nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 30), tokens[:, 1:].reshape(-1))


def _config(name: str = "lowrank", weight_decay: float = WD, **extra) -> dict:
    lowrank = {"rank": 2, "targets": ["q_proj", "up_proj"], "seed": 3}
    return {"name": name, "lr": LR, "eps": EPS, "weight_decay": weight_decay, "lowrank": lowrank, **extra}


def _adamw_first_step(p: torch.Tensor, g: torch.Tensor, wd: float) -> torch.Tensor:
    """Float64 oracle of AdamW's first step: m_hat = g, v_hat = g^2, so p <- p (1 - lr wd) - lr g / (|g| + eps)."""
    p, g = p.double(), g.double()
    return p * (1 - LR * wd) - LR * g / (g.abs() + EPS)


@pytest.mark.parametrize("name", ["adamw", "lowrank"])
def test_matrices_decay_norms_and_biases_do_not(name: str) -> None:
    model = TinyLM()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, _config(name))
    _loss(model, 0).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    plain = ["embed_tokens.weight", "lm_head.weight", "norm.weight", "norm.bias", "up_proj.bias"]
    if name == "adamw":
        plain += ["q_proj.weight", "up_proj.weight"]
    params = dict(model.named_parameters())
    for n in plain:
        wd = WD if before[n].dim() >= 2 else 0.0
        torch.testing.assert_close(params[n].double(), _adamw_first_step(before[n], grads[n], wd), rtol=1e-5, atol=1e-7)
    expected_groups = {"plain": WD, "plain_no_decay": 0.0}
    if name == "lowrank":
        expected_groups = {"lowrank": WD, **expected_groups}
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == expected_groups
    rows = {row.name: row for row in opt.group_table.rows}
    assert {n: rows[n].weight_decay for n in rows} == {n: WD if p.dim() >= 2 else 0.0 for n, p in params.items()}
    assert "weight decay 0.1 on 4 parameters; none on 3" in str(opt.group_table)


def test_low_rank_weights_decay_on_the_full_weight_unless_a_pattern_exempts_them() -> None:
    """The same gradient with weight decay 0.1 and 0: the low-rank update differs by exactly -lr * wd * W."""
    results = {}
    for label, config in {
        "decay": _config(),
        "none": _config(weight_decay=0.0),
        "exempt": _config(no_decay=["q_proj"]),
    }.items():
        model = TinyLM()
        w0 = model.q_proj.weight.detach().double().clone()
        opt = build_optimizer(model, config)
        _loss(model, 0).backward()
        opt.step()
        results[label] = model.q_proj.weight.detach().double()
        if label == "exempt":
            assert [g["name"] for g in opt.param_groups] == ["lowrank", "lowrank_no_decay", "plain", "plain_no_decay"]
            assert opt.param_groups[1]["rank"] == 2 and opt.param_groups[1]["weight_decay"] == 0.0
    torch.testing.assert_close(results["decay"] - results["none"], -LR * WD * w0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results["exempt"], results["none"], rtol=0, atol=1e-7)


def test_no_decay_patterns_exempt_embeddings_and_head() -> None:
    model = TinyLM()
    opt = build_optimizer(model, _config(no_decay=[r"^embed_tokens\.", "lm_head"]))
    groups = {g["name"]: sorted(g["param_names"]) for g in opt.param_groups}
    assert groups["plain_no_decay"] == sorted(
        ["embed_tokens.weight", "lm_head.weight", "norm.weight", "norm.bias", "up_proj.bias"]
    )
    assert "plain" not in groups  # every plain matrix is exempt: the empty group is left out
    assert groups["lowrank"] == ["q_proj.weight", "up_proj.weight"]


@pytest.mark.parametrize(
    "no_decay,needles",
    [
        (["(unclosed"], ["optimizer.no_decay[0]", "'(unclosed' is not a regular expression"]),
        ([3], ["optimizer.no_decay[0]", "expected str, got 3"]),
        ("lm_head", ["optimizer.no_decay", "expected a list"]),
        (["lm_haed"], ["optimizer.no_decay", "'lm_haed'", "match no parameter", "embed_tokens.weight"]),
    ],
)
def test_no_decay_errors_name_the_key(no_decay, needles) -> None:
    with pytest.raises(ValueError) as info:
        build_optimizer(TinyLM(), _config(no_decay=no_decay))
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_the_config_dataclass_checks_and_documents_the_option() -> None:
    with pytest.raises(ValueError, match=r"optimizer.no_decay\[1\]: invalid value 3; accepted: a regular expression"):
        optimizer_config_from_dict(OptimizerConfig(no_decay=["lm_head", 3]))
    with pytest.raises(ValueError, match=r"optimizer.no_decay: invalid value 'lm_head'; accepted: a list"):
        optimizer_config_from_dict(OptimizerConfig(no_decay="lm_head"))
    assert "no_decay:" in OptimizerConfig.__doc__ and "norms and biases (1-D) never decay" in OptimizerConfig.__doc__


# --------------------------------------------------------------------------------------------------- old state dicts
def _former_layout(model: nn.Module, name: str, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer as build_optimizer made it before the no-decay groups: ``lowrank`` + one ``plain`` group (or one
    ``plain`` group for adamw), every plain parameter with the same weight decay."""
    named = list(model.named_parameters())
    low = [(n, p) for n, p in named if n in ("q_proj.weight", "up_proj.weight")]
    plain = [(n, p) for n, p in named if n not in ("q_proj.weight", "up_proj.weight")]
    hyper = {"lr": LR, "weight_decay": weight_decay}

    def group(members, group_name, **extra):
        return {"params": [p for _, p in members], "param_names": [n for n, _ in members], "name": group_name, **extra}

    if name == "adamw":
        return torch.optim.AdamW([group(named, "plain")], eps=EPS, **hyper)
    if name == "adamw_bf16":
        return CompactAdamW([group(named, "plain")], eps=EPS, state_precision="bf16", **hyper)
    groups = [group(low, "lowrank", rank=2), group(plain, "plain")]
    return LowRankOptimizer(
        groups,
        base="adamw",
        base_options={"betas": (0.9, 0.999), "eps": EPS},
        schedule={"update_gap": 3},
        seed=3,
        **hyper,
    )


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()


def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", ["lowrank", "adamw", "adamw_bf16"])
def test_a_former_layout_state_dict_loads_by_name_and_resumes(name: str) -> None:
    """With weight decay 0 (every shipped config) the two layouts make the same updates: resuming a former-layout
    checkpoint with the new layout continues exactly as the former optimizer would have."""
    old_model = TinyLM()
    old = _former_layout(old_model, name, 0.0)
    _train(old_model, old, range(4))  # low-rank: refreshes at 0 and 3
    saved = _round_trip(old.state_dict())

    new_model = copy.deepcopy(old_model)
    config = _config(name.split("_")[0], weight_decay=0.0, refresh={"update_gap": 3})
    if name == "adamw_bf16":
        config["state_precision"] = "bf16"
    new = build_optimizer(new_model, config)
    with pytest.warns(UserWarning, match="matched to the parameters by name"):
        new.load_state_dict(saved)
    old_state, new_state = _state_by_name(old), _state_by_name(new)
    assert old_state.keys() == new_state.keys() == {n for n, _ in new_model.named_parameters()}
    for n, entry in old_state.items():
        assert entry.keys() == new_state[n].keys(), n
        for key, value in entry.items():
            assert torch.equal(new_state[n][key], value), (n, key)
    if name == "lowrank":
        assert [g["lowrank_step"] for g in new.param_groups if g.get("rank")] == [4]
    _train(old_model, old, range(4, 8))
    _train(new_model, new, range(4, 8))
    for (n, p), q in zip(old_model.named_parameters(), new_model.parameters()):
        assert torch.equal(p, q), n


def _state_by_name(opt: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    state = opt.state_dict()
    names = [n for g in state["param_groups"] for n in g["param_names"]]
    keys = [k for g in state["param_groups"] for k in g["params"]]
    return {name: state["state"][key] for name, key in zip(names, keys) if key in state["state"]}


def test_after_loading_a_former_layout_norms_stop_decaying() -> None:
    model = TinyLM()
    old = _former_layout(model, "lowrank", WD)
    _train(model, old, range(2))
    new = build_optimizer(model, _config())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new.load_state_dict(old.state_dict())
    (warning,) = [w for w in caught if "group layout" in str(w.message) or "by name" in str(w.message)]
    message = str(warning.message)
    assert "lowrank (2), plain (5)" in message and "lowrank (2), plain (2), plain_no_decay (3)" in message
    assert "scheduler" in message
    assert {g["name"]: g["weight_decay"] for g in new.param_groups} == {"lowrank": WD, "plain": WD, "plain_no_decay": 0}
    assert all(g["lr"] == LR for g in new.param_groups)


def test_a_former_layout_without_names_is_a_clear_error() -> None:
    model = TinyLM()
    old = _former_layout(model, "lowrank", 0.0)
    _train(model, old, range(1))
    saved = old.state_dict()
    for group in saved["param_groups"]:
        group.pop("param_names")
    with pytest.raises(ValueError) as info:
        build_optimizer(model, _config()).load_state_dict(saved)
    message = str(info.value)
    for needle in ("lowrank (2), plain (5)", "plain_no_decay", "param_names", "weight decay"):
        assert needle in message, (needle, message)
    former_adamw = _former_layout(model, "adamw", 0.0)
    _train(model, former_adamw, range(1))
    saved = former_adamw.state_dict()
    saved["param_groups"][0].pop("param_names")
    with pytest.raises(ValueError, match=r"plain \(7\).*plain \(4\), plain_no_decay \(3\).*plain_no_decay"):
        build_optimizer(model, _config("adamw")).load_state_dict(saved)
