"""``model.trainable`` in the library: presets select what they say, frozen tensors stay bit-identical with no gradient
and no optimizer state (AdamW and the low-rank optimizer), low-rank targets are matched among the trainable ones, the
group table counts exactly, and mistakes freeze nothing."""

from __future__ import annotations

import pytest
import torch

from lowrank import build_optimizer
from lowrank.poet import PoetConfig, apply_poet
from lowrank.trainable import select_trainable
from lowrank_recipes.recipes.model import Llama, LlamaConfig

TARGETS = [r"\b(q|k|v|o)_proj\b", r"\b(gate|up|down)_proj\b"]


def _llama() -> Llama:
    torch.manual_seed(0)
    return Llama(
        LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_heads=2, num_layers=2, max_seq_len=8)
    )


def _by_hand(kinds: tuple[str, ...]) -> set[str]:
    """The names a preset must select in the 2-layer model, listed independently of the code."""
    names = {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    for i in range(2):
        names |= {f"layers.{i}.input_layernorm.weight", f"layers.{i}.post_attention_layernorm.weight"}
        names |= {f"layers.{i}.{'self_attn' if k in 'qkvo' else 'mlp'}.{k}_proj.weight" for k in kinds}
    return names


@pytest.mark.parametrize(
    ("entries", "kinds"),
    [
        (["sfn_oproj"], ("o",)),
        (["attention"], ("q", "k", "v", "o")),
        (["mlp"], ("gate", "up", "down")),
        ([r"\bo_proj\b", "companions"], ("o",)),
        (["companions"], ()),
    ],
)
def test_presets_select_the_module_types_and_their_companions(entries: list[str], kinds: tuple[str, ...]) -> None:
    model = _llama()
    selection = select_trainable(model, entries)
    expected = _by_hand(kinds)
    assert set(selection.trainable) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert set(selection.frozen) == {n for n, _ in model.named_parameters()} - expected


def test_presets_may_overlap() -> None:
    model = _llama()
    assert set(select_trainable(model, ["sfn_oproj", "attention"]).trainable) == _by_hand(("q", "k", "v", "o"))


def test_a_pattern_without_companions_selects_only_what_it_matches() -> None:
    model = _llama()
    selection = select_trainable(model, [r"layers\.1\.mlp\.down_proj"])
    assert selection.trainable == ("layers.1.mlp.down_proj.weight",)


def _train(model: Llama, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for step in range(steps):
        tokens = torch.randint(0, 40, (3, 8), generator=torch.Generator().manual_seed(step))
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name, param in model.named_parameters():
            assert (param.grad is None) == (not param.requires_grad), name
        optimizer.step()


@pytest.mark.parametrize("name", ["adamw", "lowrank"])
@pytest.mark.parametrize("precision", ["fp32", "8bit"])
def test_frozen_tensors_stay_bit_identical_without_gradient_or_state(name: str, precision: str) -> None:
    model = _llama()
    select_trainable(model, ["sfn_oproj"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = {
        "name": name,
        "lr": 0.01,
        "state_precision": precision,
        "lowrank": {"rank": 4, "targets": TARGETS, "seed": 1},
        "refresh": {"update_gap": 2},
    }
    optimizer = build_optimizer(model, config)
    _train(model, optimizer, 5)  # refreshes at steps 0, 2, 4 for the low-rank run
    trainable = _by_hand(("o",))
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), n  # it trained
            assert id(p) in held
        else:
            assert torch.equal(p, before[n]), n  # bit-identical
            assert p.grad is None and id(p) not in held and p not in optimizer.state, n
    table = optimizer.group_table
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    assert table.trainable_elements == sum(sizes[n] for n in trainable)
    assert table.frozen_elements == sum(sizes.values()) - sum(sizes[n] for n in trainable)
    assert f"frozen (no gradient, no optimizer state): {table.frozen_elements:,} elements in 12 tensors" in str(table)
    if name == "lowrank":  # the low-rank group holds exactly the trainable targets: the two o_proj weights
        lowrank = [g for g in optimizer.param_groups if g.get("rank") is not None]
        assert [n for g in lowrank for n in g["param_names"]] == [
            "layers.0.self_attn.o_proj.weight",
            "layers.1.self_attn.o_proj.weight",
        ]
        # the MLP pattern matched only frozen weights: listed, not an error
        assert table.frozen_targets == (r"\b(gate|up|down)_proj\b",)
        assert r"low-rank targets matching only frozen parameters: ['\\b(gate|up|down)_proj\\b']" in str(table)


def test_a_target_that_matches_nothing_at_all_is_still_an_error() -> None:
    model = _llama()
    select_trainable(model, ["sfn_oproj"])
    with pytest.raises(ValueError, match=r"optimizer.lowrank.targets: pattern\(s\) \['x_proj'\] match no 2-D"):
        build_optimizer(model, {"name": "lowrank", "lowrank": {"rank": 2, "targets": ["o_proj", "x_proj"]}})


def test_poet_generators_are_selected_by_their_layer_and_w0_stays_frozen() -> None:
    model = _llama()
    apply_poet(model, PoetConfig(block_size=4), TARGETS, seed=0)
    selection = select_trainable(model, ["sfn_oproj"])
    generators = {n for n in selection.trainable if n.endswith(("q_out", "q_in"))}
    assert generators == {f"layers.{i}.self_attn.o_proj.{q}" for i in range(2) for q in ("q_out", "q_in")}
    assert all(n in selection.frozen for n, _ in model.named_parameters() if n.endswith("weight0"))
    optimizer = build_optimizer(model, {"name": "poet", "poet": {"block_size": 4}})
    poet = next(g for g in optimizer.param_groups if g["name"] == "poet")
    assert set(poet["param_names"]) == generators


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["x_proj"], r"model.trainable: pattern\(s\) \['x_proj'\] match no parameter; parameter names look like: "),
        (["("], r"model.trainable: '\(' is not a regular expression"),
        ([], r"model.trainable: invalid value \[\]; accepted: null \(everything trains\) or a non-empty list"),
        ("sfn_oproj", r"model.trainable: invalid value 'sfn_oproj'; accepted: null"),
    ],
)
def test_mistakes_are_refused_and_freeze_nothing(entries: object, message: str) -> None:
    model = _llama()
    with pytest.raises(ValueError, match=message):
        select_trainable(model, entries)  # type: ignore[arg-type]
    assert all(p.requires_grad for p in model.parameters())
