"""The SfN study's report (``bench/sfn_study.py``): markdown tables and the share plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from _common import markdown_table

LABELS = {
    "base": "A (base)",
    "adamw": "AdamW",
    "galore": "GaLore",
    "sara": "SARA",
    "adamw_oproj": "AdamW, o_proj + companions only",
}


def _f(value: float, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def render_markdown(result: dict[str, Any]) -> str:
    s, losses, delta = result["settings"], result["losses"], result["delta"]
    meta = result["meta"]
    runs = list(delta)
    kinds = list(next(iter(delta.values())))
    lines = [
        "# Which modules a training method moves, and which matter",
        "",
        f"Device {meta['device']}, torch {meta['torch']}, {meta['date']}. Base: the default recipe, "
        f"{s['base_steps']} steps on the docstring corpus; continued runs: {s['steps']} steps on the standard "
        f"library's source code with the base's tokenizer, from the base's weights (one seed each). Validation: "
        f"{s['validation_sequences']['own']} sequences of the base corpus ('own'), "
        f"{s['validation_sequences']['code']} of the code corpus.",
        "",
        "## Validation loss",
        "",
        markdown_table(
            ["model", "own corpus", "code corpus", "train seconds"],
            [
                [LABELS.get(n, n), _f(v["own"]), _f(v["code"]), f"{result['seconds'].get(n, 0):.0f}"]
                for n, v in losses.items()
            ],
        ),
        "",
        "## Share of the total squared change of the block matrices (A -> B)",
        "",
        "sum ||w_B - w_A||^2 over the type / over all seven types; in brackets the relative change ||w_B - w_A|| / "
        "||w_A|| of the type.",
        "",
        markdown_table(
            ["module type", *[LABELS.get(r, r) for r in runs]],
            [
                [kind, *[f"{delta[r][kind]['share']:.3f} ({delta[r][kind]['relative_l2']:.4f})" for r in runs]]
                for kind in kinds
            ],
        ),
        "",
        "## Sarle's bimodality coefficient of the element-wise relative change (> 0.555: bimodal)",
        "",
        markdown_table(
            ["module type", *[LABELS.get(r, r) for r in runs]],
            [[kind, *[_f(delta[r][kind]["bimodality"], 3) for r in runs]] for kind in kinds],
        ),
        "",
        "## Merge: one module type of the AdamW-continued model into A (code corpus)",
        "",
        _merge_table(result),
        "",
        "## Destruction of A (own corpus)",
        "",
        markdown_table(
            ["module type", "zeroed", "re-initialised N(0, 0.02^2)"],
            [["(intact)", _f(losses["base"]["own"]), _f(losses["base"]["own"])]]
            + [[k, _f(v["zero"]), _f(v["reinit"])] for k, v in result["destruction"].items()],
        ),
        "",
        markdown_table(
            ["layer removed", "val loss"],
            [[layer, _f(loss)] for layer, loss in result["removed_layers"].items()],
        ),
    ]
    return "\n".join(lines)


def _merge_table(result: dict[str, Any]) -> str:
    base, tuned = result["losses"]["base"]["code"], result["losses"]["adamw"]["code"]
    gain = base - tuned
    rows = [["(none: A)", _f(base), "0"]]
    for kind, loss in result["merge"].items():
        rows.append([kind, _f(loss), f"{(base - loss) / gain:.2f}" if gain > 0 else "-"])
    rows.append(["(all: AdamW-continued B)", _f(tuned), "1" if gain > 0 else "-"])
    return markdown_table(["copied from B", "code val loss", "share of B's gain"], rows)


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    delta = result["delta"]
    # a run that moved one type only (o_proj alone) is a single bar at 1: left out, so the others stay readable
    runs = [run for run in delta if max(t["share"] for t in delta[run].values()) < 1.0]
    kinds = list(next(iter(delta.values())))
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, run in enumerate(runs):
        ax.bar(
            [k + i * width for k in range(len(kinds))],
            [delta[run][kind]["share"] for kind in kinds],
            width,
            label=LABELS.get(run, run),
        )
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(kinds))], kinds)
    ax.set_ylabel("share of the squared change")
    ax.set_title("Where each method moved the block matrices (A -> B)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
