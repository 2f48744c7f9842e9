"""Surgery on a LLaMA-layout state dict: choose modules, copy them from another model, destroy them, remove blocks.

The "stethoscopes" of arXiv 2505.20993 (SfN) ask which modules carry what a model learned, by operating on its
weights offline and evaluating the result. Every function here works on a plain ``{name: tensor}`` mapping keyed like
``Llama.state_dict()`` (``layers.3.mlp.down_proj.weight``); the decoder block of a name (its layer index) is the last
numeric component of :func:`lowrank.names.layer_label` (``layers.3``), None outside the blocks (embedding, final norm,
head). Nothing is modified in place: results are new dicts whose untouched entries are the input's own tensors.

* :func:`select`: the names matched by any of some regular expressions (``re.search``), optionally only inside a
  range of blocks.
* :func:`merge_modules` (Merge): W_A <- W_B on the selected tensors, every other tensor A's. Evaluating the result
  asks how much of B's behaviour those modules carry.
* :func:`destroy` (Destruction): W <- 0 (``zero``: the module's output becomes 0 for a linear without bias, so the
  residual stream skips it), or W ~ N(0, std^2) (``reinit``: the module's initial distribution, drawn from the
  project's randomness rule, :func:`lowrank.randomness.draw_generator` (seed, step 0, name): the same seed gives the
  same weights, every name its own draw, the global RNG is never touched).
* :func:`remove_layers`: drops whole decoder blocks and renumbers the rest consecutively; a pre-norm residual model
  x_{l+1} = x_l + f_l(x_l) then computes exactly the full model with those f_l skipped.

Errors (ValueError) name the argument and the accepted values.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from lowrank.checks import check, is_number, join_accepted
from lowrank.names import layer_index, layer_label, module_types
from lowrank.randomness import draw_generator

DESTROY_MODES: tuple[str, ...] = ("zero", "reinit")
Layers = range | Sequence[int]


def num_layers_of(names: Iterable[str]) -> int:
    """The number of decoder blocks the names span: the largest layer index + 1 (0 without any block)."""
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def _layer_set(layers: Layers, num_layers: int, argument: str = "layers") -> set[int]:
    """The layer indices of ``layers``, each checked to lie in 0 .. num_layers - 1."""
    chosen = list(layers)
    if not chosen:
        raise ValueError(f"{argument}: {_describe(layers)} is empty; accepted: layer indices in 0..{num_layers - 1}")
    outside = sorted({i for i in chosen if not 0 <= i < num_layers})
    if outside:
        raise ValueError(
            f"{argument}: {_describe(layers)} reaches outside the model's layers ({outside} not in "
            f"0..{num_layers - 1}); accepted: layer indices in 0..{num_layers - 1} ({num_layers} layers)"
        )
    return set(chosen)


def _describe(layers: Layers) -> str:
    if isinstance(layers, range) and layers.step == 1:
        return f"layers {layers.start}-{layers.stop - 1}" if len(layers) else f"range({layers.start}, {layers.stop})"
    return f"layers {list(layers)}"


def _examples(names: Sequence[str], count: int = 3) -> str:
    """The module types among ``names`` and a few full names: what a pattern could have matched."""
    types = sorted(set(module_types(names).values()))
    shown = ", ".join(names[:count]) + (", ..." if len(names) > count else "")
    return f"module types {', '.join(types)}; names such as {shown}"


def select(names: Iterable[str], patterns: Sequence[str], layers: Layers | None = None) -> list[str]:
    """The names that any of ``patterns`` (regular expressions, ``re.search``) matches, in the order of ``names``;
    with ``layers``, only names inside those decoder blocks (the embedding, final norm and head are outside every
    block).

    Raises:
        ValueError: no pattern; a pattern that is not a regular expression or matches no name (within ``layers``);
            ``layers`` empty or outside 0 .. num_layers - 1 (num_layers read from the names).
    """
    names = list(names)
    patterns = list(patterns)
    if not patterns:
        raise ValueError(f"patterns: none given; accepted: regular expressions over names ({_examples(names)})")
    candidates = names
    where = ""
    if layers is not None:
        count = num_layers_of(names)
        if count == 0:
            raise ValueError(f"layers: given, but no name lies in a decoder block ({_examples(names)})")
        chosen = _layer_set(layers, count)
        candidates = [name for name in names if layer_index(name) in chosen]
        where = f" within {_describe(layers)}"
    matched: set[str] = set()
    for pattern in patterns:
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"pattern '{pattern}' is not a regular expression ({err})") from None
        hits = {name for name in candidates if compiled.search(name)}
        if not hits:
            raise ValueError(
                f"pattern '{pattern}' matches no parameter{where}; accepted: regular expressions matching "
                f"parameter names ({_examples(candidates or names)})"
            )
        matched |= hits
    return [name for name in names if name in matched]


def architecture_problems(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> list[str]:
    """Keys only in A, only in B, and keys whose shapes differ (naming both shapes): empty when A and B have one
    architecture."""
    problems = [f"{key} is in A but not in B" for key in a if key not in b]
    problems += [f"{key} is in B but not in A" for key in b if key not in a]
    problems += [
        f"{key}: shape {tuple(a[key].shape)} in A, {tuple(b[key].shape)} in B"
        for key in a
        if key in b and a[key].shape != b[key].shape
    ]
    return problems


def merge_modules(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], patterns: Sequence[str], layers: Layers | None = None
) -> tuple[dict[str, Tensor], list[str]]:
    """Merge: A's state with the tensors :func:`select` picks (over A's names) replaced by clones of B's, cast to A's
    dtype. Every other entry is A's own tensor, untouched.

    Returns:
        (merged state in A's key order, the copied names).

    Raises:
        ValueError: as :func:`select`; a selected key missing from B, or of another shape there (both shapes named).
    """
    chosen = select(a, patterns, layers)
    problems = [f"{key} is missing from B" for key in chosen if key not in b]
    problems += [
        f"{key}: shape {tuple(a[key].shape)} in A, {tuple(b[key].shape)} in B"
        for key in chosen
        if key in b and a[key].shape != b[key].shape
    ]
    if problems:
        raise ValueError(
            "merge: the selected tensors do not match between A and B: " + "; ".join(problems) + "; accepted: two "
            "models of the same architecture"
        )
    picked = set(chosen)
    merged = {key: b[key].detach().to(a[key].dtype).clone() if key in picked else a[key] for key in a}
    return merged, chosen


def _check_destroy(how: str, std: float) -> None:
    problems = [
        *check(how in DESTROY_MODES, "how", how, f"{join_accepted(DESTROY_MODES)} (remove: remove_layers)"),
        *check(is_number(std) and std > 0, "std", std, "a finite number > 0"),
    ]
    if problems:
        raise ValueError("; ".join(problems))


def destroy(
    state: Mapping[str, Tensor],
    patterns: Sequence[str],
    how: str,
    layers: Layers | None = None,
    seed: int = 0,
    std: float = 0.02,
) -> tuple[dict[str, Tensor], list[str]]:
    """Destruction of the tensors :func:`select` picks: ``zero`` sets them to 0; ``reinit`` draws each from
    N(0, std^2) with the generator of (``seed``, step 0, its name) (:func:`lowrank.randomness.draw_generator`), in
    float32 then cast to the tensor's dtype. Every other entry is the input's own tensor.

    Returns:
        (new state in the input's key order, the destroyed names).

    Raises:
        ValueError: ``how`` not in :data:`DESTROY_MODES`; ``std`` not > 0; as :func:`select`.
    """
    _check_destroy(how, std)
    chosen = select(state, patterns, layers)
    return destroy_names(state, chosen, how, seed, std), chosen


def destroy_names(
    state: Mapping[str, Tensor], names: Iterable[str], how: str, seed: int = 0, std: float = 0.02
) -> dict[str, Tensor]:
    """:func:`destroy` of exactly the keys ``names`` (no pattern matching): a new state, every other entry the input's
    own tensor.

    Raises:
        ValueError: ``how`` not in :data:`DESTROY_MODES`; ``std`` not > 0; a name that is not a key of ``state``.
    """
    _check_destroy(how, std)
    picked = set(names)
    unknown = sorted(picked - set(state))
    if unknown:
        raise ValueError(f"names: {unknown} are not keys of the state; accepted: its keys ({_examples(list(state))})")
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if key not in picked:
            out[key] = tensor
        elif how == "zero":
            out[key] = torch.zeros_like(tensor, device="cpu")
        else:
            draw = torch.randn(tuple(tensor.shape), generator=draw_generator(seed, 0, key), dtype=torch.float32)
            out[key] = draw.mul_(std).to(tensor.dtype)
    return out


def remove_layers(state: Mapping[str, Tensor], layers: Layers, num_layers: int) -> tuple[dict[str, Tensor], int]:
    """Drops the decoder blocks ``layers`` and renumbers the kept ones consecutively in their order (kept block k_j
    becomes block j), so a model of ``num_layers - len(set(layers))`` blocks loads the result.

    Returns:
        (new state, new number of layers).

    Raises:
        ValueError: ``num_layers`` disagrees with the state's blocks; ``layers`` empty or outside
            0 .. num_layers - 1; every layer removed.
    """
    found = num_layers_of(state)
    if found != num_layers:
        raise ValueError(
            f"num_layers: {num_layers}, but the state holds blocks 0..{found - 1} ({found} layers); accepted: {found}"
        )
    removed = _layer_set(layers, num_layers)
    if len(removed) == num_layers:
        raise ValueError(
            f"layers: {_describe(layers)} would remove every one of the {num_layers} layers; accepted: a range that "
            f"keeps at least one layer of 0..{num_layers - 1}"
        )
    kept = [i for i in range(num_layers) if i not in removed]
    renumber = {old: new for new, old in enumerate(kept)}
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        index = layer_index(key)
        if index is None:
            out[key] = tensor
            continue
        if index in removed:
            continue
        label = layer_label(key)  # "layers.7": the key's block prefix
        if not key.startswith(label + "."):
            raise ValueError(f"remove_layers: key {key!r} does not start with its layer label {label!r}")
        parent = label.rsplit(".", 1)[0] + "." if "." in label else ""
        out[f"{parent}{renumber[index]}{key[len(label) :]}"] = tensor
    return out, len(kept)


def names_by_module_type(names: Iterable[str], layers: Layers | None = None) -> dict[str, list[str]]:
    """The decoder-block names of each module type (:func:`lowrank.names.module_types`, labels over all ``names``),
    optionally only inside ``layers``; types in order of first appearance."""
    names = list(names)
    labels = module_types(names)
    chosen = _layer_set(layers, num_layers_of(names)) if layers is not None else None
    grouped: dict[str, list[str]] = {}
    for name in names:
        index = layer_index(name)
        if index is None or (chosen is not None and index not in chosen):
            continue
        grouped.setdefault(labels[name], []).append(name)
    return grouped
