"""bf16 and 8-bit AdamW as the low-rank optimizer's base: against base ``adamw``, moment policies, resume, bytes."""

from __future__ import annotations

import functools
import io

import pytest
import torch
from torch import nn

from lowrank import BASES, LowRankOptimizer, RefreshSchedule
from lowrank.compact_adamw import CompactAdamW
from lowrank.moment_storage import read_moment, store_moment
from lowrank.moments import apply_moment_policy
from lowrank.projector import basis_dim, projected_shape, resolve_side
from lowrank.quantization import smallest_code

from .helpers import gen, random_orthonormal


class LeastSquares(nn.Module):
    """y = x W^T + b on fixed data; W (128, 96) goes low-rank (right side, moments (128, 32): 8-bit by default)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(128, 96, generator=gen(0)))
        self.bias = nn.Parameter(torch.zeros(128))
        self.x = torch.randn(256, 96, generator=gen(1))
        self.y = self.x @ torch.randn(96, 128, generator=gen(2))

    def loss(self, step: int) -> torch.Tensor:
        rows = torch.randint(0, 256, (64,), generator=gen(100 + step))
        return (self.x[rows] @ self.weight.T + self.bias - self.y[rows]).square().mean()


def _train(base, steps: int = 20, update_gap: int = 1000, **lowrank) -> tuple[LeastSquares, LowRankOptimizer]:
    model = LeastSquares()
    options = {"alpha": 1.0, **lowrank}
    opt = LowRankOptimizer(
        [{"params": [model.weight], "rank": 32}, {"params": [model.bias]}],
        lr=0.01,
        weight_decay=0.01,
        base=base,
        schedule=RefreshSchedule(update_gap=update_gap),
        **options,
    )
    for step in range(steps):
        opt.zero_grad()
        model.loss(step).backward()
        opt.step()
    return model, opt


def test_compact_fp32_base_equals_adamw_base(fixed_selector):
    fixed_selector.bases[96] = random_orthonormal(96, 32, seed=3, dtype=torch.float32)
    ref, _ = _train("adamw", steps=6, selector="test_fixed")
    got, _ = _train(functools.partial(CompactAdamW, state_precision="fp32"), steps=6, selector="test_fixed")
    assert torch.equal(ref.weight, got.weight) and torch.equal(ref.bias, got.bias)


@pytest.mark.parametrize("base,bound", [("adamw_bf16", 0.01), ("adamw8bit", 0.05)])
def test_compact_bases_stay_close_to_adamw_with_a_fixed_basis(fixed_selector, base, bound):
    """Bounds as in test_compact_adamw (measured 0.2% and 2.5% of the distance moved)."""
    fixed_selector.bases[96] = random_orthonormal(96, 32, seed=3, dtype=torch.float32)
    start = LeastSquares().weight.detach()
    ref, _ = _train("adamw", selector="test_fixed")
    got, opt = _train(base, selector="test_fixed")
    moved = (ref.weight - start).norm()
    assert moved > 0.3 * start.norm()
    assert (got.weight - ref.weight).norm() < bound * moved
    assert (got.bias - ref.bias).norm() < bound * ref.bias.norm()
    expected = torch.uint8 if base == "adamw8bit" else torch.bfloat16
    assert opt.state_dict()["state"][0]["exp_avg"].dtype == expected


@pytest.mark.parametrize("policy", ["keep", "rotate", "reset"])
def test_moment_policies_with_8bit_states_follow_fp32(policy):
    """The random selector's draws do not depend on gradients, so both runs see the same basis changes."""
    start = LeastSquares().weight.detach()
    ref, _ = _train("adamw", steps=12, selector="random", update_gap=4, moment_policy=policy)
    got, opt = _train("adamw8bit", steps=12, selector="random", update_gap=4, moment_policy=policy)
    assert opt.state_dict()["state"][0]["exp_avg"].dtype == torch.uint8
    assert (got.weight - ref.weight).norm() < 0.05 * (ref.weight - start).norm()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("precision,tolerance", [("8bit", 1 / 16), ("bf16", 2**-8), ("fp32", 1e-6)])
def test_rotate_decodes_rotates_and_reencodes(side, precision, tolerance):
    d, r, k = 40, 8, 300
    old, new = (random_orthonormal(d, r, seed=seed, dtype=torch.float32) for seed in (4, 5))
    shape = (r, k) if side == "left" else (k, r)
    state: dict[str, torch.Tensor] = {"step": torch.tensor(3.0)}
    store_moment(state, "exp_avg", torch.randn(*shape, generator=gen(6)), precision, True, block_size=64)
    store_moment(state, "exp_avg_sq", torch.rand(*shape, generator=gen(7)), precision, False, block_size=64)
    m0, v0 = read_moment(state, "exp_avg", True).double(), read_moment(state, "exp_avg_sq", False).double()
    change = new.double().T @ old.double()  # (r, r), float64 oracle
    m1, v1 = (change @ m0, change.square() @ v0) if side == "left" else (m0 @ change.T, v0 @ change.square().T)
    codes_before = state["exp_avg"].clone()
    apply_moment_policy("keep", state, old, new, side, ("exp_avg",), ("exp_avg_sq",))
    assert torch.equal(state["exp_avg"], codes_before)
    apply_moment_policy("rotate", state, old, new, side, ("exp_avg",), ("exp_avg_sq",))
    assert state["exp_avg"].dtype == codes_before.dtype and state["step"] == 3
    for key, signed, expected in (("exp_avg", True, m1), ("exp_avg_sq", False, v1)):
        got = read_moment(state, key, signed).double()
        floor = smallest_code(signed) / 2 * expected.abs().max() if precision == "8bit" else 0.0
        assert torch.all((got - expected).abs() <= tolerance * expected.abs() * (1 + 1e-4) + floor + 1e-6), key
    assert torch.all(read_moment(state, "exp_avg_sq", False) >= 0)
    apply_moment_policy("reset", state, old, new, side, ("exp_avg",), ("exp_avg_sq",))
    assert state == {}


def test_8bit_state_resumes_bit_exactly_across_a_resample():
    def build() -> tuple[nn.ModuleList, LowRankOptimizer]:
        layers = nn.ModuleList([nn.Linear(48, 80), nn.Linear(80, 48)])
        for i, layer in enumerate(layers):
            nn.init.normal_(layer.weight, std=0.1, generator=gen(20 + i))
            nn.init.zeros_(layer.bias)
        opt = LowRankOptimizer(
            [
                {"params": [layers[0].weight, layers[1].weight], "rank": 8, "param_names": ["a", "b"]},
                {"params": [layers[0].bias, layers[1].bias], "param_names": ["c", "d"]},
            ],
            lr=0.01,
            base="adamw8bit",
            base_options={"min_8bit_size": 0, "block_size": 32},
            selector="importance",
            schedule=RefreshSchedule(update_gap=3),
            moment_policy="rotate",
            fira=True,
            seed=5,
        )
        return layers, opt

    def train(layers: nn.ModuleList, opt: LowRankOptimizer, steps: range) -> None:
        for step in steps:
            x = torch.randn(16, 48, generator=gen(200 + step))
            opt.zero_grad()
            layers[1](torch.tanh(layers[0](x))).square().mean().backward()
            opt.step()

    reference, opt_ref = build()
    train(reference, opt_ref, range(8))  # refreshes at 0, 3, 6
    resumed, opt_a = build()
    train(resumed, opt_a, range(4))  # past the refresh at step 3
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optimizer": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    fresh, opt_b = build()
    fresh.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["optimizer"])
    train(fresh, opt_b, range(4, 8))
    for p, q in zip(reference.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    state_ref, state_b = opt_ref.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_ref[0]["exp_avg"].dtype == torch.uint8 and "exp_avg_absmax" in state_ref[0]
    for index in state_ref:
        assert state_ref[index].keys() == state_b[index].keys()
        for key, value in state_ref[index].items():
            assert torch.equal(value, state_b[index][key]), (index, key)


def _lowrank_state_bytes(shapes: dict[str, tuple[int, ...]], targets: tuple[str, ...], rank: int, base: str) -> dict:
    """Bytes per parameter from the spec's bytes function: base state of the projected (or full) shape + basis."""
    spec, out = BASES[base], {}
    for name, shape in shapes.items():
        if name.endswith(targets):
            side = resolve_side(shape)
            moments = spec.estimate_state_bytes(projected_shape(shape, side, rank), torch.float32)
            out[name] = (moments, basis_dim(shape, side) * rank * 4)
        else:
            out[name] = (spec.estimate_state_bytes(shape, torch.float32), 0)
    return out


def test_state_bytes_function_matches_real_tensors():
    shapes = {"embed": (64, 96), "q": (96, 96), "up": (160, 96), "down": (96, 160), "tiny": (96, 64), "norm": (96,)}
    targets = ("q", "up", "down", "tiny")
    params = {name: nn.Parameter(torch.randn(*shape, generator=gen(30))) for name, shape in shapes.items()}
    for rank, base in ((48, "adamw8bit"), (8, "adamw8bit"), (48, "adamw_bf16"), (48, "adamw")):
        opt = LowRankOptimizer(
            [
                {"params": [params[n] for n in targets], "rank": rank, "param_names": list(targets)},
                {"params": [params["embed"], params["norm"]], "param_names": ["embed", "norm"]},
            ],
            base=base,
            selector="random",
        )
        for p in params.values():
            p.grad = torch.randn_like(p)
        opt.step()
        expected = _lowrank_state_bytes(shapes, targets, rank, base)
        assert opt.state_bytes() == sum(m + b for m, b in expected.values())
        if base == "adamw8bit":  # the "tiny" stand-in (96, rank) is 8-bit at rank 48, fp32 below 4096 elements
            assert expected["tiny"][0] == (2 * (96 * 48 + 4 * 96) if rank == 48 else 2 * 96 * 8 * 4)


def c4_60m_shapes() -> dict[str, tuple[int, ...]]:
    """LLaMA 60M (hidden 512, intermediate 1376, 8 layers, vocab 32000), as shapes only: nothing allocated."""
    shapes = {"embed_tokens": (32000, 512), "lm_head": (32000, 512), "norm": (512,)}
    for i in range(8):
        for kind in ("q", "k", "v", "o"):
            shapes[f"layers.{i}.{kind}_proj"] = (512, 512)
        shapes.update(
            {
                f"layers.{i}.gate_proj": (1376, 512),
                f"layers.{i}.up_proj": (1376, 512),
                f"layers.{i}.down_proj": (512, 1376),
                f"layers.{i}.input_norm": (512,),
                f"layers.{i}.post_norm": (512,),
            }
        )
    return shapes


def test_c4_60m_8bit_state_is_under_30_percent_of_fp32():
    shapes, targets = c4_60m_shapes(), tuple(f"{k}_proj" for k in ("q", "k", "v", "o", "gate", "up", "down"))
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 58_073_600  # docs/reference.md: 58.1M
    fp32 = _lowrank_state_bytes(shapes, targets, 128, "adamw")
    int8 = _lowrank_state_bytes(shapes, targets, 128, "adamw8bit")
    total = sum(sum(v) for v in int8.values()) / sum(sum(v) for v in fp32.values())
    assert total <= 0.30
    worst = max(int8[n][0] / fp32[n][0] for n in shapes if n.endswith(targets))
    assert worst <= 0.27
    print(f"c4_60m rank 128: 8-bit / fp32 state bytes {total:.4f}; worst low-rank moment ratio {worst:.4f}")
