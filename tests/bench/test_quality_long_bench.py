"""bench/quality_long.py: the plan (pilot, sweep, one extension at a grid edge, long runs, no run made twice), the
detectable-difference arithmetic, and ``--quick`` end to end, continued from its records by a second invocation."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest

from bench._quality_stats import detectable_difference, t975
from tests.bench.quick import ROOT, run_quick

sys.path.insert(0, str(ROOT / "bench"))  # quality_long imports its siblings as top-level modules
import quality_long as ql  # noqa: E402
from _quality_long_report import checkpoints  # noqa: E402


def _args() -> argparse.Namespace:
    return argparse.Namespace(quick=False, alpha=0.25, accelerator="cpu", steps=3000, sweep_steps=500, seeds=3)


class _Fake:
    """Collects the plan's submissions; ``finish`` answers one with a chosen final loss."""

    def __init__(self) -> None:
        self.submitted: dict[str, ql.RunSpec] = {}
        self.plan = ql.Plan(_args(), self.submit)

    def submit(self, key: str, spec: ql.RunSpec) -> None:
        assert key not in self.submitted, f"{key} submitted twice"
        self.submitted[key] = spec

    def finish(self, key: str, loss: float) -> None:
        spec = self.submitted[key]
        self.plan.finished(key, {"method": spec.method, "lr": spec.lr, "seed": spec.seed, "final_loss": loss})


def test_pilot_and_sweep_start_then_each_method_gets_its_long_runs_at_its_best_lr() -> None:
    fake = _Fake()
    fake.plan.start()
    assert list(fake.submitted)[0] == "galore-lr0.01-s0-n3000"  # the pilot first
    sweep = [k for k in fake.submitted if k.endswith("-n500")]
    assert len(sweep) == 15 and len(fake.submitted) == 16
    assert "adamw-lr0.002-s0-n500" in sweep and "adamw_split-lr0.02-s0-n500" in sweep
    split = fake.submitted["adamw_split-lr0.01-s0-n500"].overrides
    assert "optimizer.target_lr_scale=0.25" in split and "optimizer.name=adamw" in split
    assert "data.source=stdlib_code" in split and "trainer.max_steps=500" in split

    # galore: best in the middle -> long runs at 0.01, seed 0 is the pilot (not submitted again)
    for lr, loss in ((0.005, 4.2), (0.01, 4.0), (0.02, 4.1)):
        fake.finish(f"galore-lr{lr:g}-s0-n500", loss)
    assert fake.plan.best["galore"] == 0.01
    assert {"galore-lr0.01-s1-n3000", "galore-lr0.01-s2-n3000"} <= set(fake.submitted)

    # sara: best at the upper edge -> one extension (0.04); it wins again -> long runs there, still at an edge
    for lr, loss in ((0.005, 4.3), (0.01, 4.2), (0.02, 4.0)):
        fake.finish(f"sara-lr{lr:g}-s0-n500", loss)
    assert "sara" not in fake.plan.best and "sara-lr0.04-s0-n500" in fake.submitted
    fake.finish("sara-lr0.04-s0-n500", 3.9)
    assert fake.plan.best["sara"] == 0.04 and "sara-lr0.08-s0-n500" not in fake.submitted
    assert {f"sara-lr0.04-s{s}-n3000" for s in range(3)} <= set(fake.submitted)

    # adamw: best at the lower edge -> extension below; the extension loses -> the old edge value, one seed
    for lr, loss in ((0.001, 4.0), (0.002, 4.1), (0.004, 4.4)):
        fake.finish(f"adamw-lr{lr:g}-s0-n500", loss)
    fake.finish("adamw-lr0.0005-s0-n500", 4.3)
    assert fake.plan.best["adamw"] == 0.001 and "adamw-lr0.001-s0-n3000" in fake.submitted
    assert "adamw-lr0.001-s1-n3000" not in fake.submitted

    # a failed run never wins
    fake.finish("golore-lr0.005-s0-n500", 4.1)
    fake.plan.finished(
        "golore-lr0.01-s0-n500", {"method": "golore", "lr": 0.01, "seed": 0, "final_loss": None, "error": "boom"}
    )
    fake.finish("golore-lr0.02-s0-n500", 4.2)
    assert "golore" not in fake.plan.best and "golore-lr0.0025-s0-n500" in fake.submitted  # 0.005 is an edge

    assert not fake.plan.done()


def test_extension_and_checkpoints() -> None:
    assert ql.extension([0.005, 0.01, 0.02], 0.01) is None
    assert ql.extension([0.005, 0.01, 0.02], 0.02) == 0.04 and ql.extension([0.005, 0.01, 0.02], 0.005) == 0.0025
    assert checkpoints(3000, 250) == [1000, 2000, 3000] and checkpoints(24, 4) == [8, 16, 24]


def test_detectable_difference_matches_the_t_formula() -> None:
    diffs = [-0.02, 0.01, -0.05]
    mean = sum(diffs) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    got = detectable_difference(std, 3)
    assert got["excludes_zero"] == pytest.approx(4.303 * std / math.sqrt(3))
    assert got["power80"] == pytest.approx((4.303 + 1.061) * std / math.sqrt(3))
    assert t975(2) == 4.303
    with pytest.raises(ValueError, match="n: invalid value 1"):
        detectable_difference(std, 1)


@pytest.mark.slow
def test_quick_run_reports_every_section_and_continues_from_its_records(tmp_path: Path) -> None:
    out, work = tmp_path / "results", tmp_path / "work"
    done = run_quick("quality_long.py", "--out-dir", str(out), "--work-dir", str(work), cwd=tmp_path, timeout=600)
    records = sorted(p.name for p in (work / "records").glob("*.json"))
    assert "galore-lr0.01-s0-n24.json" in records  # the pilot
    result = json.loads((out / "quality_long.json").read_text())
    assert result["failed"] == [] and result["meta"]["args"]["quick"] is True
    assert [r["method"] for r in result["sweep"]] == list(ql.METHODS)
    assert all(len(r["lrs"]) in (3, 4) and r["best_lr"] in r["lrs"] for r in result["sweep"])
    rows = {r["method"]: r for r in result["long"]}
    assert set(rows) == set(ql.METHODS)
    assert len(rows["galore"]["seeds"]) == len(rows["sara"]["seeds"]) == 2 and len(rows["adamw"]["seeds"]) == 1
    assert all(r["epochs"] is not None and r["epochs"] > 0 for r in rows.values())
    assert [p["step"] for p in result["paired"]] == [8, 16, 24] and result["paired"][-1]["difference"]["n"] == 2
    assert set(result["overlaps"]) == {"galore", "sara", "golore"}
    assert result["pilot"]["steps"] and result["frozen_summary"].startswith("The dominant subspace")
    markdown = (out / "quality_long.md").read_text()
    for needle in ("SARA - GaLore", "chance r/d", "Learning-rate sweep", "epochs read", result["verdict"]):
        assert needle in markdown, needle
    for name in ("quality_long_loss.png", "quality_long_overlap.png", "quality_long_difference.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    # a second invocation with the same work directory trains nothing: every run comes from its record
    again = run_quick("quality_long.py", "--out-dir", str(out), "--work-dir", str(work), cwd=tmp_path, timeout=300)
    assert "so far]" in done.stdout and "so far]" not in again.stdout
    assert json.loads((out / "quality_long.json").read_text())["long"] == result["long"]
