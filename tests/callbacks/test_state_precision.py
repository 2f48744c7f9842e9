"""OptimizerStatePrecision: the strategy check (the conversion is tested end to end in tests/recipes)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lowrank import CompactAdamW
from lowrank_recipes.callbacks import OptimizerStatePrecision
from lowrank_recipes.callbacks.state_precision import optimizer_precision


class ModelParallelStrategy:  # stands in for Lightning's FSDP2 strategy: only the name is read
    pass


class SingleDeviceStrategy:
    pass


@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit"])
def test_sharded_strategies_refuse_compact_states(precision):
    opt = CompactAdamW([nn.Parameter(torch.zeros(4, 4))], state_precision=precision)
    assert optimizer_precision(opt) == precision
    callback = OptimizerStatePrecision()
    callback.on_fit_start(SimpleNamespace(optimizers=[opt], strategy=SingleDeviceStrategy()), None)
    sharded = SimpleNamespace(optimizers=[opt], strategy=ModelParallelStrategy())
    if precision == "fp32":
        callback.on_fit_start(sharded, None)
    else:
        with pytest.raises(
            MisconfigurationException, match=f"state_precision='{precision}'.*ModelParallelStrategy.*fp32"
        ):
            callback.on_fit_start(sharded, None)


def test_torch_optimizers_are_fp32():
    assert optimizer_precision(torch.optim.AdamW([nn.Parameter(torch.zeros(2))])) == "fp32"
