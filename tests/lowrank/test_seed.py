"""The run seed of the draws: explicit, else Lightning's global seed (PL_GLOBAL_SEED), else 0; never the process's
torch seed. Stored in the optimizer's groups (state_dict), shown in the group table, kept on resume."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import zlib

import pytest
import torch
from torch import nn

from lowrank import LowRankOptimizer, build_optimizer

NAME = "layers.0.q_proj.weight"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].q_proj = nn.Linear(8, 6, bias=False)  # (6, 8): left projection, d = 6
        self.norm = nn.LayerNorm(8)


def _config(**lowrank) -> dict:
    return {"name": "lowrank", "lowrank": {"rank": 3, "targets": ["q_proj"], "selector": "random", **lowrank}}


def _oracle_random_basis(seed: int, step: int, name: str, d: int, r: int) -> torch.Tensor:
    """The documented rule, written out: blake2b-8 of "seed/step/crc32(name)" seeds a CPU generator; the basis is the
    QR of a (d, r) float32 Gaussian with the signs of R's diagonal folded in."""
    digest = hashlib.blake2b(f"{seed}/{step}/{zlib.crc32(name.encode())}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    q, upper = torch.linalg.qr(torch.randn(d, r, generator=generator, dtype=torch.float32))
    return q * torch.sign(torch.diagonal(upper))


def _first_basis(config: dict) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    net = Net()
    opt = build_optimizer(net, config)
    weight = net.layers[0].q_proj.weight
    weight.grad = torch.randn(6, 8, generator=torch.Generator().manual_seed(5))
    opt.step()
    return opt.state[weight]["lowrank_basis"], opt


@pytest.mark.parametrize("env_seed", [1, 2])
def test_lightning_global_seed_seeds_the_draws(monkeypatch: pytest.MonkeyPatch, env_seed: int) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", str(env_seed))  # what lightning.seed_everything(env_seed) sets
    basis, opt = _first_basis(_config())
    torch.testing.assert_close(basis, _oracle_random_basis(env_seed, 0, NAME, 6, 3), rtol=0, atol=1e-6)
    assert opt.param_groups[0]["seed"] == env_seed
    saved = opt.state_dict()["param_groups"]
    assert [group["seed"] for group in saved] == [env_seed] * len(saved)
    assert type(saved[0]["seed"]) is int  # plain data: torch.load(weights_only=True) reads it
    assert f"draw seed {env_seed} (PL_GLOBAL_SEED)" in str(opt.group_table)


def test_seeds_1_and_2_draw_different_importance_bases(monkeypatch: pytest.MonkeyPatch) -> None:
    bases = []
    for env_seed in ("1", "2"):
        monkeypatch.setenv("PL_GLOBAL_SEED", env_seed)
        bases.append(_first_basis(_config(selector="importance"))[0])
    assert not torch.equal(bases[0], bases[1])


def test_explicit_seed_wins_and_unset_means_zero_whatever_torch_was_seeded_with(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    basis, opt = _first_basis(_config(seed=7))
    torch.testing.assert_close(basis, _oracle_random_basis(7, 0, NAME, 6, 3), rtol=0, atol=1e-6)
    assert "draw seed 7 (explicit)" in str(opt.group_table)
    monkeypatch.delenv("PL_GLOBAL_SEED")
    for torch_seed in (3, 4):  # never torch.initial_seed(): it differs per process and per rank
        torch.manual_seed(torch_seed)
        basis, opt = _first_basis(_config())
        torch.testing.assert_close(basis, _oracle_random_basis(0, 0, NAME, 6, 3), rtol=0, atol=1e-6)
        assert opt.param_groups[0]["seed"] == 0 and "draw seed 0 (default)" in str(opt.group_table)


def test_the_optimizer_resolves_a_missing_seed_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "11")
    weight = nn.Parameter(torch.zeros(6, 8))
    opt = LowRankOptimizer([{"params": [weight], "rank": 2}, {"params": [nn.Parameter(torch.zeros(6, 8))], "rank": 2}])
    assert [g["seed"] for g in opt.param_groups] == [11, 11]
    other = LowRankOptimizer([{"params": [nn.Parameter(torch.zeros(6, 8))], "rank": 2, "seed": None}], seed=4)
    assert other.param_groups[0]["seed"] == 11  # a group's own None resolves like the default


def test_a_resumed_optimizer_keeps_the_checkpoints_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    _, opt = _first_basis(_config())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    monkeypatch.setenv("PL_GLOBAL_SEED", "2")  # the resumed process was seeded differently
    fresh = build_optimizer(Net(), _config())
    assert fresh.param_groups[0]["seed"] == 2
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert [g["seed"] for g in fresh.param_groups] == [1, 1]


def test_an_invalid_global_seed_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "abc")
    with pytest.raises(ValueError, match="PL_GLOBAL_SEED: invalid value 'abc'; accepted: an integer"):
        build_optimizer(Net(), _config())
    from lowrank.randomness import resolve_seed

    assert resolve_seed(5) == (5, "explicit")


def test_lowrank_does_not_import_lightning() -> None:
    code = "import sys, lowrank; lowrank.build_optimizer; print(any(m.startswith('lightning') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"
