"""bench/quality.py --quick runs end to end and writes every method row, every column and both plots (numbers are
not checked: a tiny model for 16 steps ranks nothing); its statistics helpers are checked on exact values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench._quality_stats import gap_closed, paired_difference, summarize, t975
from tests.bench.quick import run_quick

METHODS = (
    "adamw",
    "galore",
    "sara",
    "golore",
    "fira",
    "fira_importance",
    "poet_b32",
    "poet_b64",
    "galore_randomized",
    "sara_randomized",
)
LOWRANK = set(METHODS) - {"adamw", "poet_b32", "poet_b64"}
COLUMNS = (
    "method",
    "selector",
    "lr",
    "seeds",
    "final val loss (mean +- std)",
    "loss 95% CI",
    "val ppl (mean +- std)",
    "ppl 95% CI",
    "vs GaLore (loss, 95% CI)",
    "vs AdamW (loss, 95% CI)",
    "gap closed",
    "s/run",
)
ROW_KEYS = {
    "method",
    "selector",
    "lr",
    "seeds",
    "loss",
    "ppl",
    "vs_galore",
    "vs_adamw",
    "gap_closed",
    "gap_closed_note",
    "lr_at_edge",
    "seconds_per_run",
}
META = {"device", "device_name", "torch", "cpu_count", "threads", "date", "args"}


def _table_rows(markdown: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """Header cells and body rows of the markdown table whose first header cell is ``first_header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} "))
    block = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        block.append([cell.strip() for cell in line.strip("|").split("|")])
    return block[0], block[2:]


@pytest.mark.slow
def test_quick_run_writes_every_row_column_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = run_quick(
        "quality.py", "--out-dir", str(out), "--work-dir", str(tmp_path / "runs"), cwd=tmp_path, timeout=600
    )
    assert "ETA" in done.stdout
    result = json.loads((out / "quality.json").read_text())
    assert META <= set(result["meta"]) and result["meta"]["device"] == "cpu"
    assert result["meta"]["args"]["quick"] is True and result["failed"] == []
    rows = {row["method"]: row for row in result["methods"]}
    assert tuple(rows) == METHODS
    for method, row in rows.items():
        assert ROW_KEYS <= set(row), method
        assert row["loss"]["mean"] is not None and row["ppl"]["mean"] is not None
    assert {row["method"] for row in result["sweep"]} == set(METHODS) - {"galore_randomized", "sara_randomized"}
    assert {row["method"] for row in result["overlaps"]} == LOWRANK
    assert all(row["overlap"] and 0 < row["chance"] < 1 for row in result["overlaps"])
    assert result["verdict"].startswith("Importance sampling (SARA)") or "cannot be said" in result["verdict"]
    # every run of the work directory stayed out of runs/default
    assert (tmp_path / "runs").is_dir() and not (tmp_path / "runs" / "default").exists()

    markdown = (out / "quality.md").read_text()
    header, body = _table_rows(markdown, "method")
    assert tuple(header) == COLUMNS
    assert [cells[0] for cells in body] == list(METHODS)
    assert all(len(cells) == len(COLUMNS) for cells in body)
    sweep_header, sweep_body = _sweep(markdown)
    assert "best at grid edge" in sweep_header and len(sweep_body) == 8
    assert "r/d" in markdown and result["verdict"] in markdown and result["overlap_summary"] in markdown
    for name in ("quality_loss.png", "quality_overlap.png"):
        png = out / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --methods with --reuse: only poet_b32 runs again; the other rows come from the first result, and say so
    again = tmp_path / "again"
    run_quick(
        "quality.py",
        "--methods",
        "poet_b32",
        "--reuse",
        str(out / "quality.json"),
        "--out-dir",
        str(again),
        "--work-dir",
        str(tmp_path / "runs2"),
        cwd=tmp_path,
        timeout=300,
    )
    second = json.loads((again / "quality.json").read_text())
    assert second["reused"]["methods"] == sorted(set(METHODS) - {"poet_b32"})
    fresh = [r for r in second["runs"] if not r.get("reused")]
    assert {r["method"] for r in fresh} == {"poet_b32"} and len(fresh) == 2  # one sweep value and seed 1
    assert {r["method"]: r for r in second["methods"]}["adamw"] == rows["adamw"]
    assert "are reused from" in (again / "quality.md").read_text()


def _sweep(markdown: str) -> tuple[list[str], list[list[str]]]:
    section = markdown.split("## Learning-rate sweep", 1)[1]
    return _table_rows(section, "method")


# ---------------------------------------------------------------------------------------------- statistics (fast)


def test_t_quantiles_and_interval() -> None:
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(100) == 1.96
    stats = summarize([1.0, 2.0, 3.0])
    assert stats["mean"] == 2.0 and stats["std"] == 1.0
    assert stats["ci95"] == pytest.approx([2.0 - 4.303 / 3**0.5, 2.0 + 4.303 / 3**0.5])
    assert summarize([5.0])["ci95"] is None and summarize([])["mean"] is None


def test_paired_difference_uses_common_seeds_only() -> None:
    diff = paired_difference({0: 4.0, 1: 4.2, 2: 4.1}, {0: 4.5, 1: 4.6, 3: 9.9})
    assert diff["seeds"] == [0, 1] and diff["mean"] == pytest.approx(-0.45) and diff["n"] == 2


def test_gap_closed_only_for_a_clearly_positive_gap() -> None:
    galore = {0: 5.0, 1: 5.1, 2: 5.2}
    clear = paired_difference({0: 4.0, 1: 4.1, 2: 4.2}, galore)  # AdamW 1.0 better at every seed
    half = paired_difference({0: 4.5, 1: 4.6, 2: 4.7}, galore)
    fraction, why = gap_closed(half, clear)
    assert fraction == pytest.approx(0.5) and why == ""
    noisy = paired_difference({0: 4.0, 1: 5.6, 2: 5.0}, galore)  # the interval of the gap reaches below 0
    fraction, why = gap_closed(half, noisy)
    assert fraction is None and "not clearly better" in why
    worse = paired_difference({0: 6.0, 1: 6.1, 2: 6.2}, galore)  # AdamW 1.0 worse at every seed
    fraction, why = gap_closed(half, worse)
    assert fraction is None and "clearly worse" in why
