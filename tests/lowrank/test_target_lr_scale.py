"""``optimizer.target_lr_scale``: AdamW with the low-rank runs' two rates (the weights ``lowrank.targets`` names at
lr x scale, the rest at lr), checked against hand-built torch AdamW optimizers; misuse is refused by key."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from lowrank import build_optimizer
from lowrank.config import OptimizerConfig

from .test_weight_decay import TinyLM, _loss  # q_proj (no bias), up_proj (with a bias), embeddings, norm, head

LR, SCALE, WD = 0.01, 0.25, 0.1


def _config(**overrides: object) -> dict:
    targets = {"targets": [r"\bq_proj\b", r"\bup_proj\b"]}  # the default patterns name 7 kinds: TinyLM has 2
    return {"name": "adamw", "lr": LR, "weight_decay": WD, "target_lr_scale": SCALE, "lowrank": targets, **overrides}


def test_targets_step_at_the_scaled_lr_like_two_hand_built_adamw_optimizers() -> None:
    model = TinyLM()
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(model, _config())
    groups = {g["name"]: (g["lr"], g["param_names"]) for g in optimizer.param_groups}
    assert groups["targets"] == (pytest.approx(LR * SCALE), ["q_proj.weight", "up_proj.weight"])
    assert groups["plain"][0] == LR and groups["plain_no_decay"][0] == LR
    assert "up_proj.bias" in groups["plain_no_decay"][1]
    assert {row.name: row.group for row in optimizer.group_table.rows}["q_proj.weight"] == "targets"

    # the oracle: torch AdamW over the targets at lr * scale, another over the rest at lr (decay only on matrices)
    named = dict(reference.named_parameters())
    targets = [named[n] for n in named if n.endswith("_proj.weight")]
    matrices = [named[n] for n in ("embed_tokens.weight", "lm_head.weight")]
    vectors = [p for n, p in named.items() if p.dim() == 1]
    oracles = [
        torch.optim.AdamW(targets, lr=LR * SCALE, weight_decay=WD, eps=1e-6),
        torch.optim.AdamW(
            [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}], lr=LR, weight_decay=WD, eps=1e-6
        ),
    ]
    for step in range(4):
        for net, opts in ((model, [optimizer]), (reference, oracles)):
            for opt in opts:
                opt.zero_grad()
            _loss(net, step).backward()
            for opt in opts:
                opt.step()
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-7, msg=name)


def test_a_scheduler_keeps_the_ratio_of_the_two_rates() -> None:
    optimizer = build_optimizer(TinyLM(), _config())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["targets"] == pytest.approx(SCALE * lrs["plain"]) and lrs["plain"] == pytest.approx(LR / 4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"target_lr_scale": 0.0}, "optimizer.target_lr_scale: invalid value 0.0; accepted: a finite number > 0"),
        ({"target_lr_scale": float("nan")}, "optimizer.target_lr_scale: invalid value nan"),
        (
            {"name": "lowrank"},
            "optimizer.target_lr_scale: invalid value 0.25; accepted: 1.0 with optimizer.name lowrank (the scale is "
            "for adamw",
        ),
    ],
)
def test_invalid_values_are_refused_by_key(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        build_optimizer(TinyLM(), _config(**overrides))


def test_a_target_pattern_that_matches_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match=r"optimizer.lowrank.targets: pattern\(s\) \['nothing_proj'\] match no"):
        build_optimizer(TinyLM(), _config(lowrank={"targets": ["q_proj", "nothing_proj"]}))


def test_the_default_is_one_rate() -> None:
    assert OptimizerConfig().target_lr_scale == 1.0
    optimizer = build_optimizer(TinyLM(), _config(target_lr_scale=1.0))
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [("plain", LR), ("plain_no_decay", LR)]
