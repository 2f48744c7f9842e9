"""The group table of :func:`lowrank.build_optimizer`: which parameter went where, to print or log at start-up.

One row per trainable parameter: its group, module type (low-rank weights: :func:`lowrank.names.module_types`, the
labels the overlap monitor logs), rank and side, its weight decay and the optimizer state it will hold; below the rows
the totals, which parameters decay, and the draw seed with where it came from (:func:`lowrank.randomness.resolve_seed`).
"""

from __future__ import annotations

import dataclasses

from lowrank.names import module_types


@dataclasses.dataclass(frozen=True)
class TableRow:
    """One parameter in the group table. ``rank``, ``side``, ``pattern`` and ``module_type`` are None for plain
    parameters; ``weight_decay`` is the one its group applies (0 for a parameter that does not decay)."""

    name: str
    shape: tuple[int, ...]
    group: str
    rank: int | None
    side: str | None
    pattern: str | None
    state_bytes: int
    weight_decay: float = 0.0
    module_type: str | None = None

    @property
    def lowrank(self) -> bool:
        return self.rank is not None


@dataclasses.dataclass(frozen=True)
class GroupTable:
    """Which parameter went where, with the optimizer state it will hold (moments and bases).

    Attributes:
        rows: one per trainable parameter, in the model's order.
        seed: the run seed of the draws (None for a full-rank optimizer, which draws nothing).
        seed_source: where the seed came from: ``explicit``, ``PL_GLOBAL_SEED`` or ``default``.
        frozen: (name, shape) of every parameter that does not train (POET's W0, what ``model.trainable`` leaves
            out), in the model's order.
        frozen_targets: low-rank target patterns that matched only frozen parameters.
    """

    rows: tuple[TableRow, ...]
    seed: int | None = None
    seed_source: str | None = None
    frozen: tuple[tuple[str, tuple[int, ...]], ...] = ()
    frozen_targets: tuple[str, ...] = ()

    @property
    def trainable_elements(self) -> int:
        """Elements of the trainable parameters (the rows)."""
        return sum(_numel(r.shape) for r in self.rows)

    @property
    def frozen_elements(self) -> int:
        """Elements of the model's parameters that do not train (``frozen``: name and shape of each)."""
        return sum(_numel(shape) for _, shape in self.frozen)

    def state_bytes(self, group: str | None = None) -> int:
        """Bytes of state of the rows of ``group`` (a group name), or of every row."""
        return sum(row.state_bytes for row in self.rows if group is None or row.group == group)

    def __str__(self) -> str:
        header = ("parameter", "shape", "group", "type", "rank", "side", "decay", "state MiB")
        lines = [header] + [
            (
                r.name,
                "x".join(map(str, r.shape)),
                r.group,
                r.module_type or "-",
                str(r.rank or "-"),
                r.side or "-",
                f"{r.weight_decay:g}",
                f"{r.state_bytes / 2**20:.3f}",
            )
            for r in self.rows
        ]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
        text.insert(1, "  ".join("-" * w for w in widths))
        low = sum(r.state_bytes for r in self.rows if r.lowrank)
        count = sum(r.lowrank for r in self.rows)
        text.append(
            f"{count} low-rank / {len(self.rows) - count} plain parameters; optimizer state "
            f"{self.state_bytes() / 2**20:.2f} MiB (low-rank {low / 2**20:.2f}, "
            f"plain {(self.state_bytes() - low) / 2**20:.2f})"
        )
        decaying = [r for r in self.rows if r.weight_decay != 0]
        if decaying:
            rates = ", ".join(f"{rate:g}" for rate in sorted({r.weight_decay for r in decaying}))
            text.append(
                f"weight decay {rates} on {len(decaying)} parameters; none on {len(self.rows) - len(decaying)} "
                "(fewer than 2 dimensions, or matching optimizer.no_decay)"
            )
        else:
            text.append("weight decay: none (weight_decay 0)")
        if self.frozen:
            text.append(
                f"trainable: {self.trainable_elements:,} elements in {len(self.rows)} tensors; frozen (no gradient, no "
                f"optimizer state): {self.frozen_elements:,} elements in {len(self.frozen)} tensors ("
                + ", ".join(f"{kind} x{count}" for kind, count in _type_counts(self.frozen))
                + ")"
            )
        if self.frozen_targets:
            text.append(f"low-rank targets matching only frozen parameters: {list(self.frozen_targets)}")
        if self.seed is not None:
            text.append(f"draw seed {self.seed} ({self.seed_source})")
        return "\n".join(text)


def _type_counts(frozen: tuple[tuple[str, tuple[int, ...]], ...]) -> list[tuple[str, int]]:
    """(module type, tensors) of the frozen parameters, in first-seen order."""
    counts: dict[str, int] = {}
    for kind in module_types([name for name, _ in frozen]).values():
        counts[kind] = counts.get(kind, 0) + 1
    return list(counts.items())


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
