"""``build_optimizer(model, config)``: which parameters go low-rank, the optimizer, and the group table.

Rule: a parameter goes low-rank when it is 2-D and its name matches one of ``config.lowrank.targets`` (regular
expressions, ``re.search``, first match wins; default: the q, k, v, o, gate, up and down projections). Everything
else (embeddings, output head, norms, biases) is the plain group with the base optimizer at the full learning rate.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowrank.bases import BASES
from lowrank.compact_adamw import CompactAdamW
from lowrank.config import PRECISION_BASES, OptimizerConfig, optimizer_config_from_dict
from lowrank.optimizer import LowRankOptimizer
from lowrank.projector import basis_dim, projected_shape, resolve_side


@dataclasses.dataclass(frozen=True)
class TableRow:
    """One parameter in the group table. ``rank``, ``side`` and ``pattern`` are None for the plain group."""

    name: str
    shape: tuple[int, ...]
    group: str
    rank: int | None
    side: str | None
    pattern: str | None
    state_bytes: int


@dataclasses.dataclass(frozen=True)
class GroupTable:
    """Which parameter went where, with the optimizer state it will hold (moments and bases)."""

    rows: tuple[TableRow, ...]

    def state_bytes(self, group: str | None = None) -> int:
        return sum(row.state_bytes for row in self.rows if group is None or row.group == group)

    def __str__(self) -> str:
        header = ("parameter", "shape", "group", "rank", "side", "state MiB")
        lines = [header] + [
            (
                r.name,
                "x".join(map(str, r.shape)),
                r.group,
                str(r.rank or "-"),
                r.side or "-",
                f"{r.state_bytes / 2**20:.3f}",
            )
            for r in self.rows
        ]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
        text.insert(1, "  ".join("-" * w for w in widths))
        low = [r for r in self.rows if r.group == "lowrank"]
        text.append(
            f"{len(low)} low-rank / {len(self.rows) - len(low)} plain parameters; optimizer state "
            f"{self.state_bytes() / 2**20:.2f} MiB (low-rank {self.state_bytes('lowrank') / 2**20:.2f}, "
            f"plain {self.state_bytes('plain') / 2**20:.2f})"
        )
        return "\n".join(text)


def _base_options(cfg: OptimizerConfig, base: str) -> dict[str, Any]:
    if base in ("adam", "adamw", "adamw_bf16", "adamw8bit"):
        return {"betas": tuple(cfg.betas), "eps": cfg.eps}
    return {}  # Adafactor keeps its own defaults (no first moment; relative steps)


def _assign(named: list[tuple[str, nn.Parameter]], targets: list[str]) -> dict[str, str]:
    """name -> matching pattern for every 2-D parameter that matches a target (first match wins)."""
    compiled = []
    for pattern in targets:
        try:
            compiled.append((pattern, re.compile(pattern)))
        except re.error as err:
            raise ValueError(f"optimizer.lowrank.targets: {pattern!r} is not a regular expression ({err})") from None
    chosen, used = {}, set()
    for name, param in named:
        for pattern, regex in compiled:
            if param.dim() == 2 and regex.search(name):
                chosen[name] = pattern
                used.add(pattern)
                break
    unused = [pattern for pattern, _ in compiled if pattern not in used]
    if unused:
        sample = ", ".join(name for name, _ in named[:6])
        raise ValueError(
            f"optimizer.lowrank.targets: pattern(s) {unused} match no 2-D parameter; parameter names look like: "
            f"{sample}, ...; accepted: regular expressions that match at least one 2-D weight"
        )
    return chosen


def build_optimizer(model: nn.Module, config: OptimizerConfig | Mapping[str, Any]) -> torch.optim.Optimizer:
    """Builds the configured optimizer over ``model``'s trainable parameters.

    Returns:
        The optimizer (``torch.optim.AdamW`` for ``name: adamw`` (or :class:`CompactAdamW` with compact states),
        else :class:`LowRankOptimizer` on the ``optimizer.refresh`` schedule), ready to be returned from a
        LightningModule's ``configure_optimizers``. Its ``group_table`` attribute (:class:`GroupTable`) says which
        parameter went where, to log at start-up.
    """
    cfg = optimizer_config_from_dict(config)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters")
    if cfg.name == "adamw":
        # fp32: torch's own AdamW, the reference baseline; bf16 / 8bit: the same update with compact moments.
        groups = [{"params": [p for _, p in named], "param_names": [n for n, _ in named], "name": "plain"}]
        hyper = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
        if cfg.state_precision == "fp32":
            optimizer = torch.optim.AdamW(groups, **hyper)
        else:
            optimizer = CompactAdamW(groups, state_precision=cfg.state_precision, **hyper)
        spec = BASES[PRECISION_BASES.get(cfg.state_precision, "adamw")]
        rows = [
            TableRow(n, tuple(p.shape), "plain", None, None, None, spec.estimate_state_bytes(tuple(p.shape), p.dtype))
            for n, p in named
        ]
        optimizer.group_table = GroupTable(tuple(rows))
        return optimizer

    low = cfg.lowrank
    chosen = _assign(named, low.targets)
    for name, param in named:
        if name in chosen and low.rank > min(param.shape):
            raise ValueError(
                f"optimizer.lowrank.rank: {low.rank} is larger than parameter {name!r} allows (shape "
                f"{tuple(param.shape)}); accepted: 1 .. {min(param.shape)}, or exclude it from "
                "optimizer.lowrank.targets"
            )
    base = cfg.base_name()
    spec = BASES[base]
    rows, lowrank_named, plain_named = [], [], []
    for name, param in named:
        shape = tuple(param.shape)
        if name in chosen:
            side = resolve_side(shape, low.side)
            moments = spec.estimate_state_bytes(projected_shape(shape, side, low.rank), param.dtype)
            basis = basis_dim(shape, side) * low.rank * param.element_size()
            rows.append(TableRow(name, shape, "lowrank", low.rank, side, chosen[name], moments + basis))
            lowrank_named.append((name, param))
        else:
            rows.append(TableRow(name, shape, "plain", None, None, None, spec.estimate_state_bytes(shape, param.dtype)))
            plain_named.append((name, param))
    groups = [
        # "name" labels the groups in Lightning's LearningRateMonitor (train/lr/lowrank, train/lr/plain).
        {
            "params": [p for _, p in lowrank_named],
            "param_names": [n for n, _ in lowrank_named],
            "rank": low.rank,
            "name": "lowrank",
        },
    ]
    if plain_named:
        groups.append(
            {"params": [p for _, p in plain_named], "param_names": [n for n, _ in plain_named], "name": "plain"}
        )
    optimizer = LowRankOptimizer(
        groups,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        base=base,
        base_options=_base_options(cfg, base),
        schedule=cfg.refresh,
        **low.options(),
    )
    optimizer.group_table = GroupTable(tuple(rows))
    return optimizer
