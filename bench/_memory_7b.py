"""The estimator's LLaMA 7B table beside GaLore's published figures (GaLore paper, Figure 1: LLaMA 7B, token batch
256 on one device, no activation checkpointing: 8-bit GaLore with per-layer weight updates 22.0 GB, 63.3% below
BF16 Adam, which puts BF16 Adam at about 60 GB). GB here is 10^9 bytes, as in the paper's figure. Estimates are
for a CUDA device; low-rank rows refresh with stagger 32 (one layer's matrices per refresh step)."""

from __future__ import annotations

from typing import Any

import torch

from lowrank.memory import ModelShape, OptimizerShape, TrainingShape, estimate_memory
from lowrank_recipes.recipes.model import llama_preset

from _common import markdown_table

GB = 1e9
PUBLISHED_GB: dict[str, float] = {"bf16 AdamW": 22.0 / (1 - 0.633), "8-bit low-rank r1024, per-layer": 22.0}
LAYERS = 32  # low-rank rows refresh one layer's matrices per step (stagger = layers), as a long run would
# per-layer updates (True), ordinary steps (False) or projected gradients ("projected", steady state)
ROWS: tuple[tuple[str, OptimizerShape, bool | str], ...] = (
    ("bf16 AdamW", OptimizerShape("adamw", state_precision="fp32"), False),
    ("8-bit AdamW", OptimizerShape("adamw", state_precision="8bit"), False),
    ("8-bit low-rank r512", OptimizerShape("lowrank", rank=512, state_precision="8bit", stagger=LAYERS), False),
    (
        "8-bit low-rank r512, per-layer",
        OptimizerShape("lowrank", rank=512, state_precision="8bit", stagger=LAYERS),
        True,
    ),
    ("8-bit low-rank r1024", OptimizerShape("lowrank", rank=1024, state_precision="8bit", stagger=LAYERS), False),
    (
        "8-bit low-rank r1024, per-layer",
        OptimizerShape("lowrank", rank=1024, state_precision="8bit", stagger=LAYERS),
        True,
    ),
    (
        "8-bit low-rank r512, projected",
        OptimizerShape("lowrank", rank=512, state_precision="8bit", stagger=LAYERS),
        "projected",
    ),
    (
        "8-bit low-rank r1024, projected",
        OptimizerShape("lowrank", rank=1024, state_precision="8bit", stagger=LAYERS),
        "projected",
    ),
)
COMPONENTS = ("weights", "gradients", "optimizer", "activations")


def table_7b(micro_batch: int = 1, seq_len: int = 256, ddp_world: int = 8) -> dict[str, Any]:
    """Rows (estimates in bytes by component, one device and per DDP rank) and their markdown."""
    model = ModelShape.from_config(llama_preset("7b"))
    rows = []
    for label, optimizer, mode in ROWS:
        per_layer, projected = mode is True, mode == "projected"
        single = estimate_memory(
            model,
            optimizer,
            TrainingShape(micro_batch, seq_len, torch.bfloat16, False, per_layer, projected_gradients=projected),
        )
        ddp = None
        if not per_layer:  # per-layer updates step before the all-reduce: one device only
            shape = TrainingShape(
                micro_batch, seq_len, torch.bfloat16, world_size=ddp_world, projected_gradients=projected
            )
            ddp = estimate_memory(model, optimizer, shape)
        published = PUBLISHED_GB.get(label)
        rows.append(
            {
                "row": label,
                "single_device": single.as_dict(),
                "ddp_rank": None if ddp is None else ddp.as_dict(),
                "published_gb": published,
                "error_vs_published": None if published is None else round(single.total / GB / published - 1, 4),
            }
        )
    header = ["LLaMA 7B, bf16, token batch 256", *(f"{c} GB" for c in COMPONENTS), "sum GB", "temporaries GB"]
    header += ["one device GB (peak)"]
    header += [f"per DDP rank GB (world {ddp_world})", "GaLore published GB", "estimate vs published"]
    lines = []
    for r in rows:
        single = r["single_device"]
        ddp = (
            "- (per-layer updates: one device only)" if r["ddp_rank"] is None else f"{r['ddp_rank']['total'] / GB:.1f}"
        )
        published = "-" if r["published_gb"] is None else f"{r['published_gb']:.1f}"
        error = "-" if r["error_vs_published"] is None else f"{100 * r['error_vs_published']:+.1f}%"
        cells = [f"{single[c] / GB:.2f}" for c in COMPONENTS]
        temporaries = f"{single['workspace'] / GB:.2f} ({single['peak_phase']})"
        lines.append([r["row"], *cells, f"{single['sum'] / GB:.1f}", temporaries, f"{single['total'] / GB:.1f}"])
        lines[-1] += [ddp, published, error]
    return {"rows": rows, "markdown": markdown_table(header, lines), "targets": projected_targets(rows)}


def projected_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The projected rows against their targets: rank 512 per DDP rank at or below GaLore's 22.0 GB (gradient
    accumulation changes nothing: R accumulates in place); rank 1024 at or below the per-layer row plus the bytes of
    R and of the plain group's gradients."""
    by = {r["row"]: r for r in rows}
    r512 = by["8-bit low-rank r512, projected"]["ddp_rank"]["total"]
    r1024 = by["8-bit low-rank r1024, projected"]["single_device"]
    per_layer = by["8-bit low-rank r1024, per-layer"]["single_device"]["total"]
    bound = per_layer + r1024["gradients"]  # R (the companions' gradients) and the plain gradients
    return [
        {"row": "8-bit low-rank r512, projected, per DDP rank", "estimate": r512, "target": 22.0 * GB},
        {"row": "8-bit low-rank r1024, projected, one device", "estimate": r1024["total"], "target": bound},
    ]


def targets_markdown(targets: list[dict[str, Any]]) -> str:
    lines = [
        [
            t["row"],
            f"{t['estimate'] / GB:.2f}",
            f"{t['target'] / GB:.2f}",
            "met" if t["estimate"] <= t["target"] else "missed",
        ]
        for t in targets
    ]
    return markdown_table(["projected-gradient target (7B, bf16)", "estimate GB", "target GB", ""], lines)
