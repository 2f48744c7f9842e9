"""Per-layer updates (lowrank.per_layer) against the ordinary step with per-parameter clipping as the oracle."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lowrank.optimizer import LowRankOptimizer
from lowrank.per_layer import enable_per_layer
from lowrank.schedule import RefreshSchedule


class Tiny(nn.Module):
    """Embedding and norm (plain), two linear weights (low-rank, one wide and one tall), biases (plain)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 12)
        self.fc1 = nn.Linear(12, 20)
        self.fc2 = nn.Linear(20, 12)
        self.norm = nn.LayerNorm(12)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        return self.norm(x + self.fc2(torch.tanh(self.fc1(x))))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 10, (6,), generator=g), torch.randn(6, 12, generator=g)


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    tokens, target = batch(step)
    return nn.functional.mse_loss(model(tokens), target)


def make(
    model: nn.Module,
    selector: str = "importance",
    base: str = "adamw",
    schedule: RefreshSchedule | None = None,
    **extra,
) -> LowRankOptimizer:
    lowrank = [model.fc1.weight, model.fc2.weight]
    plain = [p for p in model.parameters() if all(p is not q for q in lowrank)]
    groups = [
        {"params": lowrank, "param_names": ["fc1.weight", "fc2.weight"], "rank": 3, "selector": selector, **extra},
        {"params": plain, "param_names": [f"plain{i}" for i in range(len(plain))], "weight_decay": 0.0},
    ]
    schedule = RefreshSchedule(update_gap=2) if schedule is None else schedule
    return LowRankOptimizer(groups, base=base, lr=1e-2, weight_decay=0.1, schedule=schedule)


def run_ordinary(
    selector: str, base: str, clip: float | None, steps: int, **extra
) -> tuple[nn.Module, LowRankOptimizer]:
    model = Tiny()
    opt = make(model, selector, base, **extra)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, step).backward()
        if clip is not None:
            for p in model.parameters():  # the oracle: torch's clipping, one parameter at a time
                torch.nn.utils.clip_grad_norm_(p, clip)
        opt.step()
        sched.step()
    return model, opt


def run_per_layer(
    selector: str, base: str, clip: float | None, steps: int, **extra
) -> tuple[nn.Module, LowRankOptimizer]:
    model = Tiny()
    opt = make(model, selector, base, **extra)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    enable_per_layer(opt, clip_norm=clip)
    for step in range(steps):
        opt.zero_grad()
        opt.step(lambda: loss_of(model, step).backward())  # as Lightning does: closure = forward + backward
        sched.step()
    return model, opt


@pytest.mark.parametrize("selector", ["dominant", "importance"])
@pytest.mark.parametrize("base", ["adamw", "adafactor"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_same_weights_as_ordinary_step(selector: str, base: str, clip: float | None) -> None:
    # 5 steps with update_gap=2: refreshes at steps 0, 2 and 4 inside backward; lr changes every step.
    ref_model, ref_opt = run_ordinary(selector, base, clip, steps=5)
    model, opt = run_per_layer(selector, base, clip, steps=5)
    for (name, ref), (_, got) in zip(ref_model.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7, msg=name)
    assert opt.param_groups[0]["lowrank_step"] == 5
    got_state, ref_state = opt.state_dict(), ref_opt.state_dict()
    assert got_state["param_groups"] == ref_state["param_groups"]  # same layout, same counters
    torch.testing.assert_close(got_state["state"], ref_state["state"], rtol=1e-6, atol=1e-7)


def test_clipping_changes_the_result() -> None:
    # Guards the test above: with clip 0.05 the gradients are really clipped, so a missing clip would be seen.
    unclipped, _ = run_per_layer("dominant", "adamw", None, steps=3)
    clipped, _ = run_per_layer("dominant", "adamw", 0.05, steps=3)
    oracle, _ = run_ordinary("dominant", "adamw", 0.05, steps=3)
    assert not torch.allclose(unclipped.fc1.weight, clipped.fc1.weight, atol=1e-6)
    torch.testing.assert_close(clipped.fc1.weight, oracle.fc1.weight)


def test_fira_and_rotate_match_too() -> None:
    ref_model, _ = run_ordinary("dominant", "adamw", None, steps=4, fira=True, moment_policy="rotate")
    model, _ = run_per_layer("dominant", "adamw", None, steps=4, fira=True, moment_policy="rotate")
    for ref, got in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


def test_stagger_and_switch_match_ordinary_step() -> None:
    # Two low-rank weights, T = 2, stagger 2: fc1 (slice 0, offset 0) at steps 0, 2, 4; fc2 (slice 1, offset 1) at
    # 0 (no basis yet), 1, 3, 5. Switch at ceil(0.5 * 6) = 3: importance before, random from step 3 on.
    schedule = RefreshSchedule(update_gap=2, stagger=2, switch_at=0.5, switch_to="random", max_steps=6)
    expected = {
        0: {("fc1.weight", "importance"), ("fc2.weight", "importance")},
        1: {("fc2.weight", "importance")},
        2: {("fc1.weight", "importance")},
        3: {("fc2.weight", "random")},
        4: {("fc1.weight", "random")},
        5: {("fc2.weight", "random")},
    }
    seen: dict[str, list] = {"ordinary": [], "per_layer": []}

    def make_listener(kind: str):
        return lambda opt, records: seen[kind].extend(records)

    def run(kind: str) -> nn.Module:
        model = Tiny()
        opt = make(model, "importance", schedule=schedule)
        opt.register_refresh_listener(make_listener(kind))
        if kind == "per_layer":
            enable_per_layer(opt)
        for step in range(6):
            opt.zero_grad()
            if kind == "per_layer":
                opt.step(lambda: loss_of(model, step).backward())
            else:
                loss_of(model, step).backward()
                opt.step()
        return model

    ref_model, model = run("ordinary"), run("per_layer")
    for (name, ref), (_, got) in zip(ref_model.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7, msg=name)
    for kind, records in seen.items():
        got = {}
        for record in records:
            got.setdefault(record.step, set()).add((record.name, record.selector))
        assert got == expected, kind
    ordinary = {(r.name, r.step): r for r in seen["ordinary"]}
    for record in seen["per_layer"]:
        assert record.old_basis is None  # freed inside backward
        twin = ordinary[(record.name, record.step)]
        if twin.old_basis is None:
            assert record.overlap is None
        else:
            assert record.overlap == pytest.approx(twin.overlap, rel=1e-5, abs=1e-6)
        torch.testing.assert_close(record.new_basis, twin.new_basis, rtol=1e-5, atol=1e-6)


def test_refresh_happens_in_backward_on_schedule() -> None:
    model = Tiny()
    opt = make(model, "dominant")
    enable_per_layer(opt)
    bases = []
    for step in range(4):
        loss_of(model, step).backward()
        bases.append(opt.state[model.fc1.weight]["lowrank_basis"].clone())  # before step(): set inside backward
        opt.step()
    assert not torch.equal(bases[0], bases[2])  # refreshed at step 2
    assert torch.equal(bases[0], bases[1]) and torch.equal(bases[2], bases[3])  # kept in between


def alive_grad_counts(model: nn.Module, per_layer: bool) -> list[int]:
    """Number of parameters holding a gradient each time one is accumulated (hooks registered before ours run
    first, so each count includes the gradient just accumulated)."""
    opt = make(model)
    params = list(model.parameters())
    counts: list[int] = []
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _: counts.append(sum(q.grad is not None for q in params)))
    if per_layer:
        enable_per_layer(opt)
    loss_of(model, 0).backward()
    return counts


def test_gradients_are_freed_inside_backward() -> None:
    model = Tiny()
    counts = alive_grad_counts(model, per_layer=True)
    assert len(counts) == len(list(model.parameters()))
    assert max(counts) == 1
    assert all(p.grad is None for p in model.parameters())
    ordinary = alive_grad_counts(Tiny(), per_layer=False)  # without it they pile up
    assert max(ordinary) == len(ordinary)


def test_step_after_backward_only_advances_counters() -> None:
    model = Tiny()
    opt = make(model)
    enable_per_layer(opt)
    loss_of(model, 0).backward()
    after_backward = copy.deepcopy(model.state_dict())
    opt.step()
    for key, value in model.state_dict().items():
        assert torch.equal(value, after_backward[key]), key
    assert opt.param_groups[0]["lowrank_step"] == 1


def test_checkpoint_resumes_into_ordinary_steps() -> None:
    ref_model, _ = run_ordinary("importance", "adamw", None, steps=4)
    model, opt = run_per_layer("importance", "adamw", None, steps=2)
    opt.per_layer.remove()
    fresh_model = Tiny()
    fresh_model.load_state_dict(model.state_dict())
    fresh = make(fresh_model)
    fresh.load_state_dict(torch.load(_saved(opt), weights_only=True))
    # The schedule's position after two steps (initial_lr comes with the checkpoint's groups).
    sched = torch.optim.lr_scheduler.LambdaLR(fresh, lambda s: 1.0 / (1 + s), last_epoch=1)
    for step in (2, 3):
        fresh.zero_grad()
        loss_of(fresh_model, step).backward()
        fresh.step()
        sched.step()
    for ref, got in zip(ref_model.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


def _saved(opt: LowRankOptimizer) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return buffer


def test_remove_restores_ordinary_steps() -> None:
    model = Tiny()
    opt = make(model)
    updater = enable_per_layer(opt)
    updater.remove()
    assert opt.per_layer is None
    loss_of(model, 0).backward()
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------------------------ errors
def test_gradient_accumulation_is_refused_in_the_second_backward() -> None:
    model = Tiny()
    opt = make(model)
    enable_per_layer(opt)
    loss_of(model, 0).backward()
    with pytest.raises(RuntimeError, match="second gradient before optimizer.step\\(\\).*no gradient accumulation"):
        loss_of(model, 1).backward()


def test_one_backward_per_step_is_fine() -> None:
    model = Tiny()
    opt = make(model)
    enable_per_layer(opt)
    for step in range(3):
        loss_of(model, step).backward()
        opt.step()


def test_outside_schedule_is_refused() -> None:
    # A split refresh has nothing to split inside backward, and resample() would find no gradients.
    model = Tiny()
    opt = make(model, schedule=RefreshSchedule(update_gap=2, split_across_ranks=True))
    with pytest.raises(ValueError, match="split_across_ranks is True"):
        enable_per_layer(opt)
    opt.schedule = RefreshSchedule(update_gap=2)
    enable_per_layer(opt)
    with pytest.raises(RuntimeError, match="resample\\(\\) cannot run with per-layer updates"):
        opt.resample()
    with pytest.raises(RuntimeError, match="resample\\(\\) cannot run with per-layer updates"):
        opt.resample(params=["fc1.weight"])


@pytest.mark.parametrize("clip", [0, -1.0, "1", True, float("nan")])
def test_bad_clip_norm(clip) -> None:
    with pytest.raises(ValueError, match="clip_norm: invalid value"):
        enable_per_layer(make(Tiny()), clip_norm=clip)


def test_enabled_twice() -> None:
    opt = make(Tiny())
    enable_per_layer(opt)
    with pytest.raises(ValueError, match="already enabled"):
        enable_per_layer(opt)


def test_not_a_lowrank_optimizer() -> None:
    with pytest.raises(ValueError, match="need a lowrank.LowRankOptimizer, got SGD"):
        enable_per_layer(torch.optim.SGD(Tiny().parameters(), lr=0.1))


def test_several_processes_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="2 processes: per-layer updates run on a single device"):
        enable_per_layer(make(Tiny()))


def test_sharded_parameters_are_refused() -> None:
    model = Tiny()
    model.fc1.weight._fsdp_flattened = True  # how FSDP1 marks its flat parameters
    with pytest.raises(ValueError, match="sharded \\(FSDP/DTensor\\) parameters"):
        enable_per_layer(make(model))


def test_parameters_without_hook_are_stepped_once_by_step() -> None:
    # A group added after enabling has no hook: its gradient survives backward and step() updates it, once (the
    # hooked parameters' base steps in between must not touch it).
    def run(per_layer: bool) -> torch.Tensor:
        model = Tiny()
        extra = nn.Parameter(torch.ones(5))
        opt = make(model)
        if per_layer:
            enable_per_layer(opt)
        opt.add_param_group({"params": [extra], "param_names": ["extra"]})
        for step in range(3):
            opt.zero_grad()
            (loss_of(model, step) + (extra * torch.arange(5.0)).sum()).backward()
            opt.step()
        return extra.detach()

    torch.testing.assert_close(run(per_layer=True), run(per_layer=False), rtol=0, atol=0)


def test_step_parameter_of_a_foreign_tensor() -> None:
    foreign = nn.Parameter(torch.ones(3))
    foreign.grad = torch.ones(3)
    with pytest.raises(ValueError, match="step_parameter: a tensor of shape \\(3,\\) is not a parameter"):
        make(Tiny()).step_parameter(foreign)
