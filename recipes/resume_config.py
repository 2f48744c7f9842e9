"""What may change when a run resumes: the resolved config of the checkpoint against the one given now.

Every checkpoint the recipe writes holds the whole resolved config under :data:`CONFIG_KEY` (``RunConfigInCheckpoint``
puts it there). Before the Trainer is built, :func:`check_resume` reads it back cheaply (a single file with
``torch.load(mmap=True, weights_only=True)``, whose tensors are mapped, not read; a sharded directory's small
``meta.pt``; for checkpoints written before the config was stored, the newest ``config*.yaml`` beside the logs), lists
the keys whose values differ and looks each up in :data:`RESUME_RULES`, from the key itself up through its sections
(``optimizer.refresh.update_gap``, then ``optimizer.refresh``, then ``optimizer``). A key listed nowhere is refused.

* refused changes raise one :class:`~lowrank_recipes.recipes.config.ConfigError` naming each key, old -> new, and the
  way forward (keep the value, or start a new run in another ``out_dir``);
* applied changes are printed one line each. Most take effect simply because the Trainer and its callbacks are built
  from the new config; the learning-rate schedule (``optimizer.lr``, ``trainer.max_steps``, ``schedule.*``) is
  rebuilt from it by ``LlamaPretrainModule.on_train_start`` at the restored step, and the selector switch step
  (``ceil(switch_at * max_steps)``) follows the new ``trainer.max_steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

CONFIG_KEY = "run_config"  # where a checkpoint holds its run's resolved config
NOT_COMPARED = ("out_dir", "resume")  # where this start writes and what it resumes: never a change of the run


@dataclass(frozen=True)
class Rule:
    """``apply`` or ``refuse`` a changed value on resume, and what that means (printed with the change)."""

    action: str
    why: str


_LR = Rule("apply", "the learning-rate schedule is rebuilt from the new value at the restored step")
_REFRESH = Rule("apply", "refreshes from here on follow the new schedule")
_DATA = Rule("refuse", "the data order and each loader's saved position depend on it")
_MODEL = Rule("refuse", "the weights in the checkpoint have another shape or meaning")
_STATE = Rule("refuse", "the optimizer state in the checkpoint was built with the old value and would override it")

RESUME_RULES: dict[str, Rule] = {
    # the model: only how it is computed may change
    "model": _MODEL,
    "model.activation_checkpointing": Rule("apply", "recomputes activations in backward; same numbers"),
    "model.compile": Rule("apply", "compiles the decoder blocks (or not); the same state-dict keys and draws"),
    "model.init_from": Rule("apply", "not read on resume: the checkpoint's weights are restored"),
    "model.trainable": Rule(
        "refuse", "the optimizer state holds exactly the trainable parameters, and the frozen ones hold no state"
    ),
    "optimizer.lowrank.projected_gradients": Rule(
        "apply", "backward forms the projected gradients from here on (or no longer); same numbers, same checkpoints"
    ),
    "delta": Rule("apply", "monitoring only; a monitor switched on now takes this start as its reference"),
    "delta.names": Rule("refuse", "the snapshot in the checkpoint holds the parameters the old patterns chose"),
    "delta.reference": Rule("refuse", "the checkpoint holds the snapshot of the old reference"),
    "delta.snapshot_dtype": Rule("refuse", "the checkpoint holds the snapshot in the old dtype"),
    # the data: only validation and caching may change
    "data": _DATA,
    "data.val_sequences": Rule("apply", "validation from here on uses the new number of sequences"),
    "data.cache_dir": Rule("apply", "the tokenizer is read from or rebuilt in the new folder (the same tokenizer)"),
    # the optimizer: the learning rate and the refresh schedule may change; the rest lives in its state
    "optimizer": _STATE,
    "optimizer.lr": _LR,
    "optimizer.state_precision": Rule("apply", "the moments are converted to the new precision when restored"),
    "optimizer.lowrank.selector": Rule(
        "refuse",
        "the selector is part of the optimizer's saved options; to change it from a step on, keep it and set "
        "optimizer.refresh.switch_at / switch_to",
    ),
    "optimizer.refresh": _REFRESH,
    "optimizer.poet.lr": _LR,
    "optimizer.poet.merge_every": Rule("apply", "merges from here on follow the new interval"),
    "optimizer.poet.stagger": Rule("apply", "merges from here on follow the new stagger"),
    "optimizer.poet.max_merge_error": Rule("apply", "merges from here on are checked against the new bound"),
    "optimizer.refresh.max_steps": Rule("apply", "the selector switch step ceil(switch_at * max_steps) is recomputed"),
    "schedule": _LR,
    "monitor": Rule("apply", "monitoring from here on follows the new value"),
    # the trainer: how long, where and how often may change; how a step is computed may not
    "trainer": Rule("apply", "the Trainer is built from the new value"),
    "trainer.max_steps": Rule(
        "apply", "the run's new length; the learning-rate schedule is rebuilt and the selector switch step recomputed"
    ),
    "trainer.global_batch_size": _DATA,
    "trainer.precision": Rule("refuse", "the weights, optimizer state and grad scaler were saved under the old one"),
    "seed": Rule("refuse", "the run's seed drives the data order and the subspace draws"),
}


def rule_for(key: str) -> Rule | None:
    """The rule of a dotted key: its own entry, else its closest listed section; None if unlisted (refused)."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        rule = RESUME_RULES.get(".".join(parts[:end]))
        if rule is not None:
            return rule
    return None


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values (an empty mapping is a leaf)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, float) or isinstance(new, float):
        try:
            return math.isclose(float(old), float(new), rel_tol=1e-12, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return old == new


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any
    rule: Rule | None

    @property
    def refused(self) -> bool:
        return self.rule is None or self.rule.action == "refuse"

    def describe(self) -> str:
        return f"{self.key} {self.old!r} -> {self.new!r}"


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[Change], list[str]]:
    """The changed keys between two resolved configs (``out_dir`` and ``resume`` not compared), and the keys that
    only one of them has (a config written by another version of the recipe)."""
    before, after = flatten(old), flatten(new)
    changes, one_sided = [], []
    for key in sorted(set(before) | set(after)):
        if key.split(".")[0] in NOT_COMPARED:
            continue
        if key not in before or key not in after:
            one_sided.append(key)
            continue
        if not _same(before[key], after[key]):
            changes.append(Change(key, before[key], after[key], rule_for(key)))
    return changes, one_sided


def stored_config(checkpoint: str | Path) -> tuple[dict[str, Any] | None, int | None, str]:
    """(resolved config, global step, where the config came from) of a checkpoint, read without loading its tensors.

    A single file is opened with ``torch.load(mmap=True, weights_only=True)``; a sharded directory's ``meta.pt``
    holds everything but the weights and optimizer state. A checkpoint written before the config was stored falls
    back to the newest ``config*.yaml`` of its run (``<out_dir>/checkpoints/<ckpt>`` -> ``<out_dir>/config*.yaml``).
    """
    path = Path(checkpoint)
    meta = path / "meta.pt" if path.is_dir() else path
    loaded = torch.load(meta, map_location="cpu", mmap=not path.is_dir(), weights_only=True)
    step = loaded.get("global_step")
    if isinstance(loaded.get(CONFIG_KEY), dict):
        return loaded[CONFIG_KEY], step, f"checkpoint {path}"
    configs = sorted(path.resolve().parent.parent.glob("config*.yaml"), key=_config_index)
    if not configs:
        return None, step, ""
    return yaml.safe_load(configs[-1].read_text()), step, f"{configs[-1]} (the checkpoint holds no config)"


def _config_index(path: Path) -> int:
    """config.yaml -> 0, config.3.yaml -> 3 (the recipe numbers the configs of successive starts)."""
    middle = path.name[len("config") : -len(".yaml")].strip(".")
    return int(middle) if middle.isdigit() else 0


def check_resume(checkpoint: str | Path, resolved: dict[str, Any]) -> list[str]:
    """Compares the checkpoint's config with ``resolved``; raises ``ConfigError`` (one paragraph) for refused
    changes, else returns one line per applied change (and one for keys that cannot be compared)."""
    from lowrank_recipes.recipes.config import ConfigError

    old, step, source = stored_config(checkpoint)
    if old is None:
        return [f"resume: {checkpoint} holds no run config and none was found beside it: changes are not checked"]
    changes, one_sided = config_changes(old, resolved)
    if Path(checkpoint).is_dir() and resolved.get("trainer", {}).get("strategy") != "fsdp2":
        changes.append(
            Change(
                "trainer.strategy",
                old.get("trainer", {}).get("strategy"),
                resolved["trainer"]["strategy"],
                Rule("refuse", "a sharded checkpoint (a directory) is read by trainer.strategy=fsdp2 only"),
            )
        )
    refused = [c for c in changes if c.refused]
    at = f" (step {step})" if step is not None else ""
    if refused:
        listed = "; ".join(f"{c.describe()}: {c.rule.why if c.rule else 'not listed as changeable'}" for c in refused)
        raise ConfigError(
            f"resume: the config differs from the one of {source}{at} in keys that cannot change within a run: "
            f"{listed}. Accepted: keep those values (drop the overrides), or start a new run in another out_dir "
            "(out_dir=<new folder>)"
        )
    lines = [f"resume{at}: {c.describe()} applied: {c.rule.why}" for c in changes if c.rule is not None]
    if one_sided:
        lines.append(f"resume{at}: not compared (only in one of the two configs): {', '.join(one_sided)}")
    return lines
