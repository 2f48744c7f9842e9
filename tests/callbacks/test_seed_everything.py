"""In a foreign Lightning project, ``seed_everything(s)`` seeds the subspace draws of an optimizer built without an
explicit seed: runs under seeds 1 and 2 draw different bases, each the one the randomness rule gives for its seed."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import lightning
import pytest
import torch

from lowrank_recipes.callbacks import SubspaceResampler
from tests.callbacks.helpers import WARNING_FILTERS, MLPModule, RecordTap, Tap, make_trainer, regression_loader

pytestmark = [*WARNING_FILTERS, pytest.mark.filterwarnings("ignore:.*seed_everything.*")]


def _oracle_random_basis(seed: int, step: int, name: str, d: int, r: int) -> torch.Tensor:
    """The randomness rule written out (docs/reference.md): blake2b-8 of "seed/step/crc32(name)" seeds a CPU
    generator; the basis is the QR of a (d, r) float32 Gaussian with the signs of R's diagonal folded in."""
    digest = hashlib.blake2b(f"{seed}/{step}/{zlib.crc32(name.encode())}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    q, upper = torch.linalg.qr(torch.randn(d, r, generator=generator, dtype=torch.float32))
    return q * torch.sign(torch.diagonal(upper))


def _first_bases(root: Path, seed: int, selector: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    lightning.seed_everything(seed)
    module = MLPModule(  # no lowrank.seed in the config
        {"name": "lowrank", "lr": 1e-2, "lowrank": {"rank": 4, "targets": ["fc1", "fc2"], "selector": selector}}
    )
    tap = RecordTap()
    trainer = make_trainer(root, 1, [SubspaceResampler(), Tap(tap)])
    trainer.fit(module, regression_loader())
    return {name: basis for step, name, _, basis, _ in tap.rows if step == 0}, trainer.optimizers[0].param_groups


def test_seed_everything_seeds_the_draws(tmp_path: Path) -> None:
    bases = {}
    for seed in (1, 2):
        bases[seed], groups = _first_bases(tmp_path / str(seed), seed, "random")
        assert {group["seed"] for group in groups} == {seed}
        # fc1 (32, 12): right projection, d = 12; fc2 (12, 32): left, d = 12
        for name in ("fc1.weight", "fc2.weight"):
            expected = _oracle_random_basis(seed, 0, name, 12, 4)
            torch.testing.assert_close(bases[seed][name], expected, rtol=0, atol=1e-6)
    assert not torch.equal(bases[1]["fc1.weight"], bases[2]["fc1.weight"])


def test_importance_bases_differ_between_seeds(tmp_path: Path) -> None:
    first, _ = _first_bases(tmp_path / "1", 1, "importance")
    second, _ = _first_bases(tmp_path / "2", 2, "importance")
    assert any(not torch.equal(first[name], second[name]) for name in first)
