"""Analysis, tables and plots of ``bench/quality_long.py`` (long-horizon quality) from its run records.

``build_result(records, settings, meta)`` turns the records into one dict (also written as JSON):

* ``sweep``: per method the lrs tried at the sweep length, their final validation losses, the best, whether the grid
  was extended and whether the best still sits at an edge;
* ``long``: per method at its best lr, the long runs: final validation loss / perplexity (mean, std, 95% Student-t
  interval over seeds), epochs of the corpus read, seconds per run;
* ``pilot``: GaLore's dominant overlap curve, its maximum and the first refresh where it reaches ``FROZEN`` (0.8);
* ``overlaps``: per low-rank method the mean overlap at every refresh to the end, with its chance level r/d;
* ``paired``: SARA - GaLore in validation loss at 1/3, 2/3 and all of the long horizon, paired over seeds, with the
  detectable difference at the measured spread (``_quality_stats.detectable_difference``);
* ``verdict`` and ``frozen_summary``: what came out, in one sentence each.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from _common import markdown_table
from _quality_stats import (
    detectable_difference,
    excludes_zero,
    fmt_difference,
    fmt_interval,
    fmt_mean_std,
    paired_difference,
    summarize,
)

FROZEN = 0.8  # dominant overlap at which consecutive subspaces count as nearly identical ("frozen")
SELECTORS = {"galore": "dominant", "sara": "importance", "golore": "random", "adamw_split": None, "adamw": None}
_COLORS = {"galore": "C1", "sara": "C2", "golore": "C3", "adamw_split": "C4", "adamw": "C0"}


def _steps_of(record: dict[str, Any]) -> int:
    return int(next(o.split("=", 1)[1] for o in record["overrides"] if o.startswith("trainer.max_steps=")))


def _ok(record: dict[str, Any]) -> bool:
    return not record.get("error") and record.get("final_loss") is not None and math.isfinite(record["final_loss"])


def _loss_at(record: dict[str, Any], step: int) -> float | None:
    return next((v["loss"] for v in record["validations"] if v["step"] == step), None)


def sweep_rows(records: list[dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for method, grid in settings["grids"].items():
        runs = sorted(
            (
                r
                for r in records
                if r["method"] == method and _steps_of(r) == settings["sweep_steps"] and r["seed"] == 0
            ),
            key=lambda r: r["lr"],
        )
        scored = [r for r in runs if _ok(r)]
        best = min(scored, key=lambda r: r["final_loss"])["lr"] if scored else None
        lrs = [r["lr"] for r in runs]
        rows.append(
            {
                "method": method,
                "lrs": lrs,
                "final_losses": [r["final_loss"] for r in runs],
                "best_lr": best,
                "extended": len(lrs) > len(grid),
                "at_edge": best is not None and len(lrs) > 1 and best in (lrs[0], lrs[-1]),
            }
        )
    return rows


def long_runs(records: list[dict[str, Any]], settings: dict[str, Any], method: str, lr: float | None) -> list[dict]:
    return sorted(
        (
            r
            for r in records
            if r["method"] == method and r["lr"] == lr and _steps_of(r) == settings["steps"] and _ok(r)
        ),
        key=lambda r: r["seed"],
    )


def long_rows(records: list[dict[str, Any]], settings: dict[str, Any], best: dict[str, float]) -> list[dict]:
    rows = []
    sequences = settings["global_batch_size"] * settings["steps"]
    for method, lr in best.items():
        runs = long_runs(records, settings, method, lr)
        epochs = [
            settings["steps"] * settings["global_batch_size"] / r["train_sequences"]
            for r in runs
            if r.get("train_sequences")
        ]
        rows.append(
            {
                "method": method,
                "selector": SELECTORS.get(method) or "full rank",
                "lr": lr,
                "seeds": [r["seed"] for r in runs],
                "loss": summarize([r["final_loss"] for r in runs]),
                "ppl": summarize([r["final_ppl"] for r in runs]),
                "epochs": epochs[0] if epochs else None,
                "sequences_read": sequences,
                "seconds_per_run": sum(r["seconds"] for r in runs) / len(runs) if runs else None,
            }
        )
    return rows


def overlap_curve(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean overlap over runs at every refresh step all of them have, the chance level, the mean per module type."""
    runs = [r for r in runs if r["refreshes"]]
    if not runs:
        return None
    by_step: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        for entry in r["refreshes"]:
            by_step.setdefault(entry["step"], []).append(entry)
    steps = sorted(s for s, entries in by_step.items() if len(entries) == len(runs))
    entries = [e for s in steps for e in by_step[s]]
    types = sorted({t for e in entries for t in e["by_type"]})
    last = [e for s in steps[-max(1, len(steps) // 3) :] for e in by_step[s]]  # the last third of the refreshes
    return {
        "runs": len(runs),
        "steps": steps,
        "overlap": [sum(e["overlap"] for e in by_step[s]) / len(by_step[s]) for s in steps],
        "chance": sum(e["chance"] for e in entries) / len(entries),
        "by_type_last_third": {t: sum(e["by_type"].get(t, 0.0) for e in last) / len(last) for t in types},
    }


def pilot_summary(records: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any] | None:
    pilot = settings["pilot"]
    runs = [
        r
        for r in records
        if r["method"] == pilot["method"]
        and r["lr"] == pilot["lr"]
        and r["seed"] == 0
        and _steps_of(r) == settings["steps"]
    ]
    curve = overlap_curve(runs) if runs else None
    if curve is None:
        return None
    first = next((s for s, v in zip(curve["steps"], curve["overlap"]) if v >= FROZEN), None)
    return {
        **pilot,
        "steps": curve["steps"],
        "overlap": curve["overlap"],
        "chance": curve["chance"],
        "max": max(curve["overlap"]),
        "final": curve["overlap"][-1],
        "first_frozen_step": first,
        "final_loss": runs[0]["final_loss"],
    }


def checkpoints(steps: int, every: int) -> list[int]:
    """1/3, 2/3 and all of the horizon, rounded to a validation step."""
    marks = [round(steps * k / 3 / every) * every for k in (1, 2, 3)]
    return sorted({max(every, m) for m in marks})


def paired_rows(records: list[dict[str, Any]], settings: dict[str, Any], best: dict[str, float], every: int) -> list:
    sara = {r["seed"]: r for r in long_runs(records, settings, "sara", best.get("sara"))}
    galore = {r["seed"]: r for r in long_runs(records, settings, "galore", best.get("galore"))}
    rows = []
    for step in checkpoints(settings["steps"], every):
        a = {s: _loss_at(r, step) for s, r in sara.items() if _loss_at(r, step) is not None}
        b = {s: _loss_at(r, step) for s, r in galore.items() if _loss_at(r, step) is not None}
        diff = paired_difference(a, b)
        detectable = detectable_difference(diff["std"], diff["n"]) if diff["std"] is not None else None
        rows.append({"step": step, "difference": diff, "detectable": detectable})
    return rows


def verdict(paired: list[dict[str, Any]]) -> str:
    if not paired or paired[-1]["difference"]["ci95"] is None:
        return "SARA vs GaLore cannot be decided: fewer than two paired seeds at the end."
    d = paired[-1]["difference"]
    span = (
        f"SARA - GaLore = {d['mean']:+.4f} in final validation loss at step {paired[-1]['step']}, 95% interval over "
        f"{d['n']} paired seeds [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"
    )
    if d["ci95"][1] < 0:
        head = "Importance sampling (SARA) beats GaLore beyond the seed spread"
    elif d["ci95"][0] > 0:
        head = "Importance sampling (SARA) is worse than GaLore beyond the seed spread"
    else:
        head = "Importance sampling (SARA) does not differ from GaLore beyond the seed spread"
    means = ", ".join(
        f"{p['difference']['mean']:+.4f} at step {p['step']}" for p in paired if p["difference"]["mean"] is not None
    )
    return f"{head} ({span}); the paired mean difference went {means}."


def _last_third(values: list[float]) -> float:
    tail = values[-max(1, len(values) // 3) :]
    return sum(tail) / len(tail)


def frozen_summary(pilot: dict[str, Any] | None, overlaps: dict[str, dict[str, Any]]) -> str:
    if pilot is None:
        return "No pilot run recorded."
    if pilot["first_frozen_step"] is None:
        head = (
            f"The dominant subspace did not freeze: GaLore's mean overlap stayed below {FROZEN} through step "
            f"{pilot['steps'][-1]} (maximum {pilot['max']:.3f}, last {pilot['final']:.3f}, chance "
            f"{pilot['chance']:.3f})."
        )
    else:
        head = (
            f"The dominant subspace froze: GaLore's mean overlap first reached {FROZEN} at step "
            f"{pilot['first_frozen_step']} (maximum {pilot['max']:.3f}, last {pilot['final']:.3f}, chance "
            f"{pilot['chance']:.3f})."
        )
    tails = ", ".join(f"{m} {_last_third(c['overlap']):.3f}" for m, c in overlaps.items())
    return head + (f" Mean overlap over the last third of the refreshes: {tails}." if tails else "")


def build_result(records: list[dict[str, Any]], settings: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    every = settings["val_every"]
    sweep = sweep_rows(records, settings)
    best = {row["method"]: row["best_lr"] for row in sweep if row["best_lr"] is not None}
    overlaps = {}
    for method in ("galore", "sara", "golore"):
        curve = overlap_curve(long_runs(records, settings, method, best.get(method)))
        if curve is not None:
            overlaps[method] = curve
    pilot = pilot_summary(records, settings)
    paired = paired_rows(records, settings, best, every)
    return {
        "meta": meta,
        "settings": settings,
        "sweep": sweep,
        "long": long_rows(records, settings, best),
        "pilot": pilot,
        "overlaps": overlaps,
        "paired": paired,
        "verdict": verdict(paired),
        "frozen_summary": frozen_summary(pilot, overlaps),
        "runs": records,
        "failed": sorted(r.get("key", r["name"]) for r in records if r.get("error")),
    }


# ----------------------------------------------------------------------------------------------------- markdown
def render_markdown(result: dict[str, Any]) -> str:
    meta, s = result["meta"], result["settings"]
    head = (
        "# Training quality at a long horizon (frozen subspace)\n\n"
        f"Device {meta['device']} ({meta['device_name']}), torch {meta['torch']}, {meta['args']['jobs']} run(s) at a "
        f"time x {meta['args']['threads']} thread(s), {meta['cpu_count']} CPUs, {meta['date']}. Config `default` "
        f"with `{' '.join(s['common_overrides'])}`; sweep {s['sweep_steps']} steps (seed 0), long runs {s['steps']} "
        f"steps; {s['seeds']} paired seeds for {' and '.join(s['paired'])}, one seed for the others; alpha "
        f"{s['alpha']:g} (adamw_split: matrices at lr x {s['alpha']:g}).\n"
    )
    failed = f"\n**Failed runs:** {', '.join(result['failed'])}\n" if result["failed"] else ""
    sweep = markdown_table(
        ("method", "lrs", f"final val loss at step {s['sweep_steps']}", "best", "note"),
        [
            (
                r["method"],
                ", ".join(f"{lr:g}" for lr in r["lrs"]),
                ", ".join("failed" if v is None else f"{v:.4f}" for v in r["final_losses"]),
                "-" if r["best_lr"] is None else f"{r['best_lr']:g}",
                ("extended once; " if r["extended"] else "")
                + ("best still at a grid edge" if r["at_edge"] else "best inside the grid"),
            )
            for r in result["sweep"]
        ],
    )
    long = markdown_table(
        (
            "method",
            "selector",
            "lr",
            "seeds",
            "val loss (mean +- std)",
            "loss 95% CI",
            "val ppl",
            "epochs read",
            "s/run",
        ),
        [
            (
                r["method"],
                r["selector"],
                f"{r['lr']:g}",
                str(len(r["seeds"])),
                fmt_mean_std(r["loss"], 4),
                fmt_interval(r["loss"]["ci95"], 4),
                fmt_mean_std(r["ppl"], 2),
                "-" if r["epochs"] is None else f"{r['epochs']:.2f}",
                "-" if r["seconds_per_run"] is None else f"{r['seconds_per_run']:.0f}",
            )
            for r in result["long"]
        ],
    )
    paired = markdown_table(
        ("step", "SARA - GaLore (mean, 95% CI)", "std of the differences", "excludes 0 from", "80% power at"),
        [
            (
                str(p["step"]),
                fmt_difference(p["difference"], 4),
                "-" if p["difference"]["std"] is None else f"{p['difference']['std']:.4f}",
                "-" if p["detectable"] is None else f"{p['detectable']['excludes_zero']:.4f}",
                "-" if p["detectable"] is None else f"{p['detectable']['power80']:.4f}",
            )
            for p in result["paired"]
        ],
    )
    overlap = overlap_table(result["overlaps"])
    return "\n".join(
        [
            head + failed,
            f"**{result['frozen_summary']}**\n",
            f"**{result['verdict']}**\n",
            pilot_sentence(result) + "\n",
            "## Final validation loss at the long horizon (best lr per method)\n",
            long,
            "",
            "## SARA - GaLore, paired over seeds, as the horizon grows\n",
            "Same seed: same initialisation and data order. `*`: the 95% Student-t interval excludes 0. 'excludes 0 "
            "from': the smallest mean difference whose interval would exclude zero at this n and spread; '80% power "
            "at': the true difference a paired t-test at 5% would find 4 times in 5.\n",
            paired,
            "",
            "## Subspace overlap ||B_old^T B_new||_F^2 / r at each refresh (mean over matrices and seeds)\n",
            overlap,
            "",
            "## Learning-rate sweep\n",
            sweep,
            "",
        ]
    )


def pilot_sentence(result: dict[str, Any]) -> str:
    """The pilot's final loss beside GaLore's long run of the same seed at the sweep's best lr."""
    pilot = result["pilot"]
    if pilot is None:
        return "No pilot run recorded."
    s = result["settings"]
    text = (
        f"Pilot: GaLore at lr {pilot['lr']:g}, seed 0, {s['steps']} steps: final validation loss "
        f"{pilot['final_loss']:.4f}."
    )
    best = next((r for r in result["long"] if r["method"] == pilot["method"]), None)
    if best is not None and best["lr"] != pilot["lr"]:
        runs = long_runs(result["runs"], s, pilot["method"], best["lr"])
        same_seed = next((r["final_loss"] for r in runs if r["seed"] == 0), None)
        if same_seed is not None:
            better = "lower" if pilot["final_loss"] < same_seed else "higher"
            text += (
                f" The {s['sweep_steps']}-step sweep chose lr {best['lr']:g}; at that lr seed 0 ended at "
                f"{same_seed:.4f}, so the pilot's lr ends {better} ({pilot['final_loss'] - same_seed:+.4f}): a "
                f"learning rate chosen at {s['sweep_steps']} steps is not necessarily the best at {s['steps']}."
            )
    return text


def overlap_table(overlaps: dict[str, dict[str, Any]], columns: int = 7) -> str:
    """Mean overlap per selector at up to ``columns`` refresh steps spread over the run (first and last included),
    the chance level, and per module type over the last third of the refreshes."""
    if not overlaps:
        return "(no low-rank runs)"
    steps = next(iter(overlaps.values()))["steps"]
    count = min(columns, len(steps))
    picks = sorted({steps[round(i * (len(steps) - 1) / max(1, count - 1))] for i in range(count)})
    header = ("method", "selector", "runs", *(f"step {s}" for s in picks), "chance r/d", "last third by type")
    body = []
    for method, c in overlaps.items():
        at = dict(zip(c["steps"], c["overlap"]))
        body.append(
            (
                method,
                SELECTORS[method],
                str(c["runs"]),
                *(f"{at[s]:.3f}" if s in at else "-" for s in picks),
                f"{c['chance']:.3f}",
                ", ".join(f"{t} {v:.2f}" for t, v in c["by_type_last_third"].items()),
            )
        )
    return markdown_table(header, body)


# -------------------------------------------------------------------------------------------------------- plots
def _mean_curve(runs: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = {}
    for r in runs:
        for v in r["validations"]:
            by_step.setdefault(v["step"], []).append(v["loss"])
    steps = sorted(s for s, values in by_step.items() if len(values) == len(runs))
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def write_plots(result: dict[str, Any], out: Path) -> None:
    """quality_long_loss.png, quality_long_overlap.png and quality_long_difference.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    finals = []
    for row in result["long"]:
        runs = long_runs(result["runs"], s, row["method"], row["lr"])
        steps, losses = _mean_curve(runs)
        if steps:
            ax.plot(
                steps,
                losses,
                marker=".",
                color=_COLORS.get(row["method"], "black"),
                label=f"{row['method']} (lr {row['lr']:g}, n={len(runs)})",
            )
            finals.append(losses[-1])
    if finals:
        low, high = min(finals), max(finals)
        ax.set_ylim(low - 0.1, high + 1.0)
    ax.set(xlabel="optimizer step", ylabel="validation loss (mean over seeds)", title="Validation loss, long horizon")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_long_loss.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    chance = None
    for method, c in result["overlaps"].items():
        ax.plot(
            c["steps"],
            c["overlap"],
            marker="o",
            markersize=3,
            color=_COLORS[method],
            label=f"{method} ({SELECTORS[method]}, n={c['runs']})",
        )
        chance = c["chance"]
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label=f"chance r/d = {chance:.3f}")
    ax.axhline(FROZEN, color="black", linestyle="--", linewidth=0.8, label=f"frozen threshold {FROZEN}")
    ax.set(
        xlabel="optimizer step (refresh)",
        ylabel="overlap ||B_old^T B_new||_F^2 / r",
        ylim=(0, 1.02),
        title="Subspace overlap at each refresh (mean over matrices and seeds)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_long_overlap.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sara = {r["seed"]: r for r in long_runs(result["runs"], s, "sara", _best(result, "sara"))}
    galore = {r["seed"]: r for r in long_runs(result["runs"], s, "galore", _best(result, "galore"))}
    for seed in sorted(set(sara) & set(galore)):
        a = {v["step"]: v["loss"] for v in sara[seed]["validations"]}
        b = {v["step"]: v["loss"] for v in galore[seed]["validations"]}
        steps = sorted(set(a) & set(b))
        ax.plot(steps, [a[t] - b[t] for t in steps], marker=".", label=f"seed {seed}")
    for p in result["paired"]:
        d = p["difference"]
        if d["ci95"] is not None:
            ax.errorbar(
                [p["step"]],
                [d["mean"]],
                yerr=[[d["mean"] - d["ci95"][0]], [d["ci95"][1] - d["mean"]]],
                fmt="ks",
                capsize=4,
                label="mean, 95% CI" if p is result["paired"][0] else None,
            )
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(xlabel="optimizer step", ylabel="val loss SARA - GaLore (same seed)", title="Paired difference vs horizon")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_long_difference.png", dpi=110)
    plt.close(fig)


def _best(result: dict[str, Any], method: str) -> float | None:
    return next((r["best_lr"] for r in result["sweep"] if r["method"] == method), None)


__all__ = ["build_result", "excludes_zero", "render_markdown", "write_plots"]
