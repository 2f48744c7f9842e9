"""Projected gradients (lowrank.projected) against the ordinary path: the same weights in float64, and no full-size
weight gradient formed between refreshes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank.factory import build_optimizer
from lowrank.projected import COMPANION, add_companions, enable_projected_gradients
from lowrank_recipes.recipes.model import Llama, LlamaConfig, causal_lm_loss

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_layers=2, max_seq_len=16)
STEPS, GAP, ACCUMULATE = 12, 3, 2  # refreshes at steps 0 (first bases), 3, 6 and 9


def _settings(side: str, selector: str, policy: str, precision: str = "fp32") -> dict:
    return {
        "name": "lowrank",
        "lr": 1e-2,
        "state_precision": precision,
        "lowrank": {"rank": 4, "side": side, "selector": selector, "moment_policy": policy, "seed": 3},
        "refresh": {"update_gap": GAP},
    }


def _train(model: nn.Module, settings: dict, projected: bool, batches: list[torch.Tensor], loss_fn) -> nn.Module:
    optimizer = build_optimizer(model, settings)
    handle = enable_projected_gradients(model, optimizer) if projected else None
    for step in range(STEPS):
        for micro in range(ACCUMULATE):
            (loss_fn(model, batches[step * ACCUMULATE + micro]) / ACCUMULATE).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if handle is not None:
        handle.remove()
    return model


def _lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return causal_lm_loss(model(ids[:, :-1]), ids[:, 1:])


class MLP(nn.Module):
    """A foreign model: two linear layers with a bias, no LLaMA naming."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 40)
        self.down = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def _mlp_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return (model(batch[:, :12]) - batch[:, 12:22]).pow(2).mean()


@pytest.mark.parametrize("policy", ["keep", "rotate"])
@pytest.mark.parametrize("selector", ["dominant", "importance"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_projected_training_equals_the_ordinary_path_in_float64(side: str, selector: str, policy: str) -> None:
    torch.manual_seed(0)
    model = Llama(TINY).double()
    batches = [torch.randint(0, TINY.vocab_size, (2, 9)) for _ in range(STEPS * ACCUMULATE)]
    settings = _settings(side, selector, policy)
    ordinary = _train(copy.deepcopy(model), settings, False, batches, _lm_loss)
    projected = _train(copy.deepcopy(model), settings, True, batches, _lm_loss)
    before = dict(model.named_parameters())
    for name, param in projected.named_parameters():
        expected = dict(ordinary.named_parameters())[name]
        torch.testing.assert_close(param, expected, rtol=1e-10, atol=1e-13, msg=name)
        assert not torch.equal(param, before[name]), name  # every weight moved


@pytest.mark.parametrize("side", ["left", "right"])
def test_projected_training_of_a_foreign_mlp_equals_the_ordinary_path(side: str) -> None:
    torch.manual_seed(0)
    model = MLP().double()
    batches = [torch.randn(8, 22, dtype=torch.float64) for _ in range(STEPS * ACCUMULATE)]
    settings = _settings(side, "importance", "keep") | {"lowrank": {"rank": 4, "side": side, "targets": [r"\bup\b"]}}
    ordinary = _train(copy.deepcopy(model), settings, False, batches, _mlp_loss)
    projected = _train(copy.deepcopy(model), settings, True, batches, _mlp_loss)
    for (name, param), (_, expected) in zip(projected.named_parameters(), ordinary.named_parameters(), strict=True):
        torch.testing.assert_close(param, expected, rtol=1e-10, atol=1e-13, msg=name)


class _FullSizeRecorder(TorchDispatchMode):
    """Shapes of the outputs of every non-view op while active, excluding outputs that alias ``exclude``."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in exclude}
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, list | tuple) else [out]:
                if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in self.storages:
                    self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_no_full_size_weight_gradient_between_refreshes(checkpointing: bool) -> None:
    """The 40 x 12 weight of ``up`` (480 elements, a shape no activation has) gets no (40, 12) or (12, 40) tensor
    in backward on a step without refresh, and its full gradient on a refresh step."""
    torch.manual_seed(0)
    model = MLP()
    optimizer = build_optimizer(
        model, _settings("auto", "importance", "keep") | {"lowrank": {"rank": 4, "targets": [r"\bup\b"]}}
    )
    handle = enable_projected_gradients(model, optimizer)
    full = {(40, 12), (12, 40)}

    def backward_shapes(batch: torch.Tensor) -> tuple[list[tuple[int, ...]], torch.Tensor | None]:
        if checkpointing:
            loss = torch.utils.checkpoint.checkpoint(_mlp_loss, model, batch, use_reentrant=False)
        else:
            loss = _mlp_loss(model, batch)
        with _FullSizeRecorder([model.up.weight]) as recorder:
            loss.backward()
        grad = model.up.weight.grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return recorder.shapes, grad

    for step in range(2 * GAP):
        shapes, grad = backward_shapes(torch.randn(5, 22))
        if step % GAP == 0:  # refresh steps (the first gives the basis)
            assert grad is not None and tuple(grad.shape) == (40, 12)
        else:
            assert grad is None and not full & set(shapes), (step, shapes)
            assert model.up.weight_projected.grad is None  # consumed by the step
    handle.remove()
    assert not hasattr(model.up, "weight_projected")


def _trained_state(
    model: nn.Module, settings: dict, projected: bool, batches: list[torch.Tensor], seen: list[dict] | None = None
) -> dict:
    """The optimizer state after STEPS steps; ``seen`` gets, per step, R (the stand-in's gradient at its update) of
    every low-rank weight by name."""
    optimizer = build_optimizer(model, settings)
    handle = enable_projected_gradients(model, optimizer) if projected else None
    names = {id(p): n for n, p in model.named_parameters()}
    original = optimizer._apply_update

    def recording(group, param, stand_in, basis, side) -> None:
        seen[-1][names[id(param)]] = stand_in.grad.detach().clone()
        original(group, param, stand_in, basis, side)

    if seen is not None:
        optimizer._apply_update = recording
    for step in range(STEPS):
        if seen is not None:
            seen.append({})
        _lm_loss(model, batches[step]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state = optimizer.state_dict()["state"]
    if handle is not None:
        handle.remove()
    return state


WIDER = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=160, num_heads=4, num_layers=2, max_seq_len=16)


@pytest.mark.parametrize("side", ["left", "right"])
def test_projected_training_keeps_the_same_8bit_codes(side: str) -> None:
    """Rank 32 on 160 x 64 MLP weights: moments of 5120 elements, above the 8-bit threshold (4096). Batches of 8 x 16
    tokens: a gradient of fewer tokens than r has zero singular values whose vectors are arbitrary, and the two
    paths' last-bit differences would pick different ones."""
    torch.manual_seed(0)
    model = Llama(WIDER).double()
    batches = [torch.randint(0, WIDER.vocab_size, (8, 17)) for _ in range(STEPS)]
    settings = _settings(side, "importance", "keep", precision="8bit")
    settings["lowrank"]["rank"] = 32
    ordinary_r: list[dict] = []
    projected_r: list[dict] = []
    ordinary = _trained_state(copy.deepcopy(model), settings, False, batches, ordinary_r)
    projected = _trained_state(copy.deepcopy(model), settings, True, batches, projected_r)
    assert len(ordinary_r) == len(projected_r) == STEPS
    for step, (expected, actual) in enumerate(zip(ordinary_r, projected_r)):  # R at every step, every weight
        assert actual.keys() == expected.keys() and len(expected) == 14, step
        for name, value in expected.items():
            torch.testing.assert_close(actual[name], value, rtol=0, atol=1e-12, msg=f"step {step} {name}")
    flips = 0
    for index, entry in ordinary.items():
        for key, value in entry.items():
            other = projected[index][key]
            if value.dtype == torch.uint8:
                flips += int((value != other).sum())
            else:
                torch.testing.assert_close(other, value, rtol=1e-10, atol=1e-13, msg=f"{index}.{key}")
    assert any(v.dtype == torch.uint8 for e in ordinary.values() for v in e.values())
    assert flips == 0


def test_projected_gradients_and_per_layer_updates_refuse_each_other() -> None:
    from lowrank.per_layer import enable_per_layer

    model = MLP()
    settings = _settings("auto", "importance", "keep") | {"lowrank": {"rank": 4, "targets": [r"\bup\b"]}}
    optimizer = build_optimizer(model, settings)
    handle = enable_projected_gradients(model, optimizer)
    with pytest.raises(ValueError, match="projected gradients are on"):
        enable_per_layer(optimizer)
    handle.remove()
    updater = enable_per_layer(optimizer)
    with pytest.raises(ValueError, match="per-layer updates step inside backward"):
        enable_projected_gradients(model, optimizer)
    updater.remove()
    with pytest.raises(ValueError, match="Fira's residual"):
        fira = build_optimizer(model, settings | {"lowrank": {"rank": 4, "targets": [r"\bup\b"], "fira": True}})
        enable_projected_gradients(model, fira)
    with pytest.raises(ValueError, match="needs a LowRankOptimizer"):
        enable_projected_gradients(model, torch.optim.AdamW(model.parameters()))


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor], steps: range) -> None:
    for step in steps:
        for micro in range(ACCUMULATE):
            (_lm_loss(model, batches[step * ACCUMULATE + micro]) / ACCUMULATE).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _tiny_and_batches() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    return Llama(TINY).double(), [torch.randint(0, TINY.vocab_size, (2, 9)) for _ in range(STEPS * ACCUMULATE)]


def test_companions_registered_before_the_optimizer_train_as_enabling_after_it() -> None:
    """The Lightning order: add_companions from the config (before a wrapper), build_optimizer attaches them, then
    enable_projected_gradients reuses them."""
    model, batches = _tiny_and_batches()
    settings = _settings("auto", "importance", "rotate")
    expected = _train(copy.deepcopy(model), settings, False, batches, _lm_loss)
    names = add_companions(model, settings)
    assert len(names) == 14 and all(hasattr(model.get_submodule(n.rsplit(".", 1)[0]), COMPANION) for n in names)
    optimizer = build_optimizer(model, settings)
    assert len(optimizer.projected_weights()) == 14 and optimizer.param_groups[-1]["name"] == "projected"
    handle = enable_projected_gradients(model, optimizer)
    _steps(model, optimizer, batches, range(STEPS))
    handle.remove()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, dict(expected.named_parameters())[name], rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("first", ["projected", "ordinary"])
def test_a_checkpoint_resumes_across_projected_and_ordinary_training(first: str) -> None:
    """6 steps one way, the model's and the optimizer's state dicts, 6 more steps the other way: the weights of 12
        ordinary steps (float64). The model's state dict holds no companion; the optimizer's keeps the companions' group
    (last), without state."""
    model, batches = _tiny_and_batches()
    settings = _settings("auto", "importance", "rotate")
    expected = _train(copy.deepcopy(model), settings, False, batches, _lm_loss)

    def build(state: dict | None, projected: bool) -> tuple[nn.Module, torch.optim.Optimizer, object]:
        fresh = copy.deepcopy(model)
        optimizer = build_optimizer(fresh, settings)
        handle = enable_projected_gradients(fresh, optimizer) if projected else None
        if state is not None:
            fresh.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        return fresh, optimizer, handle

    one, optimizer, _ = build(None, first == "projected")
    _steps(one, optimizer, batches, range(STEPS // 2))
    state = {"model": copy.deepcopy(one.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict())}
    assert not any(key.endswith(COMPANION) for key in state["model"])
    names = [g["name"] for g in state["optimizer"]["param_groups"]]
    assert names == ["lowrank", "plain", "plain_no_decay", *(["projected"] if first == "projected" else [])]
    assert len(state["optimizer"]["state"]) == sum(len(g["params"]) for g in state["optimizer"]["param_groups"][:3])
    two, optimizer, _ = build(state, first != "projected")
    _steps(two, optimizer, batches, range(STEPS // 2, STEPS))
    for name, param in expected.named_parameters():
        torch.testing.assert_close(dict(two.named_parameters())[name], param, rtol=1e-10, atol=1e-13, msg=name)


def test_gradient_clipping_over_the_param_groups_sees_r_for_projected_weights() -> None:
    """The companions are listed in the optimizer's groups: a norm over the groups' gradients (what Lightning's
    clipping computes) counts ||R|| for each projected weight on a non-refresh step, and zero_grad clears R."""
    model, batches = _tiny_and_batches()
    settings = _settings("auto", "dominant", "keep")
    optimizer = build_optimizer(model, settings)
    handle = enable_projected_gradients(model, optimizer)
    _steps(model, optimizer, batches, range(1))  # the first bases
    _lm_loss(model, batches[2]).backward()  # step 1: no refresh
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    companions = [model.get_submodule(n.rsplit(".", 1)[0]).weight_projected for n in add_companions(model, settings)]
    assert all(any(g is c.grad for g in grads) for c in companions)
    assert all(p.grad is None for p in optimizer.projected_weights())
    optimizer.zero_grad(set_to_none=True)
    assert all(c.grad is None for c in companions)
    handle.remove()


@pytest.mark.slow  # torch.compile: about 10 s of compilation on 2 cores
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_compiled_model_with_projected_gradients_trains_as_the_eager_one(side: str) -> None:
    """torch.compile around the model: the refresh decision is a Python bool the compiled code is guarded on, so the
    refresh steps (0, 3, 6) and the steps between give the eager weights (fp32 tolerance)."""
    torch.manual_seed(0)
    base = MLP()
    batches = [torch.randn(8, 22) for _ in range(8)]
    settings = _settings(side, "importance", "keep") | {"lowrank": {"rank": 4, "side": side, "targets": [r"\bup\b"]}}
    trained = {}
    for compiled in (False, True):
        model = copy.deepcopy(base)
        optimizer = build_optimizer(model, settings)
        handle = enable_projected_gradients(model, optimizer)
        forward = torch.compile(model) if compiled else model
        for batch in batches:
            _mlp_loss(forward, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        handle.remove()
        trained[compiled] = copy.deepcopy(model)
    for (name, param), (_, expected) in zip(trained[True].named_parameters(), trained[False].named_parameters()):
        torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(trained[True].up.weight, base.up.weight)


def test_companions_hold_no_memory_after_the_first_step_and_survive_a_move() -> None:
    model, batches = _tiny_and_batches()
    optimizer = build_optimizer(model, _settings("auto", "dominant", "keep"))
    handle = enable_projected_gradients(model, optimizer)
    companions = [m.weight_projected for m in model.modules() if hasattr(m, COMPANION)]
    assert len(companions) == 14 and all(c.untyped_storage().nbytes() == c.numel() * 8 for c in companions)
    _steps(model, optimizer, batches, range(1))
    assert all(c.stride() == (0, 0) and c.untyped_storage().nbytes() == 8 for c in companions)  # one float64 zero
    assert all(torch.isfinite(p).all() for p in model.parameters())  # every parameter stays readable
    model.float().double()  # a move copies the views into real tensors; the next step makes them hollow again
    _steps(model, optimizer, batches, range(1, 2))
    assert all(c.stride() == (0, 0) for c in companions)
    handle.remove()
