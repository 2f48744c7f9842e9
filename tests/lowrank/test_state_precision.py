"""optimizer.state_precision through build_optimizer: the right optimizer, honest group-table bytes, resume
with another precision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank import CompactAdamW, LowRankOptimizer, build_optimizer


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(300, 64)  # 19200 elements: large enough for 8-bit moments
        self.q_proj = nn.Linear(64, 64, bias=False)
        self.up_proj = nn.Linear(64, 160, bias=False)
        self.norm = nn.LayerNorm(64)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(tokens)
        return self.norm(h + self.up_proj(h)[..., :64] + self.q_proj(h))


def _config(name: str, precision: str, **lowrank) -> dict:
    return {
        "name": name,
        "state_precision": precision,
        "lowrank": {"rank": 16, "targets": ["q_proj", "up_proj"], **lowrank},
    }


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> None:
    tokens = torch.randint(0, 300, (4, 8), generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    model(tokens).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("name", ["adamw", "lowrank"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit"])
def test_table_bytes_equal_the_real_state(name, precision):
    torch.manual_seed(0)
    model = Block()
    opt = build_optimizer(model, _config(name, precision))
    table = opt.group_table
    _step(model, opt)
    actual = sum(
        v.numel() * v.element_size()
        for entry in opt.state_dict()["state"].values()
        for v in entry.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    assert table.state_bytes() == actual
    if name == "adamw":
        assert type(opt) is (torch.optim.AdamW if precision == "fp32" else CompactAdamW)
    else:
        assert isinstance(opt, LowRankOptimizer)
        assert opt.spec.name == {"fp32": "adamw", "bf16": "adamw_bf16", "8bit": "adamw8bit"}[precision]


def test_8bit_table_is_much_smaller_than_fp32():
    model = Block()
    fp32 = build_optimizer(model, _config("lowrank", "fp32")).group_table
    small = build_optimizer(model, _config("lowrank", "8bit")).group_table
    assert small.state_bytes() < 0.5 * fp32.state_bytes()


def test_precision_needs_adamw_base():
    with pytest.raises(ValueError, match="optimizer.state_precision.*adafactor.*fp32"):
        build_optimizer(Block(), _config("lowrank", "8bit", base="adafactor"))
    with pytest.raises(ValueError, match="optimizer.state_precision.*fp32 \\| bf16 \\| 8bit"):
        build_optimizer(Block(), _config("lowrank", "4bit"))


def test_lowrank_checkpoint_resumes_with_another_precision():
    """A full checkpoint saved with 8-bit states loads into a bf16 run: the run's precision wins, moments convert."""
    torch.manual_seed(0)
    model = Block()
    opt8 = build_optimizer(model, _config("lowrank", "8bit"))
    for seed in range(3):
        _step(model, opt8, seed)
    saved = opt8.state_dict()
    opt16 = build_optimizer(model, _config("lowrank", "bf16"))
    opt16.load_state_dict(saved)
    _step(model, opt16, 3)
    dtypes = {v.dtype for entry in opt16.state_dict()["state"].values() for k, v in entry.items() if k == "exp_avg"}
    assert torch.uint8 not in dtypes and torch.bfloat16 in dtypes
