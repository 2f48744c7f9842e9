"""bench/optimizer_step.py --quick runs end to end and writes every row and column (timings are not checked).

The galore-torch row is there when ``galore_torch`` imports in the child (the ``bench`` extra, or a side directory on
PYTHONPATH); otherwise the run must say that it skipped it, in the printed output and in the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lowrank
from tests.bench.quick import run_quick

SELECTORS = tuple(lowrank.SELECTORS)  # every registered selector gets a step row, refresh rows and a layer total
STEP_VARIANTS = {"adamw", "floor", "galore-torch", *(f"lowrank-{name}" for name in SELECTORS)}
STEP_COLUMNS = {
    "model",
    "variant",
    "rank",
    "step_median_s",
    "step_quartiles_s",
    "floor_ratio",
    "galore_ratio",
    "adamw_ratio",
    "state_bytes",
    "state_ratio",
}
REFRESH_COLUMNS = {
    "model",
    "shape",
    "side",
    "per_layer",
    "rank",
    "selector",
    "timed_rank",
    "median_s",
    "quartiles_s",
    "speedup",
}
LAYER_COLUMNS = {"model", "rank", "selector", "layer_s", "speedup"}
META = {"device", "device_name", "torch", "cpu_count", "threads", "date", "args"}
TINY_SHAPES = {("64x64", "right"), ("172x64", "right"), ("64x172", "left")}  # hidden 64, intermediate 172
TINY_RANKS = {16, 32}


@pytest.mark.slow
def test_quick_run_writes_every_row_and_column(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "optimizer_step.json"
    done = run_quick("optimizer_step.py", "--out", str(out), cwd=tmp_path)
    result = json.loads(out.read_text())
    markdown = out.with_suffix(".md").read_text()
    assert META <= set(result["meta"]) and result["meta"]["device"] == "cpu"
    assert result["meta"]["args"]["quick"] is True

    galore = result["galore_torch"]
    variants = STEP_VARIANTS if galore["available"] else STEP_VARIANTS - {"galore-torch"}
    if galore["available"]:
        assert galore["version"] and galore["note"] is None
    else:
        assert "galore-torch" in galore["note"] and galore["version"] is None
        assert any("galore-torch row skipped" in note for note in result["notes"])
        assert "galore-torch row skipped" in done.stdout and "galore-torch row skipped" in markdown

    assert set(result["step_columns"]) == STEP_COLUMNS
    rows = {row["variant"]: row for row in result["steps"]}
    assert set(rows) == variants and len(result["steps"]) == len(variants)
    nullable = {"rank"} | (set() if galore["available"] else {"galore_ratio"})
    for variant, row in rows.items():
        assert STEP_COLUMNS <= set(row), variant
        missing = sorted(c for c in STEP_COLUMNS - nullable if row[c] is None)
        assert not missing, f"{variant}: no value for {missing}"
        assert row["model"] == "tiny" and (row["rank"] is None) == (variant == "adamw")
        assert row["state_bytes"] > 0
        assert f"| {variant} " in markdown
    assert rows["floor"]["floor_ratio"] == 1.0 and rows["adamw"]["adamw_ratio"] == 1.0
    if not galore["available"]:
        assert all(row["galore_ratio"] is None for row in rows.values())

    assert set(result["refresh_columns"]) == REFRESH_COLUMNS
    seen = {(row["shape"], row["side"], row["rank"], row["selector"]) for row in result["refresh"]}
    expected = {(shape, side, rank, name) for shape, side in TINY_SHAPES for rank in TINY_RANKS for name in SELECTORS}
    assert seen == expected and len(result["refresh"]) == len(expected)
    assert all(REFRESH_COLUMNS <= set(row) and row["median_s"] > 0 for row in result["refresh"])
    assert set(result["layer_columns"]) == LAYER_COLUMNS
    assert {(row["rank"], row["selector"]) for row in result["layers"]} == {
        (r, s) for r in TINY_RANKS for s in SELECTORS
    }
    for shape, side in TINY_SHAPES:
        assert f"| {shape} " in markdown and f"| {side} " in markdown
    for name in SELECTORS:
        assert f"{name} ms" in markdown

    targets = {t["target"] for t in result["targets"]}
    expected_targets = {"low-rank step vs floor (tiny, worst selector)"}
    if galore["available"]:
        expected_targets.add("low-rank step vs galore-torch (tiny, worst selector)")
    expected_targets |= {
        f"{name} refresh speedup (tiny layer, rank {rank})"
        for name in ("randomized_dominant", "randomized_importance")
        for rank in TINY_RANKS
    }
    assert targets == expected_targets
    assert all({"measured", "op", "limit", "ok", "note"} <= set(t) for t in result["targets"])
    for header in ("| model | variant", "| target"):
        assert header in done.stdout and header in markdown
