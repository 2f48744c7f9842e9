"""Module types are unique: modules that share a leaf name (GPT-2's attn.c_proj and mlp.c_proj) get their parent
component; the overlap aggregation and the group table use the same rule."""

from __future__ import annotations

import itertools

import pytest
from torch import nn

from lowrank import build_optimizer
from lowrank.overlap import layer_label, module_type, overlap_metrics


def module_types(names):  # imported when called: the module is new, and each test should fail on its own without it
    from lowrank.names import module_types

    return module_types(names)


def lowrank_param_names(groups):
    from lowrank.names import lowrank_param_names

    return lowrank_param_names(groups)


GPT2 = [
    f"transformer.h.{i}.{module}.weight"
    for i in range(2)
    for module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]
GPT2_TYPES = {"attn.c_attn": "c_attn", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp.c_proj"}
LLAMA = [
    f"model.layers.{i}.{module}.weight"
    for i in range(3)
    for module in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj")
]


def _expected(names: list[str], table: dict[str, str]) -> dict[str, str]:
    """Hand-written oracle: the label of each name from its module path (the part between the layer and .weight)."""
    return {name: table[name.split(".", 3)[3].removesuffix(".weight")] for name in names}


def test_gpt2_leaf_collisions_get_their_parent() -> None:
    assert module_types(GPT2) == _expected(GPT2, GPT2_TYPES)
    assert module_type("transformer.h.0.mlp.c_proj.weight", GPT2) == "mlp.c_proj"
    assert module_type("transformer.h.0.attn.c_proj.weight", GPT2) == "attn.c_proj"
    assert module_type("transformer.h.0.attn.c_proj.weight") == "c_proj"  # alone: nothing to tell apart


def test_llama_keeps_the_leaf_and_wrappers_are_ignored() -> None:
    types = module_types(LLAMA)
    assert {types[n] for n in LLAMA} == {"q_proj", "k_proj", "up_proj", "down_proj"}
    wrapped = [f"_orig_mod.{name}" for name in GPT2]
    assert [module_types(wrapped)[w] for w in wrapped] == [module_types(GPT2)[n] for n in GPT2]


@pytest.mark.parametrize(
    "names,expected",
    [
        # a deeper collision: encoder and decoder share everything below their root
        (
            ["encoder.block.0.attn.q.weight", "decoder.block.0.attn.q.weight", "decoder.block.0.cross.q.weight"],
            ["encoder.block.attn.q", "decoder.block.attn.q", "cross.q"],
        ),
        # a module named like another one's leaf, one level up
        (["c_proj.weight", "attn.c_proj.weight"], ["c_proj", "attn.c_proj"]),
        (["fc1.weight", "fc2.weight", "w"], ["fc1", "fc2", "w"]),
    ],
)
def test_labels_are_unique_and_independent_of_order(names: list[str], expected: list[str]) -> None:
    for order in itertools.permutations(names):
        types = module_types(order)
        assert [types[n] for n in names] == expected
    assert len(set(expected)) == len(expected)


def test_overlap_metrics_keep_colliding_modules_apart() -> None:
    latest = {
        "transformer.h.0.attn.c_proj.weight": (0.9, 0.25),
        "transformer.h.1.attn.c_proj.weight": (0.7, 0.25),
        "transformer.h.0.mlp.c_proj.weight": (0.2, 0.125),
    }
    metrics = overlap_metrics(latest)
    assert metrics["lowrank/overlap/attn.c_proj"] == pytest.approx(0.8)
    assert metrics["lowrank/overlap/mlp.c_proj"] == pytest.approx(0.2)
    assert metrics["lowrank/overlap_chance/mlp.c_proj"] == pytest.approx(0.125)
    assert "lowrank/overlap/c_proj" not in metrics
    # Only the attention weights refreshed so far: with every low-rank name given, the tag is already attn.c_proj
    # (it does not change once the MLP's c_proj is first refreshed).
    first = {k: v for k, v in latest.items() if ".attn." in k}
    assert set(overlap_metrics(first, GPT2)) >= {"lowrank/overlap/attn.c_proj", "lowrank/overlap/mean"}
    assert "lowrank/overlap/c_proj" not in overlap_metrics(first, GPT2)


def test_layer_labels_tell_the_colliding_cells_apart() -> None:
    cells = {(layer_label(n), module_types(GPT2)[n]) for n in GPT2}
    assert len(cells) == len(GPT2)
    assert ("transformer.h.1", "mlp.c_proj") in cells and ("transformer.h.1", "attn.c_proj") in cells


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(8, 24), nn.Linear(8, 8)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(8, 32), nn.Linear(32, 8)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.attn, self.mlp = nn.LayerNorm(8), _Attention(), _MLP()


class TinyGPT2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(20, 8)
        self.h = nn.ModuleList(_Block() for _ in range(2))


def test_group_table_shows_the_module_types() -> None:
    model = TinyGPT2()
    opt = build_optimizer(model, {"name": "lowrank", "lowrank": {"rank": 2, "targets": ["c_attn", "c_proj", "c_fc"]}})
    rows = {row.name: row for row in opt.group_table.rows}
    names = [n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("h.")]
    assert {n: rows[n].module_type for n in names} == {
        n: GPT2_TYPES[n.split(".", 2)[2].removesuffix(".weight")] for n in names
    }
    assert rows["wte.weight"].module_type is None  # plain: no type
    text = str(opt.group_table)
    assert "attn.c_proj" in text and "mlp.c_proj" in text
    assert sorted(lowrank_param_names(opt.param_groups)) == sorted(names)
