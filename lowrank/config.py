"""Optimizer configuration: dataclasses that map one-to-one onto the ``optimizer`` section of the YAML configs.

Every default is the reference protocol's (GaLore's released scripts; docs/reference.md) unless it says otherwise.
:func:`optimizer_config_from_dict` builds them from plain mappings (OmegaConf containers included), rejects unknown
keys with the closest accepted one, and :meth:`OptimizerConfig.validate` collects every problem before raising.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from lowrank.bases import BASES
from lowrank.checks import check, is_number, join_accepted, raise_problems
from lowrank.decay import no_decay_problems
from lowrank.options import LowRankOptions, lowrank_problems
from lowrank.poet import PoetConfig
from lowrank.schedule import RefreshSchedule
from lowrank.structured import from_mapping
from lowrank.vocabulary import CONFIG_KEYS, METHOD_NAMES, hint

OPTIMIZER_NAMES: tuple[str, ...] = ("adamw", "lowrank", "poet")
STATE_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "8bit")
PRECISION_BASES: dict[str, str] = {"bf16": "adamw_bf16", "8bit": "adamw8bit"}  # AdamW with compact moments

# Attention and MLP projections of a LLaMA-style decoder; regular expressions searched in parameter names.
DEFAULT_TARGETS: tuple[str, ...] = tuple(rf"\b{kind}_proj\b" for kind in ("q", "k", "v", "o", "gate", "up", "down"))


@dataclasses.dataclass
class LowRankConfig(LowRankOptions):
    """Settings of the low-rank optimizer (``optimizer.lowrank.*``): every :class:`lowrank.LowRankOptions` field
    (rank, alpha, selector, selector_options, side, moment_policy, fira, fira_gamma, seed; documented there), with
    the config's own defaults for two of them, plus what picks the parameters and the base.

    Attributes:
        rank: r, the subspace dimension of every low-rank weight (60M: 128, 130M/350M: 256, 1B: 512, 7B: 1024).
        seed: run seed of the draws (lowrank.randomness). None: Lightning's global seed when
            ``lightning.seed_everything`` set it (``PL_GLOBAL_SEED``), else 0 (``lowrank.randomness.resolve_seed``;
            the group table says which); the recipe fills in its run seed.
        base: base optimizer on the projected gradients: adamw, adam, adafactor (``optimizer.state_precision`` picks
            adamw's bf16 or 8-bit variant, adamw_bf16 / adamw8bit, which may also be named here directly).
        targets: regular expressions (``re.search`` on parameter names); a 2-D parameter matching any goes low-rank.
            Each pattern must match at least one 2-D parameter (an error otherwise: a typo would silently train
            full-rank).
        projected_gradients: backward forms each low-rank ``nn.Linear`` weight's gradient in its projected shape
            (r x n or m x r) and the full one only on refresh steps (:mod:`lowrank.projected`); the training loop turns
            it on (the recipe; Lightning: ``ProjectGradients``; a plain loop: ``enable_projected_gradients``), the
            optimizer itself is the same. Gradient clipping then sees ||R|| <= ||G|| for these weights.
    """

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        **CONFIG_KEYS,  # GaLore's words (lowrank.vocabulary)
        "update_gap": "optimizer.refresh.update_gap (the refresh schedule has its own section)",
        "oversampling": "optimizer.lowrank.selector_options.<rule>.oversampling (e.g. randomized_importance)",
        "power_iters": "optimizer.lowrank.selector_options.<rule>.power_iters (e.g. randomized_importance)",
    }

    rank: int = 128
    seed: int | None = None
    base: str = "adamw"
    targets: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_TARGETS))
    projected_gradients: bool = False

    def options(self) -> dict[str, Any]:
        """The :class:`LowRankOptions` fields but ``rank`` (set on the low-rank group only), as the optimizer's
        group defaults (seed None stays None: the optimizer resolves it, ``lowrank.randomness.resolve_seed``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LowRankOptions) if f.name != "rank"}


@dataclasses.dataclass
class OptimizerConfig:
    """The ``optimizer`` section.

    Attributes:
        name: adamw (full-rank torch AdamW, the baseline), lowrank, or poet (W = R W0 P on the layers
            ``lowrank.targets`` names, after ``lowrank.apply_poet``; the rest trains with AdamW at ``lr``).
        lr: learning rate of the plain group; low-rank weights move by lr * alpha (GaLore: 0.01; AdamW: tune).
        betas: Adam's (beta1, beta2).
        eps: Adam's epsilon; 1e-6 is what the reference runs used (its script never set it, the library default).
        weight_decay: decoupled weight decay (0 in the reference runs, and in every shipped config). It applies to
            the parameters with two or more dimensions (every matrix: projections, embeddings, output head) whose name
            matches no ``no_decay`` pattern; norms and biases (1-D) never decay (``lowrank.decay``). Parameters that do
            not decay sit in groups of their own, ``plain_no_decay`` (and ``lowrank_no_decay``), with weight decay 0.
        no_decay: regular expressions (``re.search`` on parameter names) of further parameters without weight decay,
            e.g. ``["embed_tokens", "lm_head"]`` to exempt the embeddings and the head; each must match at least one
            parameter (an error otherwise: a typo would silently decay).
        state_precision: storage of Adam's moments: fp32 (torch AdamW), bf16, or 8bit (block-wise dynamic
            quantization, lowrank.quantization; tensors under 4096 elements stay fp32). Applies to the low-rank
            moments and the plain group's alike.
        target_lr_scale: ``name: adamw`` only: the weights ``lowrank.targets`` names (the attention and MLP
            matrices by default) step at ``lr * target_lr_scale``, in groups of their own (``targets``,
            ``targets_no_decay``), the rest at ``lr``. 1.0 (the default) is one learning rate for every parameter;
            ``lowrank.alpha`` gives AdamW the two-rate treatment the low-rank runs get (their plain group at lr, their
            matrices moved by lr * alpha), which separates the effect of the subspace from that of the matrices' lr.
            With ``name: lowrank`` it must stay 1.0 (``lowrank.alpha`` scales those weights' updates).
        lowrank: low-rank settings, used when ``name`` is lowrank (``lowrank.targets`` also with ``target_lr_scale``).
        poet: POET settings (block size, merge interval, series terms, the generators' lr, W0's init), used when
            ``name`` is poet (:class:`lowrank.poet.PoetConfig`).
        refresh: when bases refresh (``lowrank.RefreshSchedule``: update_gap, stagger, switch_at, switch_to,
            max_steps, split_across_ranks), used when ``name`` is lowrank. Reference runs: update_gap 200 (7B: 500).
    """

    MOVED_KEYS: ClassVar[dict[str, str]] = dict(CONFIG_KEYS)  # GaLore's words given at the top (lowrank.vocabulary)

    name: str = "lowrank"
    lr: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0
    no_decay: list[str] = dataclasses.field(default_factory=list)
    state_precision: str = "fp32"
    target_lr_scale: float = 1.0
    lowrank: LowRankConfig = dataclasses.field(default_factory=LowRankConfig)
    poet: PoetConfig = dataclasses.field(default_factory=PoetConfig)
    refresh: RefreshSchedule = dataclasses.field(default_factory=RefreshSchedule)

    def base_name(self) -> str:
        """The base optimizer of the low-rank variant, with the state precision applied."""
        if self.state_precision == "fp32" or self.lowrank.base in PRECISION_BASES.values():
            return self.lowrank.base
        return PRECISION_BASES.get(self.state_precision, self.lowrank.base) if self.lowrank.base == "adamw" else ""

    def problems(self, prefix: str = "optimizer") -> list[str]:
        """Every invalid value, each with its key (under ``prefix``) and the accepted values."""
        return _problems(self, prefix)

    def validate(self, prefix: str = "optimizer") -> None:
        """Raises one ValueError listing every invalid value with its key and the accepted values."""
        raise_problems("invalid optimizer configuration", self.problems(prefix))


def _problems(cfg: OptimizerConfig, prefix: str) -> list[str]:
    low, lp = cfg.lowrank, f"{prefix}.lowrank"
    betas_ok = len(cfg.betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in cfg.betas)
    problems = [
        *[
            found + hint(METHOD_NAMES, cfg.name)
            for found in check(cfg.name in OPTIMIZER_NAMES, f"{prefix}.name", cfg.name, join_accepted(OPTIMIZER_NAMES))
        ],
        *check(is_number(cfg.lr) and cfg.lr > 0, f"{prefix}.lr", cfg.lr, "a finite number > 0"),
        *check(betas_ok, f"{prefix}.betas", cfg.betas, "two numbers in [0, 1)"),
        *check(is_number(cfg.eps) and cfg.eps > 0, f"{prefix}.eps", cfg.eps, "a number > 0"),
        *check(
            is_number(cfg.weight_decay) and cfg.weight_decay >= 0,
            f"{prefix}.weight_decay",
            cfg.weight_decay,
            "a number >= 0",
        ),
        *no_decay_problems(cfg.no_decay, f"{prefix}.no_decay"),
        *check(
            cfg.state_precision in STATE_PRECISIONS,
            f"{prefix}.state_precision",
            cfg.state_precision,
            join_accepted(STATE_PRECISIONS),
        ),
        *check(
            is_number(cfg.target_lr_scale) and cfg.target_lr_scale > 0,
            f"{prefix}.target_lr_scale",
            cfg.target_lr_scale,
            "a finite number > 0",
        ),
        *check(
            cfg.name == "adamw" or cfg.target_lr_scale == 1.0,
            f"{prefix}.target_lr_scale",
            cfg.target_lr_scale,
            f"1.0 with {prefix}.name {cfg.name} (the scale is for adamw; lowrank: {lp}.alpha scales the low-rank "
            f"weights' updates; poet: {prefix}.poet.lr is the generators' lr)",
        ),
        *cfg.poet.problems(f"{prefix}.poet"),
        *check(low.base in BASES, f"{lp}.base", low.base, join_accepted(sorted(BASES))),
        *check(len(low.targets) > 0, f"{lp}.targets", low.targets, "a non-empty list of regular expressions"),
    ]
    rotatable = BASES[low.base].rotatable if low.base in BASES else None
    problems += lowrank_problems({**low.options(), "rank": low.rank}, lp, rotatable)
    if low.rank is None:
        problems.append(f"{lp}.rank: invalid value None; accepted: an integer >= 1")
    problems += cfg.refresh.problems(f"{prefix}.refresh")
    if cfg.state_precision in PRECISION_BASES and low.base in BASES and not cfg.base_name():
        problems.append(
            f"{prefix}.state_precision: {cfg.state_precision!r} is available with {lp}.base adamw, not {low.base!r}; "
            "accepted with this base: fp32"
        )
    return problems


def optimizer_config_from_dict(data: Mapping[str, Any] | OptimizerConfig, prefix: str = "optimizer") -> OptimizerConfig:
    """An :class:`OptimizerConfig` from a (possibly nested, possibly OmegaConf) mapping, validated."""
    if isinstance(data, OptimizerConfig):
        config = data
    else:  # plain dicts and OmegaConf containers alike (both are Mappings)
        config = from_mapping(OptimizerConfig, data, prefix)
    config.validate(prefix)
    return config
