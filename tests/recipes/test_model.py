"""Tests of the LLaMA model: sizes on the meta device, causality, shapes, training, checkpointing."""

from __future__ import annotations

import pytest
import torch

from lowrank_recipes.recipes.model import (
    PRESET_NAMES,
    Llama,
    LlamaConfig,
    causal_lm_loss,
    count_parameters,
    llama_preset,
)

# docs/reference.md: untied head, vocab 32000, norms included, no biases.
PAPER_COUNTS = {"60m": 58.1e6, "130m": 134.1e6, "350m": 368.0e6, "1b": 1339.1e6, "7b": 6738.4e6}


def tiny_config(**overrides: object) -> LlamaConfig:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_heads=4, num_layers=2, max_seq_len=16)
    base.update(overrides)
    return LlamaConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_parameter_counts_match_paper(name: str) -> None:
    count = count_parameters(llama_preset(name))
    assert abs(count - PAPER_COUNTS[name]) / PAPER_COUNTS[name] < 0.01


def test_parameter_names_follow_hf_layout() -> None:
    with torch.device("meta"):
        names = {n for n, _ in Llama(tiny_config(num_layers=1)).named_parameters()}
    expected = {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    expected |= {f"layers.0.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    expected |= {f"layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    expected |= {"layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight"}
    assert names == expected


def test_count_parameters_matches_formula() -> None:
    c = tiny_config()
    per_layer = 4 * c.hidden_size**2 + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    expected = 2 * c.vocab_size * c.hidden_size + c.num_layers * per_layer + c.hidden_size
    assert count_parameters(c) == expected


def test_output_shape() -> None:
    torch.manual_seed(0)
    model = Llama(tiny_config())
    logits = model(torch.randint(0, 97, (3, 11)))
    assert logits.shape == (3, 11, 97)


def test_causal_masking() -> None:
    torch.manual_seed(0)
    model = Llama(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 97
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_loss_decreases_under_adamw() -> None:
    torch.manual_seed(0)
    model = Llama(tiny_config())
    batch = torch.randint(0, 97, (4, 13))
    inputs, labels = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = causal_lm_loss(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(97.0)).item(), rel=0.05)  # init ~ uniform
    assert losses[-1] < 0.8 * losses[0]


def test_activation_checkpointing_same_loss_and_grads() -> None:
    torch.manual_seed(0)
    plain = Llama(tiny_config())
    ckpt = Llama(tiny_config(activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    batch = torch.randint(0, 97, (2, 13))
    results = []
    for model in (plain, ckpt):
        loss = causal_lm_loss(model(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-6, atol=1e-7)


def test_meta_model_materialises_with_init_weights() -> None:
    with torch.device("meta"):
        model = Llama(tiny_config())
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.all(model.norm.weight == 1)
    assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long))).all()
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_input_longer_than_max_seq_len_raises() -> None:
    with pytest.raises(ValueError, match="max_seq_len=16"):
        Llama(tiny_config())(torch.zeros(1, 17, dtype=torch.long))


def test_config_validation_names_keys() -> None:
    with pytest.raises(ValueError, match="divisible by num_heads"):
        tiny_config(num_heads=5)
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        tiny_config(vocab_size=0)
    with pytest.raises(ValueError, match=r"accepted values: \['60m'"):
        llama_preset("3b")
    with pytest.raises(ValueError, match="unknown LlamaConfig override"):
        llama_preset("60m", hidden=3)
    assert llama_preset("60M", vocab_size=4096).vocab_size == 4096


def test_rope_rotates_pairs_by_position() -> None:
    from lowrank_recipes.recipes.model import apply_rope, rope_cos_sin, rope_inv_freq

    # D = 4: pairs (0, 2) and (1, 3) rotate by angles p * theta^0 and p * theta^(-1/2).
    cos, sin = rope_cos_sin(rope_inv_freq(4, 100.0), 3)
    x = torch.tensor([1.0, 0.0, 0.0, 1.0]).expand(1, 1, 3, 4)
    y = apply_rope(x, cos, sin)[0, 0]
    for p in range(3):
        a, b = p * 1.0, p * 0.1
        expected = torch.tensor(
            [
                torch.cos(torch.tensor(a)),
                -torch.sin(torch.tensor(b)),
                torch.sin(torch.tensor(a)),
                torch.cos(torch.tensor(b)),
            ]
        )
        torch.testing.assert_close(y[p], expected)
    # Rotations keep norms.
    torch.testing.assert_close(y.norm(dim=-1), x[0, 0].norm(dim=-1))


def test_bf16_model_runs_with_float32_rope() -> None:
    torch.manual_seed(0)
    model = Llama(tiny_config()).to(torch.bfloat16)
    logits = model(torch.randint(0, 97, (2, 16)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
