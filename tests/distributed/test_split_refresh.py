"""``LowRankOptimizer.resample(split_across_ranks=True)`` on 2 gloo ranks (DDP-like: plain tensors, identical
gradients on every rank), against the unsplit refresh computed by each rank on its own.

A model of five bias-free linear layers, every weight low-rank at rank 3 (left and right sides, the dominant and the
importance selector, the ``rotate`` moment policy so that the policy runs on received bases), one weight with an
all-zero gradient ("no refresh"), two refreshes. Every selection is counted per rank. Checked:

* each rank ran the selector for its round-robin share only (ranks 0 and 1: weights 0, 2, 4 and 1, 3 of each refresh);
* bases and moments (projected on the bases, rewritten by ``rotate``) equal the unsplit refresh's bitwise, and the
  bases are identical on both ranks;
* the zero-gradient weight keeps its placeholder (first axes) on both ranks and has no record;
* the records name the same parameters, steps and selector as the unsplit refresh's.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from lowrank.optimizer import LowRankOptimizer
from lowrank.selectors import SubspaceSelector

from .spawn import run_ranks

pytestmark = [pytest.mark.multiprocess]

WORLD, RANK = 2, 3
SHAPES = [(12, 8), (8, 12), (10, 10), (9, 7), (7, 9)]  # (out, in): left and right sides
NAMES = [f"layers.{i}.weight" for i in range(len(SHAPES))]
ZERO = NAMES[3]  # its gradient is all zero


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(i, o, bias=False) for o, i in SHAPES))


def _optimizer(model: nn.Module, selector: str) -> LowRankOptimizer:
    groups = [{"params": list(model.parameters()), "param_names": NAMES, "rank": RANK}]
    # update_gap 10: resample(step=0) and resample(step=10) are the scheduled refreshes (every parameter due), and the
    # step() after each does not refresh again, as under the SubspaceResampler
    return LowRankOptimizer(
        groups, lr=0.01, selector=selector, schedule={"update_gap": 10}, moment_policy="rotate", seed=5
    )


def _set_grads(model: nn.Module, step: int) -> None:
    """The same gradients on every rank (what DDP's all-reduce leaves), seeded by the step."""
    g = torch.Generator().manual_seed(100 + step)
    for name, param in zip(NAMES, model.parameters()):
        param.grad = torch.zeros_like(param) if name == ZERO else torch.randn(param.shape, generator=g)


def _run(selector: str, split: bool, calls: list[str]) -> dict:
    """Two refreshes (and steps); every selection's gradient shape is appended to ``calls``."""
    original = SubspaceSelector.select

    def counted(self: SubspaceSelector, grad: torch.Tensor, rank: int, generator: torch.Generator):
        calls.append(f"{tuple(grad.shape)}")
        return original(self, grad, rank, generator)

    SubspaceSelector.select = counted
    try:
        return _refreshes(selector, split, calls)
    finally:
        SubspaceSelector.select = original


def _refreshes(selector: str, split: bool, calls: list[str]) -> dict:
    model = _model()
    opt = _optimizer(model, selector)
    out: dict = {"records": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the zero gradient's placeholder warning
        for step in range(2):
            _set_grads(model, step)
            calls.append(f"--- refresh {step}")
            records = opt.resample(step=step * 10, split_across_ranks=split)
            out["records"].append([(r.name, r.step, r.selector) for r in records])
            opt.step()
    params = dict(zip(NAMES, model.parameters()))
    out["bases"] = {n: opt.state[p]["lowrank_basis"].clone() for n, p in params.items()}
    moments = {n: opt._base.state[opt._stand_ins[p]] for n, p in params.items()}  # keyed by the stand-ins
    out["moments"] = {n: {k: v.clone() for k, v in state.items()} for n, state in moments.items()}
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    out = {}
    for selector in ("dominant", "importance"):
        unsplit_calls: list[str] = []
        split_calls: list[str] = []
        out[selector] = {
            "unsplit": _run(selector, False, unsplit_calls),
            "split": _run(selector, True, split_calls),
            "unsplit_calls": unsplit_calls,
            "split_calls": split_calls,
        }
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_ranks(_worker, tmp_path_factory.mktemp("split"), WORLD)


def _oriented(index: int) -> str:
    out, inp = SHAPES[index]
    return str((out, inp) if out < inp else (inp, out))  # the basis spans the smaller side (GaLore's "std" rule)


@pytest.mark.parametrize("selector", ["dominant", "importance"])
def test_each_rank_selects_its_share_only(ranks: list[dict], selector: str) -> None:
    every = [_oriented(i) for i in range(len(SHAPES))]
    for rank, out in enumerate(ranks):
        per_refresh = ["--- refresh 0", *every, "--- refresh 1", *every]
        assert out[selector]["unsplit_calls"] == per_refresh
        share = [_oriented(i) for i in range(len(SHAPES)) if i % WORLD == rank]
        assert out[selector]["split_calls"] == ["--- refresh 0", *share, "--- refresh 1", *share]


@pytest.mark.parametrize("selector", ["dominant", "importance"])
def test_split_refresh_equals_the_unsplit_one(ranks: list[dict], selector: str) -> None:
    for out in ranks:
        split, unsplit = out[selector]["split"], out[selector]["unsplit"]
        assert split["records"] == unsplit["records"]
        assert all(ZERO not in [name for name, _, _ in records] for records in split["records"])
        for name in NAMES:
            assert torch.equal(split["bases"][name], unsplit["bases"][name]), name
            for key, value in unsplit["moments"][name].items():
                assert torch.equal(split["moments"][name][key], value), (name, key)
        placeholder = split["bases"][ZERO]
        assert torch.equal(placeholder, torch.eye(*placeholder.shape))  # first axes, kept: never refreshed
    for name in NAMES:
        assert torch.equal(ranks[0][selector]["split"]["bases"][name], ranks[1][selector]["split"]["bases"][name])
