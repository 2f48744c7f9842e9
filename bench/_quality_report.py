"""Markdown tables and PNG plots of ``bench/quality.py`` results (the dict it also writes as JSON)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from _common import markdown_table
from _quality_stats import fmt_difference, fmt_interval, fmt_mean_std

# One colour per method in both plots (matplotlib's default cycle C0..C9, in the results table's order).
_COLOR_ORDER = (
    "adamw",
    "galore",
    "sara",
    "golore",
    "fira",
    "fira_importance",
    "galore_randomized",
    "sara_randomized",
    "poet_b32",
    "poet_b64",
)

METHOD_HEADER = (
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


def _gap_cell(row: dict[str, Any]) -> str:
    if row["gap_closed"] is None:
        return "-"
    return f"{row['gap_closed']:.0%}" + (" (ref.)" if row["gap_closed_note"] == "reference" else "")


def _vs(row: dict[str, Any], reference: str, key: str) -> str:
    return "0 (ref.)" if row["method"] == reference else fmt_difference(row[key], 4)


def method_table(rows: list[dict[str, Any]]) -> str:
    body = [
        (
            r["method"],
            r["selector"],
            f"{r['lr']:g}" + (" (grid edge)" if r["lr_at_edge"] else ""),
            str(len(r["seeds"])),
            fmt_mean_std(r["loss"], 4),
            fmt_interval(r["loss"]["ci95"], 4),
            fmt_mean_std(r["ppl"], 2),
            fmt_interval(r["ppl"]["ci95"], 2),
            _vs(r, "galore", "vs_galore"),
            _vs(r, "adamw", "vs_adamw"),
            _gap_cell(r),
            "-" if r["seconds_per_run"] is None else f"{r['seconds_per_run']:.0f}",
        )
        for r in rows
    ]
    return markdown_table(METHOD_HEADER, body)


def gap_notes(rows: list[dict[str, Any]]) -> str:
    notes = sorted({r["gap_closed_note"] for r in rows if r["gap_closed"] is None and r["gap_closed_note"]})
    return "\n".join(f'- gap closed "-": {note}' for note in notes)


def sweep_table(sweep: list[dict[str, Any]]) -> str:
    width = max(len(r["lrs"]) for r in sweep)
    header = ("method", *[f"lr {i + 1}: final loss" for i in range(width)], "best lr", "best at grid edge")
    body = []
    for r in sweep:
        cells = [
            f"{lr:g}: " + ("failed" if loss is None else f"{loss:.4f}") for lr, loss in zip(r["lrs"], r["final_losses"])
        ]
        cells += ["-"] * (width - len(cells))
        body.append((r["method"], *cells, f"{r['best_lr']:g}", "YES: widen the grid" if r["at_edge"] else "no"))
    return markdown_table(header, body)


def overlap_table(overlaps: list[dict[str, Any]]) -> str:
    if not overlaps:
        return "(no low-rank run recorded a refresh overlap)"
    steps = sorted({s for r in overlaps for s in r["steps"]})
    header = ("method", "selector", "runs", *[f"step {s}" for s in steps], "r/d", "mean - r/d", "MLP / attention")
    body = []
    for r in overlaps:
        at = dict(zip(r["steps"], r["overlap"]))
        mean = sum(r["overlap"]) / len(r["overlap"])
        mlp = [v for t, v in r["by_type"].items() if t in ("gate_proj", "up_proj", "down_proj")]
        attn = [v for t, v in r["by_type"].items() if t in ("q_proj", "k_proj", "v_proj", "o_proj")]
        split = f"{sum(mlp) / len(mlp):.3f} / {sum(attn) / len(attn):.3f}" if mlp and attn else "-"
        body.append(
            (
                r["method"],
                r["selector"],
                str(r["runs"]),
                *[f"{at[s]:.3f}" if s in at else "-" for s in steps],
                f"{r['chance']:.3f}",
                f"{mean - r['chance']:+.3f}",
                split,
            )
        )
    return markdown_table(header, body)


def render_markdown(result: dict[str, Any]) -> str:
    meta, s = result["meta"], result["settings"]
    head = (
        f"# Training quality: same token budget, embedded default recipe\n\n"
        f"Device {meta['device']} ({meta['device_name']}), torch {meta['torch']}, {meta['args']['jobs']} run(s) "
        f"at a time x {meta['args']['threads']} thread(s), {meta['cpu_count']} CPUs, {meta['date']}. Config "
        f"`default`, {s['steps']} steps, {s['seeds']} seed(s) per method at its best lr; overrides: "
        f"`{' '.join(s['common_overrides'])}`.\n"
    )
    failed = f"\n**Failed runs:** {', '.join(result['failed'])}\n" if result["failed"] else ""
    reused = result.get("reused") or {}
    if reused.get("methods"):
        failed += (
            f"\nRuns of {', '.join(reused['methods'])} are reused from `{reused['from']}` (same config, steps and "
            "seeds; this invocation ran the others).\n"
        )
    return "\n".join(
        [
            head + failed,
            "## Final validation loss and perplexity (best lr per method)\n",
            "Differences are paired over seeds (same seed: same init and data order), method minus reference; `*`: the "
            "95% Student-t interval excludes 0. Gap closed = (L_GaLore - L_method) / (L_GaLore - L_AdamW), only where "
            "L_GaLore - L_AdamW is clearly positive. The randomized variants ran one seed at GaLore's / SARA's "
            "best lr.\n",
            method_table(result["methods"]),
            "",
            gap_notes(result["methods"]),
            "",
            f"**{result['verdict']}**\n",
            "## Learning-rate sweep (seed 0)\n",
            sweep_table(result["sweep"]),
            "",
            "## Subspace overlap at each refresh\n",
            "||B_old^T B_new||_F^2 / r, mean over the projected matrices and over seeds (runs at the best lr); "
            "r/d is the chance level of two random subspaces; last column: mean over refreshes of the MLP and "
            "attention matrices.\n",
            overlap_table(result["overlaps"]),
            "",
            result["overlap_summary"],
            "",
        ]
    )


def _curve(records: list[dict[str, Any]], key: str, field: str) -> tuple[list[int], list[float]]:
    """Mean over runs of ``field`` of ``records[i][key]`` entries, by step (steps every run has)."""
    by_step: dict[int, list[float]] = {}
    for record in records:
        for entry in record[key]:
            by_step.setdefault(entry["step"], []).append(entry[field])
    steps = sorted(s for s, v in by_step.items() if len(v) == len(records))
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def _best_runs(result: dict[str, Any], method: str, lr: float) -> list[dict[str, Any]]:
    return [r for r in result["runs"] if r["method"] == method and r["lr"] == lr and not r.get("error")]


def write_plots(result: dict[str, Any], out: Path) -> None:
    """quality_loss.png (validation loss vs step, mean over seeds) and quality_overlap.png (overlap vs step, r/d)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in result["methods"]:
        steps, losses = _curve(_best_runs(result, row["method"], row["lr"]), "validations", "loss")
        style = "--" if row["method"].endswith("_randomized") else "-"
        label = f"{row['method']} (lr {row['lr']:g}, n={len(row['seeds'])})"
        ax.plot(steps, losses, style, marker=".", color=_color(row["method"]), label=label)
    ax.set(
        xlabel="optimizer step", ylabel="validation loss (mean over seeds)", title="Validation loss, same token budget"
    )
    _zoom_losses(ax, result)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_loss.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    chance = None
    for row in result["overlaps"]:
        style = "--" if row["method"].endswith("_randomized") else "-"
        ax.plot(
            row["steps"],
            row["overlap"],
            style,
            marker="o",
            color=_color(row["method"]),
            label=f"{row['method']} ({row['selector']})",
        )
        chance = row["chance"]
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label=f"chance r/d = {chance:.3f}")
    ax.set(
        xlabel="optimizer step (refresh)",
        ylabel="overlap ||B_old^T B_new||_F^2 / r",
        ylim=(0, 1.02),
        title="Subspace overlap at each refresh (mean over matrices and seeds)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_overlap.png", dpi=110)
    plt.close(fig)


def _color(method: str) -> str:
    return f"C{_COLOR_ORDER.index(method) % 10}" if method in _COLOR_ORDER else "black"


def _zoom_losses(ax: Any, result: dict[str, Any]) -> None:
    """The first validations sit far above the rest: clip the y axis so the final differences stay visible."""
    finals = [r["loss"]["mean"] for r in result["methods"] if r["loss"]["mean"] is not None]
    if finals and all(math.isfinite(v) for v in finals):
        low, high = min(finals), max(finals)
        ax.set_ylim(low - 0.1 * (high - low + 0.1), high + 6 * (high - low + 0.1))
