"""lowrank: low-rank gradient projection optimizers in plain PyTorch (no Lightning import).

Entry points: :func:`build_optimizer` (model + config -> optimizer, with its group table as ``.group_table``),
:class:`LowRankOptimizer` (the update rule is in its module docstring), :class:`RefreshSchedule` (when bases refresh),
:class:`LowRankOptions` (every group option and its default), ``SELECTORS`` (subspace rules),
:func:`subspace_overlap`, :func:`module_types` (unique module type labels), :func:`resolve_seed` (the draws' run
seed), :func:`estimate_memory` (training memory by component and its modelled peak, from shapes); POET
(W = R W0 P): :func:`apply_poet`, :class:`PoetConfig`, :func:`merge_due`, :func:`merge_poet`, :class:`POETLinear`;
:func:`select_trainable` (train only chosen modules: presets such as ``sfn_oproj``, or patterns).
"""

from lowrank.bases import BASES, BaseSpec, register_base
from lowrank.compact_adamw import CompactAdamW
from lowrank.config import DEFAULT_TARGETS, STATE_PRECISIONS, LowRankConfig, OptimizerConfig, optimizer_config_from_dict
from lowrank.factory import GROUP_NAMES, GroupTable, TableRow, build_optimizer
from lowrank.memory import MemoryEstimate, ModelShape, OptimizerShape, TrainingShape, estimate_memory
from lowrank.moment_storage import convert_state
from lowrank.moments import MOMENT_POLICIES
from lowrank.names import module_types
from lowrank.optimizer import DueRefresh, LowRankOptimizer, RefreshListener
from lowrank.options import LOWRANK_DEFAULTS, LowRankOptions
from lowrank.poet import PoetConfig, PoetMergeError, apply_poet, merge_due, merge_poet, poet_modules
from lowrank.poet_linear import POETLinear
from lowrank.projector import SIDES, back_project, chance_overlap, project, resolve_side, subspace_overlap
from lowrank.quantization import dequantize_blockwise, quantize_blockwise
from lowrank.randomness import draw_generator, normalize_param_name, resolve_seed
from lowrank.records import RefreshRecord
from lowrank.sampling import importance_indices
from lowrank.schedule import RefreshSchedule
from lowrank.selectors import SELECTORS, SubspaceSelector, make_selector, register_selector, selector_fields
from lowrank.trainable import TRAINABLE_PRESETS, TrainableSelection, select_trainable

__all__ = [
    "TRAINABLE_PRESETS",
    "TrainableSelection",
    "select_trainable",
    "BASES",
    "BaseSpec",
    "DueRefresh",
    "LowRankOptions",
    "RefreshListener",
    "RefreshSchedule",
    "selector_fields",
    "CompactAdamW",
    "STATE_PRECISIONS",
    "convert_state",
    "dequantize_blockwise",
    "quantize_blockwise",
    "DEFAULT_TARGETS",
    "GROUP_NAMES",
    "GroupTable",
    "LOWRANK_DEFAULTS",
    "LowRankConfig",
    "LowRankOptimizer",
    "MemoryEstimate",
    "ModelShape",
    "OptimizerShape",
    "TrainingShape",
    "estimate_memory",
    "MOMENT_POLICIES",
    "OptimizerConfig",
    "POETLinear",
    "PoetConfig",
    "PoetMergeError",
    "apply_poet",
    "merge_due",
    "merge_poet",
    "poet_modules",
    "RefreshRecord",
    "SELECTORS",
    "SIDES",
    "SubspaceSelector",
    "TableRow",
    "back_project",
    "build_optimizer",
    "chance_overlap",
    "draw_generator",
    "importance_indices",
    "make_selector",
    "module_types",
    "normalize_param_name",
    "optimizer_config_from_dict",
    "project",
    "register_base",
    "register_selector",
    "resolve_seed",
    "resolve_side",
    "subspace_overlap",
]
