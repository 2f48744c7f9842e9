"""Optimizer state: its size, and a weights_only round trip that resumes bit-exactly across a resample."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lowrank import LowRankOptimizer, build_optimizer


class TinyLlamaBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(40, 12)
        self.q_proj = nn.Linear(12, 12, bias=False)  # square
        self.up_proj = nn.Linear(12, 20, bias=False)  # (20, 12): m >= n
        self.down_proj = nn.Linear(20, 12, bias=False)  # (12, 20): m < n
        self.norm = nn.LayerNorm(12)
        self.lm_head = nn.Linear(12, 40, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(tokens)
        h = h + self.q_proj(h)
        h = h + self.down_proj(torch.relu(self.up_proj(h)))
        return self.lm_head(self.norm(h))


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    tokens = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(100 + step))
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 40), tokens[:, 1:].reshape(-1))


CONFIG = {
    "name": "lowrank",
    "lr": 0.01,
    "lowrank": {
        "rank": 4,
        "selector": "importance",
        "fira": True,
        "moment_policy": "rotate",
        "targets": ["q_proj", "up_proj", "down_proj"],
        "seed": 17,
    },
    "refresh": {"update_gap": 3},
}


def test_state_bytes_formula():
    torch.manual_seed(0)
    model = TinyLlamaBlock()
    opt = build_optimizer(model, {**CONFIG, "lowrank": {**CONFIG["lowrank"], "fira": False}})
    table = opt.group_table
    _loss(model, 0).backward()
    opt.step()
    r = 4
    expected = 0
    for name, p in model.named_parameters():
        if p.dim() == 2 and any(k in name for k in ("q_proj", "up_proj", "down_proj")):
            m, n = p.shape
            expected += r * max(m, n) * 2 + r * min(m, n)  # two moments (r x max) + basis (r x min)
        else:
            expected += 2 * p.numel()  # the plain group's full Adam moments
    assert opt.state_bytes() == expected * 4
    assert table.state_bytes() == expected * 4
    rows = {row.name: row for row in table.rows}
    assert rows["up_proj.weight"].side == "right" and rows["down_proj.weight"].side == "left"
    assert rows["lm_head.weight"].group == "plain" and rows["embed_tokens.weight"].rank is None


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        opt.zero_grad()
        loss = _loss(model, step)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("base", ["adamw", "adafactor"])
def test_weights_only_round_trip_resumes_bit_exactly(base):
    config = {**CONFIG, "lowrank": {**CONFIG["lowrank"], "base": base}}
    if base == "adafactor":
        config["lowrank"]["moment_policy"] = "reset"
    torch.manual_seed(0)
    reference = TinyLlamaBlock()
    resumed = TinyLlamaBlock()
    resumed.load_state_dict(reference.state_dict())

    opt_ref = build_optimizer(reference, config)
    expected_losses = _train(reference, opt_ref, range(8))  # refreshes at 0, 3, 6

    opt_a = build_optimizer(resumed, config)
    losses = _train(resumed, opt_a, range(4))  # stop after the refresh at step 3
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optimizer": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    torch.manual_seed(123)  # a different process state: nothing may depend on it
    fresh = TinyLlamaBlock()
    fresh.load_state_dict(checkpoint["model"])
    opt_b = build_optimizer(fresh, config)
    opt_b.load_state_dict(checkpoint["optimizer"])
    losses += _train(fresh, opt_b, range(4, 8))

    assert losses == expected_losses
    for (name, p), q in zip(reference.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
    state_ref, state_b = opt_ref.state_dict()["state"], opt_b.state_dict()["state"]
    for index in state_ref:
        for key, value in state_ref[index].items():
            assert torch.equal(value, state_b[index][key]), (index, key)


def test_state_dict_is_plain_tensors_and_keyed_like_torch():
    torch.manual_seed(0)
    model = TinyLlamaBlock()
    opt = build_optimizer(model, CONFIG)
    _train(model, opt, range(2))
    state = opt.state_dict()
    assert sorted(state["state"]) == list(range(len(list(model.parameters()))))
    for entry in state["state"].values():
        assert all(torch.is_tensor(v) for v in entry.values())
    low = state["state"][1]  # q_proj.weight
    assert {"step", "exp_avg", "exp_avg_sq", "lowrank_basis", "fira_norm"} == set(low)
    assert state["param_groups"][0]["lowrank_step"] == 2


def test_load_rejects_mismatched_groups():
    torch.manual_seed(0)
    model = TinyLlamaBlock()
    opt = build_optimizer(model, CONFIG)
    other = LowRankOptimizer([{"params": [nn.Parameter(torch.zeros(3, 3))], "rank": 2}])
    with pytest.raises(ValueError):
        other.load_state_dict(opt.state_dict())


def test_an_older_checkpoint_with_moved_options_loads():
    """Checkpoints from before the schedule moved out of the groups carry ``update_gap`` (and no selector_options)."""
    torch.manual_seed(0)
    model = TinyLlamaBlock()
    opt = build_optimizer(model, CONFIG)
    _train(model, opt, range(2))
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group["update_gap"] = 3
        group.pop("selector_options", None)
    fresh = build_optimizer(model, CONFIG)
    fresh.load_state_dict(saved)
    for group in fresh.param_groups:
        assert "update_gap" not in group and group["selector_options"] == {}
    assert fresh.param_groups[0]["lowrank_step"] == 2
    for index, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, fresh.state_dict()["state"][index][key]), (index, key)
    _train(model, fresh, range(2, 4))  # steps on
