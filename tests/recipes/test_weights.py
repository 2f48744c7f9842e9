"""Loading a model's weights from every accepted kind of file, against oracles written in the tests: a recipe
checkpoint's own tensors, POET's effective weights from live POETLinear modules (and the POET model's logits), a
Hugging Face layout written by hand, a sharded checkpoint written with torch.distributed.checkpoint; the diagnose
format's round trip; and the errors."""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lowrank.poet import PoetConfig, apply_poet, poet_modules
from lowrank_recipes.recipes.config import load_run_config
from lowrank_recipes.recipes.model import Llama, LlamaConfig
from lowrank_recipes.recipes.trainer import fit
from lowrank_recipes.recipes.weights import (
    ModelWeights,
    WeightsError,
    check_compatible,
    load_model_weights,
    save_model_weights,
)
from tests.lowrank.test_module_surgery import LEAVES  # a decoder block's parameters, in order

from .test_pretrain import TINY

CONFIG = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_heads=2, num_layers=2, max_seq_len=12)


def _state(seed: int = 0, config: LlamaConfig = CONFIG) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in Llama(config).state_dict().items()}


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny recipe run of 4 steps: its checkpoints folder."""
    out = tmp_path_factory.mktemp("weights-run")
    run, resolved = load_run_config(
        "default",
        [
            *TINY,
            "trainer.max_steps=4",
            "trainer.checkpoint_every_n_steps=4",
            f"data.cache_dir={out / 'cache'}",
            f"out_dir={out}",
        ],
    )
    fit(run, resolved)
    return out / "checkpoints"


@pytest.mark.slow
def test_recipe_checkpoint_gives_the_llama_keys_and_tensors(trained: Path) -> None:
    path = trained / "last.ckpt"
    weights = load_model_weights(path)
    raw = torch.load(path, weights_only=True)
    assert weights.kind == "recipe" and weights.run_config == raw["run_config"]
    config = weights.llama_config()
    assert config == LlamaConfig(**raw["run_config"]["model"])
    assert list(weights.state) == list(Llama(config).state_dict())  # exactly Llama's keys, in its order
    for key, tensor in weights.state.items():
        assert torch.equal(tensor, raw["state_dict"]["model." + key])
        assert tensor.device.type == "cpu"
    assert check_compatible(weights.state, config) == []


def test_diagnose_format_round_trip(tmp_path: Path) -> None:
    state = _state(0)
    run_config = {"model": dataclasses.asdict(CONFIG), "data": {"seq_len": 8}}
    provenance = {"command": "merge", "copied": ["layers.0.mlp.down_proj.weight"], "layers": [0, 1]}
    path = tmp_path / "out" / "merged.pt"
    save_model_weights(path, state, run_config, provenance)
    raw = torch.load(path, weights_only=True)  # plain data and tensors only
    assert set(raw) == {"state_dict", "run_config", "diagnose"}
    assert raw["diagnose"] == provenance and raw["run_config"] == run_config
    assert sorted(raw["state_dict"]) == sorted("model." + k for k in state)
    weights = load_model_weights(path)
    assert weights.kind == "weights" and weights.run_config == run_config
    _assert_same(weights.state, state)
    assert weights.llama_config() == CONFIG
    assert sorted(p.name for p in path.parent.iterdir()) == ["merged.pt"]  # no temporary left

    with pytest.raises(FileExistsError, match=r"merged\.pt exists; accepted: a new path, or overwrite=True"):
        save_model_weights(path, _state(1), run_config, provenance)
    _assert_same(load_model_weights(path).state, state)  # untouched
    save_model_weights(path, _state(1), None, provenance, overwrite=True)
    _assert_same(load_model_weights(path).state, _state(1))

    other = tmp_path / "bad.pt"
    with pytest.raises(WeightsError, match=r"provenance\.when: datetime is not plain data"):
        import datetime

        save_model_weights(other, state, None, {"when": datetime.datetime.now()})
    assert not other.exists()


def _poet_model(block: int, terms: int) -> Llama:
    torch.manual_seed(0)
    model = Llama(CONFIG)
    apply_poet(model, PoetConfig(block_size=block, neumann_terms=terms), [r"_proj\.weight$"], seed=5)
    with torch.no_grad():  # trained generators: rotations away from the identity
        for index, (_, layer) in enumerate(poet_modules(model)):
            gen = torch.Generator().manual_seed(index)
            layer.q_out.copy_(0.05 * torch.randn(layer.q_out.shape, generator=gen))
            layer.q_in.copy_(0.05 * torch.randn(layer.q_in.shape, generator=gen))
    return model


def _save_recipe_checkpoint(path: Path, model: torch.nn.Module, run_config: dict | None) -> None:
    checkpoint = {"state_dict": {"model." + k: v for k, v in model.state_dict().items()}, "global_step": 3}
    checkpoint["state_dict"]["val_ppl.total"] = torch.tensor(1.0)  # another entry of the LightningModule: ignored
    if run_config is not None:
        checkpoint["run_config"] = run_config
    torch.save(checkpoint, path)


@pytest.mark.parametrize(("block", "terms"), [(4, 4), (8, 3)])
def test_poet_checkpoint_becomes_its_effective_weights(tmp_path: Path, block: int, terms: int) -> None:
    model = _poet_model(block, terms)
    expected = {f"{name}.weight": layer.effective_weight(torch.float64).float() for name, layer in poet_modules(model)}
    run_config = {
        "model": dataclasses.asdict(CONFIG),
        "optimizer": {"name": "poet", "poet": {"block_size": block, "neumann_terms": terms}},
    }
    path = tmp_path / "poet.ckpt"
    _save_recipe_checkpoint(path, model, run_config)
    weights = load_model_weights(path)
    assert list(weights.state) == list(Llama(CONFIG).state_dict())
    assert len(expected) == 7 * CONFIG.num_layers
    for key, dense in expected.items():
        assert torch.equal(weights.state[key], dense), key
    plain = Llama(CONFIG)
    plain.load_state_dict(weights.state)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the dense model computes what the POET model computes on activations
        torch.testing.assert_close(plain(ids), model(ids), atol=2e-5, rtol=1e-4)


def test_poet_checkpoint_without_settings_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "poet.ckpt"
    _save_recipe_checkpoint(path, _poet_model(4, 4), None)
    with pytest.raises(WeightsError, match=r"poet\.ckpt' hold POET layers .*block_size, neumann_terms"):
        load_model_weights(path)
    wrong = {"optimizer": {"name": "poet", "poet": {"block_size": 8, "neumann_terms": 4}}}
    _save_recipe_checkpoint(path, _poet_model(4, 4), wrong)
    with pytest.raises(WeightsError, match=r"q_out holds generators of 6 entries.*block_size=8"):
        load_model_weights(path)


def _hf_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` under the Hugging Face LlamaForCausalLM names, written out by hand."""
    hf = {"model.embed_tokens.weight": state["embed_tokens.weight"]}
    for i in range(CONFIG.num_layers):
        for leaf in LEAVES:
            hf[f"model.layers.{i}.{leaf}.weight"] = state[f"layers.{i}.{leaf}.weight"]
        hf[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(CONFIG.head_dim // 2)
    hf["model.norm.weight"] = state["norm.weight"]
    hf["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.contiguous() for k, v in hf.items()}


def test_huggingface_safetensors_map_to_the_llama_keys(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = _state(3)
    save_file(_hf_layout(state), str(tmp_path / "model.safetensors"))
    for path in (tmp_path, tmp_path / "model.safetensors"):
        weights = load_model_weights(path)
        assert weights.kind == "huggingface" and weights.run_config is None
        assert sorted(weights.state) == sorted(state)
        for key in state:
            assert torch.equal(weights.state[key], state[key]), key
    with pytest.raises(WeightsError, match=r"num_heads and max_seq_len cannot be read.*--config"):
        weights.llama_config()
    assert weights.llama_config({"num_heads": 2, "max_seq_len": 12, "num_layers": 9}) == CONFIG  # shapes win
    (tmp_path / "config.json").write_text(
        json.dumps({"num_attention_heads": 2, "max_position_embeddings": 12, "rms_norm_eps": 1e-6})
    )
    assert load_model_weights(tmp_path).llama_config() == CONFIG


def test_sharded_huggingface_folder_and_tied_embeddings(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = _state(4)
    hf = _hf_layout(state)
    del hf["lm_head.weight"]
    names = sorted(hf)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    save_file({k: hf[k] for k in first}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: hf[k] for k in second}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {k: "model-00001-of-00002.safetensors" for k in first} | {
        k: "model-00002-of-00002.safetensors" for k in second
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    config = {"num_attention_heads": 2, "max_position_embeddings": 12, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = load_model_weights(tmp_path)
    assert torch.equal(weights.state["lm_head.weight"], state["embed_tokens.weight"])  # tied: the head is the embedding
    assert torch.equal(weights.state["layers.1.mlp.down_proj.weight"], state["layers.1.mlp.down_proj.weight"])
    assert check_compatible(weights.state, weights.llama_config()) == []
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 1}))
    with pytest.raises(WeightsError, match=r"num_key_value_heads=1 differs from num_attention_heads=2"):
        load_model_weights(tmp_path)


def test_missing_safetensors_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(WeightsError, match=r"pip install 'lowrank-recipes\[diagnose\]'"):
        load_model_weights(tmp_path / "model.safetensors")


def _write_sharded(folder: Path, state: dict[str, torch.Tensor], run_config: dict) -> None:
    import torch.distributed.checkpoint as dcp

    payload = {
        "state_dict": {"model." + k: v for k, v in state.items()},
        "optimizer_0": {"state": {0: {"exp_avg": torch.ones(3)}}},
    }
    with warnings.catch_warnings():  # one process, no process group: DCP says so
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(payload, checkpoint_id=str(folder))
    torch.save({"global_step": 7, "run_config": run_config}, folder / "meta.pt")


def test_sharded_checkpoint_directory(tmp_path: Path) -> None:
    state = _state(5)
    run_config = {"model": dataclasses.asdict(CONFIG)}
    folder = tmp_path / "step=000007.ckpt"
    _write_sharded(folder, state, run_config)
    weights = load_model_weights(folder)
    assert weights.kind == "sharded" and weights.run_config == run_config
    assert sorted(weights.state) == sorted(state)
    for key in state:
        assert torch.equal(weights.state[key], state[key]), key
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(WeightsError, match=r"step=000007\.ckpt': incomplete sharded checkpoint \(shard file"):
        load_model_weights(folder)


def test_errors_name_the_path_and_what_is_accepted(tmp_path: Path) -> None:
    accepted = r"accepted: a recipe checkpoint file"
    with pytest.raises(WeightsError, match=rf"'{tmp_path}/nothing' do not exist; {accepted}"):
        load_model_weights(tmp_path / "nothing")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(
        WeightsError, match=rf"notes\.txt' cannot be read: not a complete torch\.save archive.*{accepted}"
    ):
        load_model_weights(text)
    full = tmp_path / "full.ckpt"
    _save_recipe_checkpoint(full, Llama(CONFIG), None)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"truncated\.ckpt' cannot be read: not a complete torch\.save archive"):
        load_model_weights(truncated)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, other)
    with pytest.raises(WeightsError, match=r"other\.pt': a torch\.save file without a 'state_dict' mapping"):
        load_model_weights(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match=r"'.*empty' is a folder with neither .*metadata nor Hugging Face"):
        load_model_weights(empty)


def test_check_compatible_lists_every_problem() -> None:
    state = _state(0)
    del state["layers.1.mlp.up_proj.weight"]
    state["layers.0.mlp.down_proj.weight"] = torch.zeros(16, 25)
    state["layers.0.self_attn.q_proj.bias"] = torch.zeros(16)
    problems = check_compatible(state, CONFIG)
    assert sorted(problems) == sorted(
        [
            "missing key layers.1.mlp.up_proj.weight (expected shape (24, 16))",
            "unexpected key layers.0.self_attn.q_proj.bias (shape (16,))",
            "layers.0.mlp.down_proj.weight: expected shape (16, 24), found (16, 25)",
        ]
    )
    assert check_compatible(_state(0), CONFIG) == []


def test_llama_config_from_shapes_needs_the_heads() -> None:
    weights = ModelWeights(state=_state(0), run_config=None, kind="weights", path="x.pt")
    with pytest.raises(WeightsError, match=r"x\.pt: num_heads and max_seq_len cannot be read"):
        weights.llama_config()
    assert weights.llama_config({"num_heads": 2, "max_seq_len": 12}) == CONFIG


@pytest.mark.slow
def test_sharded_checkpoint_of_a_one_process_fsdp2_run(tmp_path: Path) -> None:
    """A real fsdp2 checkpoint (DTensor shards, Lightning's meta.pt): its weights give the val/loss the run logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lowrank.structured import from_mapping
    from lowrank_recipes.recipes.data.config import DataConfig
    from lowrank_recipes.recipes.validation_loss import ValidationBatches, validation_loss

    overrides = [
        *TINY,
        "optimizer.name=adamw",
        "trainer.strategy=fsdp2",
        "trainer.accelerator=cpu",
        "trainer.max_steps=2",
        "trainer.val_every_n_steps=2",
        "trainer.checkpoint_every_n_steps=2",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"out_dir={tmp_path}",
    ]
    run, resolved = load_run_config("default", overrides)
    fit(run, resolved)
    path = tmp_path / "checkpoints" / "step=000002.ckpt"
    assert path.is_dir()
    weights = load_model_weights(path)
    assert weights.kind == "sharded" and weights.run_config == resolved
    config = weights.llama_config()
    assert list(weights.state) == list(Llama(config).state_dict())
    data = from_mapping(DataConfig, resolved["data"], "data")
    loss = validation_loss(weights.state, config, ValidationBatches(data)).loss
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert loss == pytest.approx(events.Scalars("val/loss")[-1].value, abs=2e-5)
