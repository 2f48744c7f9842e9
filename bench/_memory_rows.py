"""The rows of ``bench/memory.py``: model sizes, optimizer variants, and the estimator's shapes and the optimizer
settings of each (one place, so that the measured child and the estimate describe the same run)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lowrank.memory import ModelShape, OptimizerShape, TrainingShape
from lowrank_recipes.recipes.model import LlamaConfig, llama_preset


@dataclasses.dataclass(frozen=True)
class Size:
    """A model size: its config, the low-rank rank r of the reference runs, the parameter dtype (bf16 means
    Lightning's "bf16-true": weights, gradients and torch AdamW's moments in bf16), micro-batch x sequence length
    and the refresh rule (``randomized_importance`` where the exact SVD of every matrix would dominate the run)."""

    config: LlamaConfig
    rank: int
    dtype: torch.dtype
    micro_batch: int = 1
    seq_len: int = 256
    selector: str = "importance"


@dataclasses.dataclass(frozen=True)
class Variant:
    """An optimizer variant: ``optimizer`` adamw | lowrank | poet, ``precision`` of Adam's moments (fp32: torch AdamW,
    whose moments follow the parameter dtype), per-layer weight updates, activation checkpointing, projected
    gradients (lowrank.projected; measured from step 1 on: step 0 forms every full gradient for the first bases),
    POET's block size as a divisor of the hidden size (b = d / divisor; the child merges after step 1)."""

    optimizer: str
    precision: str
    per_layer: bool = False
    checkpointing: bool = False
    projected: bool = False
    poet_divisor: int = 0


SIZES: dict[str, Size] = {
    "tiny": Size(LlamaConfig(512, 64, 172, 4, 2, 32), 16, torch.float32, micro_batch=4, seq_len=32),
    "60m": Size(llama_preset("60m"), 128, torch.float32),
    "130m": Size(llama_preset("130m"), 256, torch.float32),
    "350m": Size(llama_preset("350m"), 256, torch.bfloat16),
    "1b": Size(llama_preset("1b"), 512, torch.bfloat16, selector="randomized_importance"),
}
VARIANTS: dict[str, Variant] = {
    "adamw-fp32": Variant("adamw", "fp32"),
    "adamw-8bit": Variant("adamw", "8bit"),
    "lowrank-fp32": Variant("lowrank", "fp32"),
    "lowrank-8bit": Variant("lowrank", "8bit"),
    "lowrank-8bit-per-layer": Variant("lowrank", "8bit", per_layer=True),
    "lowrank-8bit-per-layer-ckpt": Variant("lowrank", "8bit", per_layer=True, checkpointing=True),
    "lowrank-8bit-projected": Variant("lowrank", "8bit", projected=True),
    "poet-d4-fp32": Variant("poet", "fp32", poet_divisor=4),
    "poet-d4-8bit": Variant("poet", "8bit", poet_divisor=4),
}


def poet_block(size: str, variant: str) -> int:
    """POET's block size b = hidden size / the variant's divisor (0 for other variants)."""
    divisor = VARIANTS[variant].poet_divisor
    return SIZES[size].config.hidden_size // divisor if divisor else 0


# (size, variant) pairs measured by default: every variant at every size, activation checkpointing at 1B only.
DEFAULT_ROWS: tuple[tuple[str, str], ...] = tuple(
    (size, variant)
    for size in ("60m", "130m", "350m", "1b")
    for variant in VARIANTS
    if size == "1b" or not VARIANTS[variant].checkpointing
)
QUICK_ROWS: tuple[tuple[str, str], ...] = tuple(("tiny", variant) for variant in VARIANTS)


def model_config(size: str, variant: str) -> LlamaConfig:
    """The size's config with the variant's activation checkpointing."""
    config = SIZES[size].config
    return dataclasses.replace(config, activation_checkpointing=VARIANTS[variant].checkpointing)


def stagger_of(size: str, variant: str, stagger_one: bool) -> int:
    """The refresh stagger of a low-rank row: the number of layers (one layer's matrices refresh per step, the
    setting a large run would use), or 1 (every basis refreshes at the same step) for the stagger-1 peak."""
    return 1 if stagger_one or VARIANTS[variant].optimizer != "lowrank" else SIZES[size].config.num_layers


def optimizer_settings(size: str, variant: str, stagger: int) -> dict[str, Any]:
    """The ``optimizer`` section of the run: update gap = stagger k, so that step 0 gives every low-rank weight its
    first basis and step 1 refreshes slice 1 (k = 1: every weight again)."""
    spec, row = SIZES[size], VARIANTS[variant]
    settings: dict[str, Any] = {"name": row.optimizer, "lr": 1e-3, "state_precision": row.precision}
    if row.optimizer == "lowrank":
        settings["lowrank"] = {"rank": spec.rank, "selector": spec.selector, "seed": 0}
        settings["refresh"] = {"update_gap": stagger, "stagger": stagger}
    if row.optimizer == "poet":
        settings["poet"] = {"block_size": poet_block(size, variant)}
    return settings


def shapes(size: str, variant: str, stagger: int, device: str) -> tuple[ModelShape, OptimizerShape, TrainingShape]:
    """The estimator's description of the row on a ``device`` kind (cpu, cuda)."""
    spec, row = SIZES[size], VARIANTS[variant]
    optimizer = OptimizerShape(
        name=row.optimizer,
        rank=spec.rank,
        state_precision=row.precision,
        selector=spec.selector,
        stagger=stagger,
        poet_block_size=poet_block(size, variant) or 256,
    )
    training = TrainingShape(
        spec.micro_batch,
        spec.seq_len,
        spec.dtype,
        row.checkpointing,
        row.per_layer,
        device=device,
        projected_gradients=row.projected,
    )
    return ModelShape.from_config(spec.config), optimizer, training
