"""LowRankOptimizer on FSDP2-sharded parameters (``fully_shard``, row-sharded DTensors), 2 gloo ranks on the CPU.

One spawn of 2 ranks (one thread each) runs every configuration (dominant, importance, importance + Fira, dominant
with the ``rotate`` moment policy) on a tiny model: q_proj (16, 8) and up_proj (23, 8, unevenly sharded: 12 + 11
rows) low-rank at rank 4 (right side), a bias and a readout vector plain. Each rank takes half of every global batch
of 8; FSDP2 reduce-scatters the mean, which is bitwise what the 1-process reference computes by accumulating the two
half-batch gradients and halving them. ``update_gap=3``: refreshes at steps 0, 3 and 6 of 8 steps. Checked:

* the local shards really are split (8 rows each; 12 and 11), the stand-ins' moments are ``Shard(0)`` DTensors and
  the bases ``Replicate()`` DTensors, identical on both ranks;
* after 6 steps (two refreshes) and after 8 (three), full weights and bases equal the 1-process run's to fp32
  tolerance (measured: bitwise for all four, now that every basis is stored contiguous; before that the plain
  dominant basis was a column slice of the SVD output and differed by up to 2e-6);
* a DCP round trip after step 6 (``get_optimizer_state_dict`` + ``dcp.save`` / ``dcp.load`` +
  ``set_optimizer_state_dict`` into a fresh model and optimizer, whose loader first runs a zero-gradient step:
  placeholder bases, never a refresh) continues 2 steps exactly as the uninterrupted run (bitwise);
* so does a full (unsharded) round trip, Lightning's ``checkpoint_format=full`` path: ``get_model_state_dict`` /
  ``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True`` (whole tensors on rank 0 only),
  ``torch.save`` / ``torch.load(weights_only=True)`` on rank 0, then ``set_*_state_dict`` with
  ``broadcast_from_rank0=True`` into a fresh model and optimizer;
* ``side='left'`` on a DTensor parameter is refused with an error naming ``side``.

Results are written per rank to files under ``tmp_path`` and asserted in the parent.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from lowrank.optimizer import LowRankOptimizer

from .spawn import run_ranks

pytestmark = [pytest.mark.multiprocess]

WORLD, STEPS, SAVE_AT, GAP, RANK, BATCH = 2, 8, 6, 3, 4, 8
CONFIGS = {
    "dominant": ("dominant", False, "keep"),
    "importance": ("importance", False, "keep"),
    "fira": ("importance", True, "keep"),
    "rotate": ("dominant", False, "rotate"),
}
LOWRANK_NAMES = ("q_proj.weight", "up_proj.weight")


class Tiny(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.q_proj = nn.Linear(8, 16, bias=False)
        self.up_proj = nn.Linear(8, 23, bias=True)
        self.readout = nn.Parameter(torch.randn(39) / 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q_proj(x).tanh(), self.up_proj(x).tanh()], dim=1) @ self.readout


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, generator=g)


def _optimizer(
    model: nn.Module, selector: str, fira: bool, policy: str = "keep", side: str = "auto"
) -> LowRankOptimizer:
    named = dict(model.named_parameters())
    plain = [n for n in named if n not in LOWRANK_NAMES]
    groups = [
        {"params": [named[n] for n in LOWRANK_NAMES], "param_names": list(LOWRANK_NAMES), "rank": RANK, "side": side},
        {"params": [named[n] for n in plain], "param_names": plain},
    ]
    return LowRankOptimizer(
        groups,
        lr=0.01,
        weight_decay=0.01,
        selector=selector,
        schedule={"update_gap": GAP},
        alpha=0.25,
        fira=fira,
        moment_policy=policy,
        seed=3,
    )


def _half_loss(model: nn.Module, step: int, half: int) -> torch.Tensor:
    x, y = _batch(step)
    x, y = x.chunk(WORLD)[half], y.chunk(WORLD)[half]
    return (model(x) - y).square().mean()


def _snapshot(model: nn.Module, opt: LowRankOptimizer) -> dict[str, dict[str, torch.Tensor]]:
    def full(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    named = dict(model.named_parameters())
    weights = {n: full(p) for n, p in named.items()}
    bases = {n: full(opt.state[named[n]]["lowrank_basis"]) for n in LOWRANK_NAMES}
    return {"weights": weights, "bases": bases}


# ------------------------------------------------------------------------------------------------- the ranks
def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    out: dict = {}

    def sharded(seed: int) -> nn.Module:
        model = Tiny(seed)
        fully_shard(model, mesh=mesh)
        return model

    def train(model: nn.Module, opt: LowRankOptimizer, steps: range) -> None:
        for step in steps:
            _half_loss(model, step, rank).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    for key, (selector, fira, policy) in CONFIGS.items():
        model = sharded(0)
        opt = _optimizer(model, selector, fira, policy)
        named = dict(model.named_parameters())
        result: dict = {"local_rows": {n: named[n].to_local().shape[0] for n in LOWRANK_NAMES}}
        train(model, opt, range(SAVE_AT))
        result["at_save"] = _snapshot(model, opt)
        stand_in = opt._stand_ins[named["q_proj.weight"]]
        exp_avg = opt._base.state[stand_in]["exp_avg"]
        basis = opt.state[named["q_proj.weight"]]["lowrank_basis"]
        result["placements"] = {
            "exp_avg": [str(p) for p in exp_avg.placements] if isinstance(exp_avg, DTensor) else None,
            "exp_avg_local": tuple(exp_avg.to_local().shape) if isinstance(exp_avg, DTensor) else None,
            "basis": [str(p) for p in basis.placements] if isinstance(basis, DTensor) else None,
        }
        ckpt = os.path.join(out_dir, f"ckpt_{key}")
        dcp.save(
            {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt
        )
        gather = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets everything, rank 1 nothing
        full_path = os.path.join(out_dir, f"full_{key}_rank{rank}.pt")
        torch.save(
            {
                "model": get_model_state_dict(model, options=gather),
                "optim": get_optimizer_state_dict(model, opt, options=gather),
            },
            full_path,
        )
        train(model, opt, range(SAVE_AT, STEPS))
        result["final"] = _snapshot(model, opt)

        resumed = sharded(7)  # other initial weights: everything must come from the checkpoint
        opt2 = _optimizer(resumed, selector, fira, policy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the loader's zero-gradient step: placeholder bases
            state = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, opt2)}
            dcp.load(state, checkpoint_id=ckpt)
            set_model_state_dict(resumed, state["model"])
            set_optimizer_state_dict(resumed, opt2, state["optim"])
        result["resumed_step"] = opt2.param_groups[0]["lowrank_step"]
        train(resumed, opt2, range(SAVE_AT, STEPS))
        result["resumed"] = _snapshot(resumed, opt2)

        from_full = sharded(11)
        opt3 = _optimizer(from_full, selector, fira, policy)
        full = torch.load(full_path, weights_only=True)
        result["full_sizes"] = (len(full["model"]), len(full["optim"].get("state", {})))
        broadcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the loader's zero-gradient step: placeholder bases
            set_model_state_dict(from_full, full["model"], options=broadcast)
            set_optimizer_state_dict(from_full, opt3, full["optim"], options=broadcast)
        result["full_step"] = opt3.param_groups[0]["lowrank_step"]
        train(from_full, opt3, range(SAVE_AT, STEPS))
        result["from_full"] = _snapshot(from_full, opt3)
        out[key] = result

    try:
        _optimizer(sharded(0), "dominant", False, side="left")
        out["left_error"] = None
    except ValueError as error:
        out["left_error"] = str(error)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_ranks(_worker, tmp_path_factory.mktemp("fsdp2"), WORLD)


def _reference(selector: str, fira: bool, policy: str) -> dict[str, dict]:
    """1 process, plain tensors: gradient = (g_half0 + g_half1) / 2, what FSDP2's reduce-scatter of the mean gives."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = Tiny(0)
        opt = _optimizer(model, selector, fira, policy)
        out = {}
        for step in range(STEPS):
            for half in range(WORLD):
                _half_loss(model, step, half).backward()
            for p in model.parameters():
                p.grad.mul_(1 / WORLD)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step + 1 == SAVE_AT:
                out["at_save"] = _snapshot(model, opt)
        out["final"] = _snapshot(model, opt)
        return out
    finally:
        torch.set_num_threads(threads)


def _assert_close(actual: dict, expected: dict, **tol) -> None:
    for part in ("weights", "bases"):
        for name, value in expected[part].items():
            torch.testing.assert_close(actual[part][name], value, msg=lambda m: f"{part} {name}: {m}", **tol)


def test_shards_are_split_and_state_is_dtensor(ranks: list[dict]) -> None:
    for out, up_rows in zip(ranks, (12, 11)):
        for key in CONFIGS:
            assert out[key]["local_rows"] == {"q_proj.weight": 8, "up_proj.weight": up_rows}
            assert out[key]["placements"] == {"exp_avg": ["S(0)"], "exp_avg_local": (8, RANK), "basis": ["R"]}


@pytest.mark.parametrize("key", list(CONFIGS))
def test_matches_one_process(ranks: list[dict], key: str) -> None:
    reference = _reference(*CONFIGS[key])
    for out in ranks:
        _assert_close(out[key]["at_save"], reference["at_save"], rtol=1e-5, atol=1e-5)  # two refreshes
        _assert_close(out[key]["final"], reference["final"], rtol=1e-5, atol=1e-5)  # three
    # every rank holds the same (full) weights and bases
    _assert_close(ranks[1][key]["final"], ranks[0][key]["final"], rtol=0, atol=0)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_dcp_round_trip_resumes_exactly(ranks: list[dict], key: str) -> None:
    for out in ranks:
        assert out[key]["resumed_step"] == SAVE_AT  # restored, not the zero step's count
        _assert_close(out[key]["resumed"], out[key]["final"], rtol=0, atol=0)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_full_state_dict_round_trip_resumes_exactly(ranks: list[dict], key: str) -> None:
    assert ranks[0][key]["full_sizes"] == (4, 4) and ranks[1][key]["full_sizes"] == (0, 0)  # gathered on rank 0
    for out in ranks:
        assert out[key]["full_step"] == SAVE_AT
        _assert_close(out[key]["from_full"], out[key]["final"], rtol=0, atol=0)


def test_left_side_refused(ranks: list[dict]) -> None:
    for out in ranks:
        assert out["left_error"] is not None and "side: 'left' is not supported" in out["left_error"]
