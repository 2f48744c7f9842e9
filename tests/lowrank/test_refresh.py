"""Refreshing bases: the optimizer's schedule, resample(), degenerate gradients, the closure and the randomness rule."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lowrank import LowRankOptimizer, RefreshSchedule, subspace_overlap

NEVER = RefreshSchedule(update_gap=10**9)  # step() refreshes only at step 0 and where a parameter has no basis


def _opt(params, **kwargs) -> LowRankOptimizer:
    names = kwargs.pop("names", None)
    group = {"params": params, "rank": kwargs.pop("rank", 3)}
    if names:
        group["param_names"] = names
    return LowRankOptimizer([group], lr=0.01, **kwargs)


def _grad(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _bases_over(opt, weight, steps, grad_fn):
    bases = []
    for step in range(steps):
        weight.grad = grad_fn(step)
        opt.step()
        bases.append(opt.state[weight]["lowrank_basis"].clone())
    return bases


def test_step_refreshes_every_update_gap_steps_only():
    weight = nn.Parameter(torch.zeros(10, 8))
    opt = _opt([weight], selector="dominant", schedule=RefreshSchedule(update_gap=4))
    bases = _bases_over(opt, weight, 10, lambda s: _grad((10, 8), s))
    changed = [s for s in range(1, 10) if not torch.equal(bases[s], bases[s - 1])]
    assert changed == [4, 8]


def _dominant_projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """Float64 oracle: projector onto the top-``rank`` right singular vectors of G (m >= n: right side)."""
    _, _, vh = torch.linalg.svd(grad.double(), full_matrices=False)
    v = vh[:rank].T
    return v @ v.T


def test_step_does_not_refresh_again_after_resample_ran_the_scheduled_refresh():
    weight = nn.Parameter(torch.zeros(10, 8))
    opt = _opt([weight], selector="dominant", schedule=RefreshSchedule(update_gap=1))  # every step is due
    delivered = []
    opt.register_refresh_listener(lambda o, records: delivered.append([(r.name, r.step) for r in records]))
    for step in range(4):
        weight.grad = _grad((10, 8), step)
        (record,) = opt.resample()  # the step's scheduled refresh, run early, from this gradient
        assert (record.name, record.step, record.selector) == ("group0.param0", step, "dominant")
        weight.grad = _grad((10, 8), 100 + step)  # a refresh inside step() would pick this gradient's subspace
        opt.step()
        basis = opt.state[weight]["lowrank_basis"].double()
        torch.testing.assert_close(basis @ basis.T, _dominant_projector(_grad((10, 8), step), 3), rtol=0, atol=1e-5)
        assert delivered[-1] == [("group0.param0", step)]  # one refresh per step, delivered after it
    assert len(delivered) == 4


def test_resample_params_is_a_manual_refresh_outside_the_schedule():
    weight = nn.Parameter(torch.zeros(10, 8))
    opt = _opt([weight], selector="dominant", schedule=NEVER)
    bases = _bases_over(opt, weight, 5, lambda s: _grad((10, 8), s))
    assert all(torch.equal(b, bases[0]) for b in bases)  # only the first basis, created at the first step
    weight.grad = _grad((10, 8), 99)
    assert opt.resample() == []  # step 5 is not due: the schedule's refresh is empty
    assert torch.equal(opt.state[weight]["lowrank_basis"], bases[-1])
    records = opt.resample(params=[weight])
    assert len(records) == 1
    record = records[0]
    assert record.name == "group0.param0" and record.step == 5 and record.selector == "dominant"
    assert torch.equal(record.old_basis, bases[-1]) and torch.equal(
        record.new_basis, opt.state[weight]["lowrank_basis"]
    )
    new = record.new_basis.double()
    torch.testing.assert_close(new @ new.T, _dominant_projector(_grad((10, 8), 99), 3), rtol=0, atol=1e-5)
    expected = float((bases[-1].double().T @ new).square().sum()) / 3
    assert record.overlap == pytest.approx(expected) and 0.0 <= record.overlap <= 1.0
    assert record.chance == pytest.approx(3 / 8)
    weight.grad = _grad((10, 8), 7)
    opt.step()  # not due: keeps the manual basis
    assert torch.equal(opt.state[weight]["lowrank_basis"], record.new_basis)


def test_manual_resample_does_not_replace_the_scheduled_refresh():
    weight = nn.Parameter(torch.zeros(10, 8))
    opt = _opt([weight], selector="dominant", schedule=RefreshSchedule(update_gap=2))
    delivered = []
    opt.register_refresh_listener(lambda o, records: delivered.append([(r.name, r.step) for r in records]))
    for step in range(3):
        weight.grad = _grad((10, 8), step)
        if step == 2:
            opt.resample(params=["group0.param0"])  # manual, at a due step: step() still runs the schedule's
            weight.grad = _grad((10, 8), 50)
        opt.step()
    assert delivered == [[("group0.param0", 0)], [("group0.param0", 2), ("group0.param0", 2)]]
    basis = opt.state[weight]["lowrank_basis"].double()
    torch.testing.assert_close(basis @ basis.T, _dominant_projector(_grad((10, 8), 50), 3), rtol=0, atol=1e-5)


def test_resample_subset_by_name_or_tensor_and_selector_override():
    a, b = nn.Parameter(torch.zeros(6, 5)), nn.Parameter(torch.zeros(7, 5))
    opt = _opt([a, b], names=["layers.0.q_proj.weight", "layers.0.k_proj.weight"], schedule=NEVER)
    a.grad, b.grad = _grad((6, 5), 1), _grad((7, 5), 2)
    assert [r.name for r in opt.resample(params=["layers.0.k_proj.weight"])] == ["layers.0.k_proj.weight"]
    assert [r.name for r in opt.resample(params=[a])] == ["layers.0.q_proj.weight"]
    (record,) = opt.resample(params=[a], selector="random")
    assert record.selector == "random"
    b.grad = None
    assert [r.name for r in opt.resample()] == ["layers.0.q_proj.weight"]  # step 0 is due; b has no gradient


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_degenerate_gradient_keeps_the_old_basis_and_warns(bad):
    weight = nn.Parameter(torch.zeros(6, 5))
    opt = _opt([weight], names=["blocks.3.mlp.up_proj.weight"], schedule=RefreshSchedule(update_gap=1))
    weight.grad = _grad((6, 5), 0)
    opt.step()
    old = opt.state[weight]["lowrank_basis"].clone()
    weight.grad = torch.full((6, 5), bad) if bad != 0.0 else torch.zeros(6, 5)
    with pytest.warns(UserWarning, match=r"blocks\.3\.mlp\.up_proj\.weight.*old basis is kept"):
        assert opt.resample() == []
    assert torch.equal(opt.state[weight]["lowrank_basis"], old)


def test_zero_gradient_first_step_gets_placeholder_basis():
    """What the distributed-checkpoint loader does: a step with zero gradients on a fresh optimizer."""
    weight = nn.Parameter(torch.ones(6, 5))
    opt = _opt([weight], rank=2)
    weight.grad = torch.zeros(6, 5)
    with pytest.warns(UserWarning, match="placeholder"):
        opt.step()
    assert torch.equal(opt.state[weight]["lowrank_basis"], torch.eye(5, 2))
    assert torch.equal(weight.detach(), torch.ones(6, 5))  # zero gradient, zero update
    assert set(opt.state_dict()["state"][0]) >= {"exp_avg", "exp_avg_sq", "lowrank_basis"}


def test_state_initialising_lr_zero_step_makes_placeholders_silently():
    """torch.distributed.checkpoint's loader steps a fresh optimizer once with lr 0 and zero gradients: the
    placeholders it needs are expected, so no warning (one per weight and rank on every resume otherwise)."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    weight = nn.Parameter(torch.ones(6, 5))
    opt = _opt([weight], rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _init_optim_state(opt)
    assert torch.equal(opt.state[weight]["lowrank_basis"], torch.eye(5, 2))
    assert opt.param_groups[0]["lr"] != 0  # restored
    weight.grad = torch.zeros(6, 5)
    with pytest.warns(UserWarning, match="old basis is kept"):  # a real zero gradient later still warns
        assert opt.resample(params=[weight]) == []


def test_closure_runs_before_gradients_are_read():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(6, 5))
    twin = nn.Parameter(weight.detach().clone())
    x = torch.randn(4, 5)
    opt_closure, opt_plain = _opt([weight], seed=3), _opt([twin], seed=3)

    def closure():
        opt_closure.zero_grad()
        loss = (x @ weight.T).square().sum()
        loss.backward()
        return loss

    loss = opt_closure.step(closure)  # weight.grad is None before the closure runs
    (x @ twin.T).square().sum().backward()
    opt_plain.step()
    assert loss is not None and torch.equal(weight, twin)
    assert not torch.equal(weight.detach(), torch.zeros(6, 5))


def test_draws_follow_the_randomness_rule():
    torch.manual_seed(0)
    g = _grad((12, 9), 4)

    def basis(seed, name, step=0, selector="importance"):
        w = nn.Parameter(torch.zeros(12, 9))
        opt = _opt([w], seed=seed, names=[name], selector=selector, rank=4, schedule=NEVER)
        w.grad = g.clone()
        opt.resample(step=step)
        return opt.state[w]["lowrank_basis"]

    rng_before = torch.get_rng_state()
    ref = basis(1, "layers.0.up_proj.weight")
    for selector in ("importance", "random", "randomized_importance"):
        a = basis(1, "layers.0.up_proj.weight", selector=selector)
        assert torch.equal(a, basis(1, "_orig_mod.layers.0.up_proj.weight", selector=selector))
        assert torch.equal(a, basis(1, "layers.0._checkpoint_wrapped_module.up_proj.weight", selector=selector))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG was never used
    others = [
        basis(2, "layers.0.up_proj.weight"),
        basis(1, "layers.1.up_proj.weight"),
        basis(1, "layers.0.up_proj.weight", step=200),
    ]
    assert any(subspace_overlap(ref, o) < 0.999 for o in others)
    assert all(
        not torch.equal(ref, o)
        for o in [basis(1, "layers.0.up_proj.weight", selector="random", step=s) for s in (1, 2)]
    )


def test_refresh_does_not_touch_plain_parameters_or_warn_on_healthy_gradients():
    w, bias = nn.Parameter(torch.zeros(6, 5)), nn.Parameter(torch.zeros(6))
    opt = LowRankOptimizer([{"params": [w], "rank": 2}, {"params": [bias]}], lr=0.1)
    w.grad, bias.grad = _grad((6, 5), 1), torch.ones(6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert "lowrank_basis" not in opt.state[bias]
    torch.testing.assert_close(bias.detach(), torch.full((6,), -0.1))  # plain Adam: first step moves by lr


# ------------------------------------------------------------------------------- zero gradients: one warning per step
NAMES_14 = [f"layers.{i // 2}.{'q' if i % 2 == 0 else 'k'}_proj.weight" for i in range(14)]


def _lowrank_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("lowrank:")]


@pytest.mark.parametrize("per_layer", [False, True])
def test_one_warning_per_refresh_names_every_zero_gradient_parameter(per_layer: bool) -> None:
    from lowrank.per_layer import enable_per_layer

    weights = [nn.Parameter(torch.zeros(6, 5)) for _ in NAMES_14]
    targets = [_grad((6, 5), i) for i in range(len(weights))]
    opt = _opt(weights, names=NAMES_14, schedule=RefreshSchedule(update_gap=1))
    updater = enable_per_layer(opt) if per_layer else None

    def step(scale: float) -> list[str]:
        loss = scale * sum((w * g).sum() for w, g in zip(weights, targets))  # gradient: scale * G_i
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss.backward()
            opt.step()
            opt.zero_grad()
        return _lowrank_warnings(caught)

    assert step(1.0) == []  # step 0: first bases
    (message,) = step(0.0)  # step 1: every gradient is zero: one warning, not 14
    assert "of 14 parameter(s) is all zero or non-finite at step 1" in message
    assert message.count("_proj.weight") == 14 and all(repr(name) in message for name in NAMES_14)
    assert message.endswith("the old basis is kept")
    if updater is not None:
        updater.remove()


def test_first_step_placeholders_and_kept_bases_share_the_one_warning() -> None:
    a, b, c = (nn.Parameter(torch.zeros(6, 5)) for _ in range(3))
    opt = _opt([a, b, c], names=["a.weight", "b.weight", "c.weight"], schedule=RefreshSchedule(update_gap=1))
    a.grad, b.grad, c.grad = _grad((6, 5), 1), _grad((6, 5), 2), torch.zeros(6, 5)
    with pytest.warns(UserWarning) as caught:
        opt.step()  # c has no basis and a zero gradient: placeholder
    assert _lowrank_warnings(caught.list) == [
        "lowrank: the gradient of 1 parameter(s) is all zero or non-finite at step 0, so they were not refreshed: "
        "'c.weight': a placeholder basis (first axes) is used"
    ]
    a.grad, b.grad, c.grad = torch.zeros(6, 5), torch.full((6, 5), float("nan")), _grad((6, 5), 3)
    with pytest.warns(UserWarning) as caught:
        opt.step()
    assert _lowrank_warnings(caught.list) == [
        "lowrank: the gradient of 2 parameter(s) is all zero or non-finite at step 1, so they were not refreshed: "
        "'a.weight', 'b.weight': the old basis is kept"
    ]
