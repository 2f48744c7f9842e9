"""What a parameter's name says: its module type and its layer (its label, and its index in the decoder blocks).
The one rule every consumer uses (the overlap monitor's tags and heatmap, the group table, the module diagnostics).

Module type: the module path of the parameter (its name without the last component, wrapper components such as
``_orig_mod`` dropped, :func:`lowrank.normalize_param_name`), without numeric components (layer indices), so that
``layers.0.self_attn.q_proj.weight`` and ``layers.7.self_attn.q_proj.weight`` are one type. Its label is the shortest
dotted suffix of that path that no other type among the names considered shares: the leaf (``q_proj``, ``fc1``)
unless leaves collide, in which case the parent components are added where they do (GPT-2's
``h.0.attn.c_proj.weight`` and ``h.0.mlp.c_proj.weight`` -> ``attn.c_proj`` and ``mlp.c_proj``). Two different
module paths never get the same label, and a label depends only on the set of names, never on their order.
"""

from __future__ import annotations

from collections.abc import Iterable

from lowrank.randomness import normalize_param_name


def _type_path(name: str) -> tuple[str, ...]:
    """``model.layers.3.mlp.up_proj.weight`` -> ``("model", "layers", "mlp", "up_proj")``; ``w`` -> ``("w",)``."""
    parts = normalize_param_name(name).split(".")
    path = parts[:-1] or parts
    return tuple(part for part in path if not part.isdigit()) or tuple(path)


def _label(path: tuple[str, ...], others: set[tuple[str, ...]]) -> str:
    """The shortest suffix of ``path`` that no path in ``others`` ends with (``path`` itself when none is)."""
    for length in range(1, len(path) + 1):
        suffix = path[-length:]
        if all(other[-length:] != suffix for other in others):
            return ".".join(suffix)
    return ".".join(path)


def module_types(names: Iterable[str]) -> dict[str, str]:
    """name -> unique module type label (module docstring) for every name, labels computed over all of them."""
    paths = {name: _type_path(name) for name in names}
    distinct = set(paths.values())
    labels = {path: _label(path, distinct - {path}) for path in distinct}
    return {name: labels[path] for name, path in paths.items()}


def module_type(name: str, all_names: Iterable[str] = ()) -> str:
    """The module type of ``name`` among ``all_names`` (the other parameter names it must be told apart from, e.g.
    every low-rank parameter of the optimizer); with none, the leaf module:
    ``model.layers.3.self_attn.q_proj.weight`` -> ``q_proj``; ``fc1.weight`` -> ``fc1``; ``w`` -> ``w``."""
    return module_types([name, *all_names])[name]


def layer_label(name: str) -> str:
    """The layer a weight belongs to: the name up to its last numeric component before the module
    (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``), else its parent path, else ``model``."""
    parts = normalize_param_name(name).split(".")[:-2]
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    if numeric:
        parts = parts[: numeric[-1] + 1]
    return ".".join(parts) or "model"


def layer_index(name: str) -> int | None:
    """The decoder block of a parameter (``layers.3.mlp.up_proj.weight`` -> 3): the last component of
    :func:`layer_label` when numeric; None outside the blocks (``embed_tokens.weight``, ``norm.weight``)."""
    last = layer_label(name).rsplit(".", 1)[-1]
    return int(last) if last.isdigit() else None


def lowrank_param_names(param_groups: Iterable[dict]) -> list[str]:
    """The names (``param_names``) of the parameters of every low-rank group (one that sets ``rank``), in order: the
    names a module type is told apart among."""
    return [name for group in param_groups if group.get("rank") is not None for name in group.get("param_names", [])]
