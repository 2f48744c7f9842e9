"""lowrank.memory against independent oracles: a real tiny model's parameters, the real optimizers' state after one
step, and the tensors autograd saves for backward (``saved_tensors_hooks``)."""

from __future__ import annotations

import pytest
import torch

from lowrank.factory import build_optimizer
from lowrank.memory import (
    ModelShape,
    OptimizerShape,
    TrainingShape,
    activation_bytes,
    estimate_memory,
    optimizer_bytes,
    weight_bytes,
)
from lowrank_recipes.recipes.model import Llama, LlamaConfig, causal_lm_loss, llama_preset

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_heads=4, num_layers=3, max_seq_len=16)


def tiny_model(dtype: torch.dtype = torch.float32, checkpointing: bool = False) -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(**TINY, activation_checkpointing=checkpointing)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_match_the_real_model(dtype: torch.dtype) -> None:
    model = tiny_model(dtype)
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes(ModelShape.from_config(model.config), dtype) == real
    names = [name for name, _ in ModelShape.from_config(model.config).parameters()]
    assert names == [name for name, _ in model.named_parameters()]


def test_tied_embeddings_and_kv_heads_shrink_the_count() -> None:
    full = ModelShape(1000, 64, 160, 4, 2)
    assert (
        weight_bytes(ModelShape(1000, 64, 160, 4, 2, tie_embeddings=True), torch.float32)
        == weight_bytes(full, torch.float32) - 4 * 1000 * 64
    )
    gqa = ModelShape(1000, 64, 160, 4, 2, num_kv_heads=1)  # k and v: 16 x 64 instead of 64 x 64
    assert weight_bytes(full, torch.float32) - weight_bytes(gqa, torch.float32) == 4 * 2 * 2 * 48 * 64


def _state_tensor_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every state tensor but the step counters (the estimator's definition)."""
    total = 0
    for entry in optimizer.state_dict()["state"].values():
        total += sum(v.numel() * v.element_size() for k, v in entry.items() if torch.is_tensor(v) and k != "step")
    return total


@pytest.mark.parametrize(("name", "fira"), [("adamw", False), ("lowrank", False), ("lowrank", True)])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_state_matches_the_real_optimizer(name: str, precision: str, dtype: torch.dtype, fira: bool) -> None:
    model = tiny_model(dtype)
    config = {"name": name, "lr": 1e-3, "state_precision": precision}
    if name == "lowrank":
        config["lowrank"] = {"rank": 8, "fira": fira}
    optimizer = build_optimizer(model, config)
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    causal_lm_loss(model(ids), ids).backward()
    optimizer.step()
    shape = OptimizerShape(name=name, rank=8, state_precision=precision, fira=fira)
    estimate = optimizer_bytes(ModelShape.from_config(model.config), shape, dtype)
    assert sum(estimate.values()) == _state_tensor_bytes(optimizer)
    assert (estimate["scales"] > 0) == (precision == "8bit")
    assert (estimate["bases"] > 0) == (name == "lowrank")


def _saved_bytes(model: Llama, batch: int, seq: int) -> int:
    """Bytes of the distinct non-parameter storages autograd saves during one forward and loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, TINY["vocab_size"], (batch, seq))
    labels = torch.randint(0, TINY["vocab_size"], (batch, seq))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model(ids), labels)
    return sum(seen.values())


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_match_the_saved_tensors(dtype: torch.dtype, checkpointing: bool) -> None:
    model = tiny_model(dtype, checkpointing)
    batch, seq = 3, 16
    measured = _saved_bytes(model, batch, seq)
    training = TrainingShape(batch, seq, dtype, activation_checkpointing=checkpointing)
    estimate = activation_bytes(ModelShape.from_config(model.config), training)
    # Tolerance 1%: the loss's 0-dim result (4 bytes) is the only saved tensor the formula leaves out.
    assert estimate["saved"] == pytest.approx(measured, rel=0.01)
    if checkpointing:
        copies = 2 * 4 * TINY["hidden_size"] if dtype == torch.bfloat16 else 0  # the block's float32 norm weights
        assert estimate["total"] == estimate["saved"] + batch * seq * estimate["layer"] + copies
    else:
        assert estimate["total"] == estimate["saved"]


def test_per_layer_updates_keep_only_the_largest_gradient() -> None:
    shape = ModelShape.from_config(llama_preset("60m"))
    training = TrainingShape(param_dtype=torch.bfloat16, per_layer_updates=True)
    estimate = estimate_memory(shape, OptimizerShape("lowrank", rank=128), training)
    assert estimate.gradients == 32000 * 512 * 2
    full = estimate_memory(shape, OptimizerShape("lowrank", rank=128), TrainingShape(param_dtype=torch.bfloat16))
    assert full.gradients == full.weights
    with pytest.raises(ValueError, match="world_size"):
        estimate_memory(shape, OptimizerShape(), TrainingShape(per_layer_updates=True, world_size=2))


def test_galore_7b_configuration_is_within_ten_percent_of_the_published_figure() -> None:
    # GaLore: LLaMA 7B, 8-bit GaLore (rank 1024) with per-layer weight updates, token batch 256, one device: 22.0 GB.
    shape = ModelShape.from_config(llama_preset("7b"))
    training = TrainingShape(1, 256, torch.bfloat16, per_layer_updates=True)
    estimate = estimate_memory(shape, OptimizerShape("lowrank", rank=1024, state_precision="8bit"), training)
    assert estimate.total / 1e9 == pytest.approx(22.0, rel=0.10)


# ------------------------------------------------------------------------------------------------------------ POET
POET_BLOCK = 16  # hidden 64 and intermediate 160: 4 and 10 blocks per side (160 = 10 x 16), every side rotated


def poet_model(dtype: torch.dtype = torch.float32, checkpointing: bool = False) -> Llama:
    from lowrank.config import DEFAULT_TARGETS
    from lowrank.poet import PoetConfig, apply_poet

    model = tiny_model(dtype, checkpointing)
    apply_poet(model, PoetConfig(block_size=POET_BLOCK), DEFAULT_TARGETS, seed=0)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("precision", ["fp32", "8bit"])
def test_poet_weights_gradients_and_state_match_the_real_model(dtype: torch.dtype, precision: str) -> None:
    model = poet_model(dtype)
    shape = ModelShape.from_config(model.config)
    optimizer_shape = OptimizerShape("poet", poet_block_size=POET_BLOCK, state_precision=precision)
    estimate = estimate_memory(shape, optimizer_shape, TrainingShape(2, 16, dtype, device="cpu"))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    perms = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".perm_" in n or ".inv_" in n)
    assert perms > 0 and estimate.weights == params + perms
    optimizer = build_optimizer(model, {"name": "poet", "lr": 1e-3, "state_precision": precision})
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    causal_lm_loss(model(ids), ids).backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    assert estimate.gradients == grads
    optimizer.step()
    assert estimate.optimizer == _state_tensor_bytes(optimizer) and estimate.bases == 0


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_poet_activations_match_the_saved_tensors(dtype: torch.dtype, checkpointing: bool) -> None:
    model = poet_model(dtype, checkpointing)
    batch, seq = 3, 16
    measured = _saved_bytes(model, batch, seq)
    training = TrainingShape(batch, seq, dtype, activation_checkpointing=checkpointing)
    optimizer = OptimizerShape("poet", poet_block_size=POET_BLOCK)
    estimate = activation_bytes(ModelShape.from_config(model.config), training, optimizer)
    assert estimate["saved"] == pytest.approx(measured, rel=0.01)
    plain = activation_bytes(ModelShape.from_config(model.config), training)
    if not checkpointing:  # the rotations keep more than the plain linears did
        assert estimate["saved"] > plain["saved"]


def test_poet_is_refused_with_per_layer_updates() -> None:
    shape = ModelShape(256, 64, 160, 4, 2)
    with pytest.raises(ValueError, match="per_layer_updates need the lowrank optimizer"):
        estimate_memory(shape, OptimizerShape("poet", poet_block_size=16), TrainingShape(per_layer_updates=True))
