"""Module surgery on LLaMA state dicts against independent oracles: merges copy exactly the chosen tensors, a zeroed
module contributes nothing (hooked on a real forward), re-initialisation follows the randomness rule, and removing
blocks equals a hand-written forward that skips them."""

from __future__ import annotations

import pytest
import torch

from lowrank.module_surgery import (
    architecture_problems,
    destroy,
    destroy_names,
    layer_index,
    merge_modules,
    names_by_module_type,
    remove_layers,
    select,
)
from lowrank.randomness import draw_generator
from lowrank_recipes.recipes.model import Llama, LlamaConfig, rope_cos_sin, rope_inv_freq

LAYERS = 4
LEAVES = (
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _config(**changes: int) -> LlamaConfig:
    base = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_heads=2, num_layers=LAYERS, max_seq_len=12)
    return LlamaConfig(**{**base, **changes})


def _state(seed: int, **changes: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = Llama(_config(**changes))
    with torch.no_grad():  # norms away from 1, so that zeroing or copying them is visible
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.rand_like(p))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(seed))


def test_layer_index_follows_the_layer_label() -> None:
    assert layer_index("layers.3.mlp.up_proj.weight") == 3
    assert layer_index("layers.12.input_layernorm.weight") == 12
    assert layer_index("embed_tokens.weight") is None and layer_index("norm.weight") is None
    assert layer_index("lm_head.weight") is None


def test_select_matches_patterns_within_the_layer_range() -> None:
    names = list(_state(0))
    got = select(names, [r"o_proj", r"mlp\.up_proj"], range(1, 3))
    expected = [f"layers.{i}.{leaf}.weight" for i in (1, 2) for leaf in ("self_attn.o_proj", "mlp.up_proj")]
    assert got == expected
    assert select(names, ["lm_head", "embed"]) == ["embed_tokens.weight", "lm_head.weight"]  # the order of names
    every_q = select(names, ["q_proj"])
    assert every_q == [f"layers.{i}.self_attn.q_proj.weight" for i in range(LAYERS)]


def test_merge_copies_exactly_the_selected_tensors_and_keeps_the_rest_bit_identical() -> None:
    a, b = _state(0), _state(1)
    merged, copied = merge_modules(a, b, ["down_proj", "o_proj"], range(1, 3))
    expected = {f"layers.{i}.{leaf}.weight" for i in (1, 2) for leaf in ("mlp.down_proj", "self_attn.o_proj")}
    assert set(copied) == expected and len(copied) == 4
    assert list(merged) == list(a)
    for key in a:
        if key in expected:
            assert torch.equal(merged[key], b[key]) and not torch.equal(merged[key], a[key])
            assert merged[key].data_ptr() != b[key].data_ptr()  # a copy: B stays independent
        else:
            assert torch.equal(merged[key], a[key])
    b["layers.1.mlp.down_proj.weight"].zero_()
    assert merged["layers.1.mlp.down_proj.weight"].abs().sum() > 0


def test_merge_refuses_mismatched_shapes_and_missing_keys() -> None:
    a, wide = _state(0), _state(1, intermediate_size=32)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj\.weight: shape \(16, 24\) in A, \(16, 32\) in B"):
        merge_modules(a, wide, ["down_proj"], range(0, 1))
    shallow = _state(1, num_layers=2)
    with pytest.raises(ValueError, match=r"layers\.3\.mlp\.down_proj\.weight is missing from B"):
        merge_modules(a, shallow, ["down_proj"])
    assert any("layers.2.input_layernorm.weight is in A but not in B" in p for p in architecture_problems(a, shallow))
    assert architecture_problems(a, _state(5)) == []


def test_zeroed_o_proj_makes_that_attention_contribute_nothing() -> None:
    state = _state(0)
    destroyed, names = destroy(state, ["o_proj"], "zero", range(2, 3))
    assert names == ["layers.2.self_attn.o_proj.weight"]
    model = Llama(_config())
    model.load_state_dict(destroyed)
    outputs: dict[int, torch.Tensor] = {}
    hooks = [
        model.layers[i].self_attn.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out))
        for i in range(LAYERS)
    ]
    with torch.no_grad():
        logits = model(_ids())
    for hook in hooks:
        hook.remove()
    assert torch.count_nonzero(outputs[2]) == 0  # the attention's output (its residual contribution) is zero
    assert all(outputs[i].abs().max() > 0 for i in (0, 1, 3))
    intact = Llama(_config())
    intact.load_state_dict(state)
    with torch.no_grad():
        assert not torch.allclose(intact(_ids()), logits)
    for key in state:
        if key != names[0]:
            assert torch.equal(destroyed[key], state[key])


def test_reinit_follows_the_randomness_rule() -> None:
    state = _state(0)
    before = torch.get_rng_state()
    first, names = destroy(state, [r"q_proj", r"up_proj"], "reinit", range(0, 2), seed=3, std=0.05)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is neither read nor advanced
    again, _ = destroy(state, [r"q_proj", r"up_proj"], "reinit", range(0, 2), seed=3, std=0.05)
    other, _ = destroy(state, [r"q_proj", r"up_proj"], "reinit", range(0, 2), seed=4, std=0.05)
    assert len(names) == 4
    for name in names:
        generator = draw_generator(3, 0, name)  # the rule: (run seed, step 0, parameter name)
        oracle = torch.randn(tuple(state[name].shape), generator=generator) * 0.05
        assert torch.equal(first[name], oracle)
        assert torch.equal(first[name], again[name]) and not torch.equal(first[name], other[name])
    q0, q1 = first["layers.0.self_attn.q_proj.weight"], first["layers.1.self_attn.q_proj.weight"]
    assert not torch.equal(q0, q1)  # every name its own draw
    big = {"layers.0.mlp.up_proj.weight": torch.zeros(256, 256)}
    drawn = destroy_names(big, list(big), "reinit", seed=1, std=0.02)["layers.0.mlp.up_proj.weight"]
    assert drawn.std().item() == pytest.approx(0.02, rel=0.02) and abs(drawn.mean().item()) < 5e-4


def test_reinit_keeps_the_dtype() -> None:
    state = {k: v.to(torch.bfloat16) for k, v in _state(0).items()}
    out, names = destroy(state, ["v_proj"], "reinit", seed=0)
    assert all(out[n].dtype == torch.bfloat16 for n in names)


def _skipping_forward(model: Llama, ids: torch.Tensor, skip: set[int]) -> torch.Tensor:
    """The full model's forward with the blocks ``skip`` left out, written out by hand."""
    config = model.config
    cos, sin = rope_cos_sin(rope_inv_freq(config.head_dim, config.rope_theta), ids.shape[1])
    x = model.embed_tokens(ids)
    for i, layer in enumerate(model.layers):
        if i in skip:
            continue
        x = x + layer.self_attn(layer.input_layernorm(x), cos, sin)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.norm(x))


@pytest.mark.parametrize("removed", [[1, 2], [0], [3], [0, 2]])
def test_remove_layers_equals_skipping_those_blocks(removed: list[int]) -> None:
    state = _state(0)
    reduced, count = remove_layers(state, removed, LAYERS)
    assert count == LAYERS - len(removed)
    kept = [i for i in range(LAYERS) if i not in removed]
    for new, old in enumerate(kept):
        for leaf in LEAVES:
            assert reduced[f"layers.{new}.{leaf}.weight"] is state[f"layers.{old}.{leaf}.weight"]
    full = Llama(_config())
    full.load_state_dict(state)
    small = Llama(_config(num_layers=count))
    small.load_state_dict(reduced)  # strict: exactly the keys of a model of `count` blocks
    with torch.no_grad():
        expected = _skipping_forward(full, _ids(1), set(removed))
        assert torch.allclose(small(_ids(1)), expected, atol=1e-6, rtol=1e-5)


def test_remove_layers_accepts_a_range() -> None:
    reduced, count = remove_layers(_state(0), range(1, 4), LAYERS)
    assert count == 1 and sorted({layer_index(k) for k in reduced} - {None}) == [0]


def test_names_by_module_type_uses_the_naming_rule() -> None:
    groups = names_by_module_type(_state(0), range(2, 4))
    assert list(groups) == ["input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "post_attention_layernorm",
                            "gate_proj", "up_proj", "down_proj"]  # fmt: skip
    assert groups["o_proj"] == ["layers.2.self_attn.o_proj.weight", "layers.3.self_attn.o_proj.weight"]


def test_misuse_names_the_argument_and_the_accepted_values() -> None:
    state = _state(0)
    with pytest.raises(ValueError, match=r"pattern 'attn\\\.z_proj' matches no parameter.*q_proj.*layers\.0\."):
        select(state, [r"attn\.z_proj"])
    with pytest.raises(ValueError, match=r"pattern 'embed' matches no parameter within layers 0-1"):
        select(state, ["embed"], range(0, 2))  # the embedding lies outside every block
    with pytest.raises(ValueError, match=r"pattern '\(' is not a regular expression"):
        select(state, ["("])
    with pytest.raises(ValueError, match=r"layers 2-5 reaches outside.*\[4, 5\].*0\.\.3"):
        select(state, ["q_proj"], range(2, 6))
    with pytest.raises(ValueError, match=r"patterns: none given"):
        select(state, [])
    with pytest.raises(ValueError, match=r"how: invalid value 'erase'; accepted: zero \| reinit"):
        destroy(state, ["q_proj"], "erase")
    with pytest.raises(ValueError, match=r"std: invalid value 0; accepted: a finite number > 0"):
        destroy(state, ["q_proj"], "reinit", std=0)
    with pytest.raises(ValueError, match=r"std: invalid value inf; accepted: a finite number > 0"):
        destroy(state, ["q_proj"], "reinit", std=float("inf"))
    with pytest.raises(ValueError, match=r"would remove every one of the 4 layers"):
        remove_layers(state, range(0, 4), LAYERS)
    with pytest.raises(ValueError, match=r"num_layers: 3, but the state holds blocks 0\.\.3.*accepted: 4"):
        remove_layers(state, [0], 3)
    with pytest.raises(ValueError, match=r"layers \[4\] reaches outside"):
        remove_layers(state, [4], LAYERS)
    with pytest.raises(ValueError, match=r"names: \['nope'\] are not keys"):
        destroy_names(state, ["nope"], "zero")
