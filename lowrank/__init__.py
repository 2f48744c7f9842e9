"""lowrank: low-rank gradient projection optimizers in plain PyTorch (no Lightning import).

Entry points: :func:`build_optimizer` (model + config -> optimizer and group table), :class:`LowRankOptimizer`
(the update rule is in its module docstring), ``SELECTORS`` (subspace rules), :func:`subspace_overlap`.
"""

from lowrank.bases import BASES, BaseSpec, register_base
from lowrank.compact_adamw import CompactAdamW
from lowrank.config import STATE_PRECISIONS, DEFAULT_TARGETS, LowRankConfig, OptimizerConfig, optimizer_config_from_dict
from lowrank.factory import GroupTable, TableRow, build_optimizer
from lowrank.moment_storage import convert_state
from lowrank.moments import MOMENT_POLICIES
from lowrank.optimizer import LOWRANK_DEFAULTS, LowRankOptimizer
from lowrank.quantization import dequantize_blockwise, quantize_blockwise
from lowrank.projector import SIDES, back_project, chance_overlap, project, resolve_side, subspace_overlap
from lowrank.randomness import draw_generator, normalize_param_name
from lowrank.records import RefreshRecord
from lowrank.sampling import importance_indices
from lowrank.selectors import SELECTORS, SubspaceSelector, make_selector, register_selector

__all__ = [
    "BASES", "BaseSpec", "CompactAdamW", "STATE_PRECISIONS", "convert_state", "dequantize_blockwise",
    "quantize_blockwise", "DEFAULT_TARGETS", "GroupTable", "LOWRANK_DEFAULTS", "LowRankConfig", "LowRankOptimizer",
    "MOMENT_POLICIES", "OptimizerConfig", "RefreshRecord", "SELECTORS", "SIDES", "SubspaceSelector", "TableRow",
    "back_project", "build_optimizer", "chance_overlap", "draw_generator", "importance_indices", "make_selector",
    "normalize_param_name", "optimizer_config_from_dict", "project", "register_base", "register_selector",
    "resolve_side", "subspace_overlap",
]
