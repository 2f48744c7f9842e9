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
ROWS: tuple[tuple[str, OptimizerShape, bool], ...] = (
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
)
COMPONENTS = ("weights", "gradients", "optimizer", "activations")


def table_7b(micro_batch: int = 1, seq_len: int = 256, ddp_world: int = 8) -> dict[str, Any]:
    """Rows (estimates in bytes by component, one device and per DDP rank) and their markdown."""
    model = ModelShape.from_config(llama_preset("7b"))
    rows = []
    for label, optimizer, per_layer in ROWS:
        single = estimate_memory(
            model, optimizer, TrainingShape(micro_batch, seq_len, torch.bfloat16, False, per_layer)
        )
        ddp = None
        if not per_layer:  # per-layer updates step before the all-reduce: one device only
            ddp = estimate_memory(
                model, optimizer, TrainingShape(micro_batch, seq_len, torch.bfloat16, world_size=ddp_world)
            )
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
    return {"rows": rows, "markdown": markdown_table(header, lines)}
