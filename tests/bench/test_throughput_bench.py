"""bench/throughput.py --quick runs the recipe in child processes and writes every column (timings are not checked:
the table is informational on a CPU)."""

from __future__ import annotations

import json

from tests.bench.quick import run_quick

VARIANTS = (
    "adamw",
    "randomized-importance-stagger4-per-layer",
    "randomized-importance-stagger4-projected",
    "poet-b-d4",
)


def test_throughput_quick_writes_every_variant_with_its_ratio_to_adamw(tmp_path):
    out = tmp_path / "throughput.json"
    done = run_quick("throughput.py", "--variants", *VARIANTS, "--out", str(out), cwd=tmp_path, timeout=600)
    result = json.loads(out.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert result["complete"] is True and set(rows) == set(VARIANTS)
    assert all("error" not in row for row in rows.values())
    assert rows["adamw"]["ratio_to_adamw"] == 1.0
    for row in rows.values():
        low, high = row["tokens_per_s_quartiles"]
        assert row["tokens_per_s"] > 0 and low <= row["tokens_per_s"] <= high and row["ratio_to_adamw"] > 0
        assert row["median_step_s"] > 0 and row["peak_mib"] >= 0 and row["repeats"] == 1
    runs = result["runs"]
    assert all(len(run["step_s"]) == 4 and run["tokens_per_step"] == 64 for run in runs)  # --quick: 4 steps of 2x32
    assert "GaLore's published LLaMA 1B" in done.stdout and out.with_suffix(".md").exists()
