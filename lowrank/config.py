"""Optimizer configuration: dataclasses that map one-to-one onto the ``optimizer`` section of the YAML configs.

Every default is the reference protocol's (GaLore's released scripts, DESIGN.md section 2) unless it says otherwise.
:func:`optimizer_config_from_dict` builds them from plain mappings (OmegaConf containers included), rejects unknown
keys with the closest accepted one, and :meth:`OptimizerConfig.validate` collects every problem before raising.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lowrank.bases import BASES
from lowrank.moments import MOMENT_POLICIES
from lowrank.projector import SIDES
from lowrank.selectors import SELECTORS
from lowrank.structured import from_mapping

OPTIMIZER_NAMES: tuple[str, ...] = ("adamw", "lowrank")
STATE_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "8bit")
PRECISION_BASES: dict[str, str] = {"bf16": "adamw_bf16", "8bit": "adamw8bit"}  # AdamW with compact moments

# Attention and MLP projections of a LLaMA-style decoder; regular expressions searched in parameter names.
DEFAULT_TARGETS: tuple[str, ...] = tuple(
    rf"\b{kind}_proj\b" for kind in ("q", "k", "v", "o", "gate", "up", "down")
)


@dataclasses.dataclass
class LowRankConfig:
    """Settings of the low-rank optimizer (``optimizer.lowrank.*``).

    Attributes:
        rank: r, the subspace dimension of every low-rank weight (60M: 128, 130M/350M: 256, 1B: 512, 7B: 1024).
        alpha: scale of the back-projected update (GaLore's ``scale``); the plain group gets the full lr.
        selector: subspace rule: dominant (GaLore), importance (SARA, this project's default), random (GoLore),
            randomized_dominant, randomized_importance.
        update_gap: T, optimizer steps between refreshes (200; 7B: 500).
        side: projection side: auto (GaLore's rule), left, right (FSDP2 needs right).
        moment_policy: what the base's moments do when the basis changes: keep (GaLore), rotate, reset.
        fira: add Fira's full-rank residual.
        fira_gamma: Fira's norm-growth limit.
        oversampling: k - r for the randomized selectors (they see only the top k = r + oversampling directions).
        power_iters: subspace iterations of the randomized range finder.
        base: base optimizer on the projected gradients: adamw, adam, adafactor (``optimizer.state_precision`` picks
            adamw's bf16 or 8-bit variant, adamw_bf16 / adamw8bit, which may also be named here directly).
        targets: regular expressions (``re.search`` on parameter names); a 2-D parameter matching any goes low-rank.
            Each pattern must match at least one 2-D parameter (an error otherwise: a typo would silently train
            full-rank).
        seed: run seed of the draws (lowrank.randomness); None means 0 here, and the recipe fills in its run seed.
    """

    rank: int = 128
    alpha: float = 0.25
    selector: str = "importance"
    update_gap: int = 200
    side: str = "auto"
    moment_policy: str = "keep"
    fira: bool = False
    fira_gamma: float = 1.01
    oversampling: int = 16
    power_iters: int = 2
    base: str = "adamw"
    targets: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_TARGETS))
    seed: int | None = None


@dataclasses.dataclass
class OptimizerConfig:
    """The ``optimizer`` section.

    Attributes:
        name: adamw (full-rank torch AdamW, the baseline) or lowrank.
        lr: learning rate of the plain group; low-rank weights move by lr * alpha (GaLore: 0.01; AdamW: tune).
        betas: Adam's (beta1, beta2).
        eps: Adam's epsilon; 1e-6 is what the reference runs used (its script never set it, the library default).
        weight_decay: decoupled weight decay (0 in the reference runs).
        state_precision: storage of Adam's moments: fp32 (torch AdamW), bf16, or 8bit (block-wise dynamic
            quantization, lowrank.quantization; tensors under 4096 elements stay fp32). Applies to the low-rank
            moments and the plain group's alike.
        lowrank: low-rank settings, used when ``name`` is lowrank.
    """

    name: str = "lowrank"
    lr: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0
    state_precision: str = "fp32"
    lowrank: LowRankConfig = dataclasses.field(default_factory=LowRankConfig)

    def base_name(self) -> str:
        """The base optimizer of the low-rank variant, with the state precision applied."""
        if self.state_precision == "fp32" or self.lowrank.base in PRECISION_BASES.values():
            return self.lowrank.base
        return PRECISION_BASES.get(self.state_precision, self.lowrank.base) if self.lowrank.base == "adamw" else ""

    def validate(self, prefix: str = "optimizer") -> None:
        """Raises one ValueError listing every invalid value with its key and the accepted values."""
        problems = _problems(self, prefix)
        if problems:
            raise ValueError("invalid optimizer configuration: " + "; ".join(problems))


def _int_at_least(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _problems(cfg: OptimizerConfig, prefix: str) -> list[str]:
    low = cfg.lowrank
    lp = f"{prefix}.lowrank"
    checks = [
        (cfg.name in OPTIMIZER_NAMES, f"{prefix}.name", cfg.name, " | ".join(OPTIMIZER_NAMES)),
        (isinstance(cfg.lr, (int, float)) and cfg.lr > 0, f"{prefix}.lr", cfg.lr, "a number > 0"),
        (
            len(cfg.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.betas),
            f"{prefix}.betas", cfg.betas, "two numbers in [0, 1)",
        ),
        (isinstance(cfg.eps, (int, float)) and cfg.eps > 0, f"{prefix}.eps", cfg.eps, "a number > 0"),
        (cfg.weight_decay >= 0, f"{prefix}.weight_decay", cfg.weight_decay, "a number >= 0"),
        (_int_at_least(low.rank, 1), f"{lp}.rank", low.rank, "an integer >= 1"),
        (isinstance(low.alpha, (int, float)) and low.alpha > 0, f"{lp}.alpha", low.alpha, "a number > 0"),
        (low.selector in SELECTORS, f"{lp}.selector", low.selector, " | ".join(sorted(SELECTORS))),
        (_int_at_least(low.update_gap, 1), f"{lp}.update_gap", low.update_gap, "an integer >= 1"),
        (low.side in SIDES, f"{lp}.side", low.side, " | ".join(SIDES)),
        (low.moment_policy in MOMENT_POLICIES, f"{lp}.moment_policy", low.moment_policy, " | ".join(MOMENT_POLICIES)),
        (isinstance(low.fira, bool), f"{lp}.fira", low.fira, "true | false"),
        (low.fira_gamma > 1, f"{lp}.fira_gamma", low.fira_gamma, "a number > 1"),
        (_int_at_least(low.oversampling, 0), f"{lp}.oversampling", low.oversampling, "an integer >= 0"),
        (_int_at_least(low.power_iters, 0), f"{lp}.power_iters", low.power_iters, "an integer >= 0"),
        (low.base in BASES, f"{lp}.base", low.base, " | ".join(sorted(BASES))),
        (cfg.state_precision in STATE_PRECISIONS, f"{prefix}.state_precision", cfg.state_precision, " | ".join(STATE_PRECISIONS)),
        (len(low.targets) > 0, f"{lp}.targets", low.targets, "a non-empty list of regular expressions"),
    ]
    problems = [f"{key}: invalid value {value!r}; accepted: {accepted}" for ok, key, value, accepted in checks if not ok]
    if cfg.state_precision in PRECISION_BASES and low.base in BASES and not cfg.base_name():
        problems.append(
            f"{prefix}.state_precision: {cfg.state_precision!r} is available with {lp}.base adamw, not {low.base!r}; "
            "accepted with this base: fp32"
        )
    if low.moment_policy == "rotate" and low.base in BASES and not BASES[low.base].rotatable:
        problems.append(f"{lp}.moment_policy: 'rotate' is not available with base {low.base!r}; accepted: keep | reset")
    return problems


def optimizer_config_from_dict(data: Mapping[str, Any] | OptimizerConfig, prefix: str = "optimizer") -> OptimizerConfig:
    """An :class:`OptimizerConfig` from a (possibly nested, possibly OmegaConf) mapping, validated."""
    if isinstance(data, OptimizerConfig):
        config = data
    else:  # plain dicts and OmegaConf containers alike (both are Mappings)
        config = from_mapping(OptimizerConfig, data, prefix)
    config.validate(prefix)
    return config
