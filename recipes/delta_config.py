"""The ``delta`` section: per-module weight change of a run against a reference
(``lowrank_recipes.callbacks.ModuleDeltaMonitor``, docs/module_delta.md), off unless ``every_n_steps`` is set."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from lowrank.checks import check, is_int

if TYPE_CHECKING:
    from lowrank_recipes.callbacks.module_delta import ModuleDeltaMonitor


@dataclasses.dataclass
class DeltaMonitorConfig:
    """``ModuleDeltaMonitor``'s arguments, one to one.

    Attributes:
        every_n_steps: log every this many optimizer steps; None (the default): no monitor. The reference snapshot
            costs 4 bytes per followed element (2 with ``snapshot_dtype: bfloat16``) of CPU memory on global rank 0
            (per rank's shard under fsdp2).
        reference: ``start`` (the weights when this run's training starts; kept across resumes in the checkpoint) or
            a single checkpoint file of the same model (a recipe ``.ckpt``, e.g. the one ``model.init_from`` names;
            not a sharded directory). Its keys and shapes are checked when training starts.
        histogram_layers: layer indices whose relative-change histograms are logged; None: first, middle, last.
        threshold: elements with |w_ref| below it are left out of the relative change (and counted).
        bins: histogram bins over [-1, 1].
        snapshot_dtype: float32 | bfloat16 (bf16: L2 metrics only; it cannot resolve relative changes below ~0.4%).
        names: regular expressions choosing the followed parameters; None: every weight with 2 or more dimensions.
        image_every: the layers x module types heatmap every this many logs; None: never.
    """

    every_n_steps: int | None = None
    reference: str = "start"
    histogram_layers: list[int] | None = None
    threshold: float = 1e-6
    bins: int = 50
    snapshot_dtype: str = "float32"
    names: list[str] | None = None
    image_every: int | None = 1

    def problems(self, prefix: str = "delta") -> list[str]:
        """The monitor's own argument checks (``monitor_problems``: a reference file must exist), under this
        section's keys; nothing when it is off."""
        if self.every_n_steps is None:
            return []
        from lowrank_recipes.callbacks.module_delta import monitor_problems

        key = f"{prefix}.every_n_steps"
        problems = check(is_int(self.every_n_steps, 1), key, self.every_n_steps, "null (off) or an integer >= 1")
        return problems or monitor_problems(**dataclasses.asdict(self), prefix=f"{prefix}.")

    def callback(self) -> ModuleDeltaMonitor:
        """The monitor (its module imports Lightning: imported here, lazily)."""
        from lowrank_recipes.callbacks.module_delta import ModuleDeltaMonitor

        return ModuleDeltaMonitor(**dataclasses.asdict(self))
