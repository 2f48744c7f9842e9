"""``model.init_from`` and ``model.trainable`` through the recipe: a run that starts from another run's weights at step
0 with a new optimizer, trains only the selected modules (the frozen ones bit-identical, without optimizer state),
refuses a changed trainable set on resume, and refuses weights of another shape before anything is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lowrank.poet import poet_modules
from lowrank_recipes.recipes.config import ConfigError, load_run_config
from lowrank_recipes.recipes.module import LlamaPretrainModule, module_kwargs
from lowrank_recipes.recipes.pretrain import main
from lowrank_recipes.recipes.resume_config import check_resume
from lowrank_recipes.recipes.trainer import fit

from .test_pretrain import TINY, _scalars

pytestmark = [
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]
O_PROJ_AND_COMPANIONS = ("self_attn.o_proj.", "embed_tokens.", "lm_head.", "norm.", "layernorm.")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny AdamW run of 6 steps: the weights later runs start from."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main([*TINY, "optimizer.name=adamw", "trainer.max_steps=6", f"out_dir={out}"]) == 0
    return out / "checkpoints" / "last.ckpt"


def _model_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}


@pytest.mark.parametrize(
    "optimizer",
    [
        ["optimizer.name=adamw"],
        ["optimizer.name=lowrank"],
        ["optimizer.name=lowrank", "optimizer.lowrank.projected_gradients=true"],
        ["optimizer.name=lowrank", "trainer.per_layer_updates=true"],
        ["optimizer.name=adamw", "optimizer.state_precision=8bit"],
    ],
    ids=["adamw", "lowrank", "projected", "per-layer", "adamw-8bit"],
)
def test_init_from_and_sfn_oproj_train_only_o_proj_and_companions(
    base: Path, tmp_path: Path, optimizer: list[str]
) -> None:
    out = tmp_path / "tuned"
    overrides = [
        *TINY,
        *optimizer,
        f"model.init_from={base}",
        "model.trainable=[sfn_oproj]",
        "trainer.max_steps=5",
        f"out_dir={out}",
    ]
    assert main(overrides) == 0
    start, end = _model_state(base), _model_state(out / "checkpoints" / "last.ckpt")
    assert start.keys() == end.keys()
    trained = {k for k in start if any(part in k for part in O_PROJ_AND_COMPANIONS)}
    assert {k for k in trained if "o_proj" in k} == {f"layers.{i}.self_attn.o_proj.weight" for i in range(2)}
    for key in start:
        if key in trained:
            assert not torch.equal(start[key], end[key]), key  # trained, from the loaded weights
        else:
            assert torch.equal(start[key], end[key]), key  # frozen: bit-identical to the weights it started from
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 5  # step 0 with a new optimizer, not the base run's step 6
    states = checkpoint["optimizer_states"][0]
    held = [i for group in states["param_groups"] if not group.get("companions") for i in group["params"]]
    assert len(held) == len(trained)  # the optimizer took exactly the trainable tensors
    companions = [i for group in states["param_groups"] if group.get("companions") for i in group["params"]]
    assert len(companions) == (2 if "optimizer.lowrank.projected_gradients=true" in optimizer else 0)  # o_proj only
    assert all(i in held for i in states["state"])
    table = _scalars(out)
    assert "text:optimizer/groups/text_summary" in table


def test_a_changed_trainable_set_is_refused_on_resume(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = [*TINY, "optimizer.name=adamw", f"model.init_from={base}", "trainer.max_steps=4", f"out_dir={out}"]
    assert main([*common, "model.trainable=[sfn_oproj]"]) == 0
    run, resolved = load_run_config("default", [*common, "trainer.max_steps=6", "model.trainable=[attention]"])
    with pytest.raises(
        ConfigError, match=r"model.trainable \['sfn_oproj'\] -> \['attention'\]: the optimizer state holds exactly"
    ):
        check_resume(out / "checkpoints" / "last.ckpt", resolved)


class _StopAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_a_resumed_run_does_not_read_init_from_and_continues_exactly(base: Path, tmp_path: Path) -> None:
    start = tmp_path / "start.ckpt"
    shutil.copyfile(base, start)
    common = [*TINY, "optimizer.name=lowrank", f"model.init_from={start}", "model.trainable=[attention]"]
    common += ["trainer.max_steps=6", "trainer.checkpoint_every_n_steps=4"]
    full = tmp_path / "full"
    run, resolved = load_run_config("default", [*common, f"out_dir={full}"])
    fit(run, resolved)
    split = tmp_path / "split"
    run, resolved = load_run_config("default", [*common, f"out_dir={split}"])
    fit(run, resolved, callbacks=[_StopAt(4)])
    start.unlink()  # the file init_from names is gone: a resumed run must not need it
    run, resolved = load_run_config("default", [*common, f"out_dir={split}"])  # validated without reading it
    fit(run, resolved)
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    with pytest.raises(ConfigError, match=r"model.init_from: '.*start.ckpt' does not exist"):
        load_run_config("default", [*common, f"out_dir={tmp_path / 'fresh'}"])  # a fresh start still needs it


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.hidden_size=64"], r"model.init_from: the weights in .* do not fit model.\* \(.*embed_tokens.weight"),
        (["model.init_from=/nonexistent/last.ckpt"], r"model.init_from: '/nonexistent/last.ckpt' does not exist"),
        (["model.trainable=[x_proj]"], r"model.trainable: pattern\(s\) \['x_proj'\] match no parameter"),
        (["model.trainable=[sfn_oproj]", "model.trainable=['(']"], r"model.trainable: '\(' is not a regular expr"),
        (["optimizer.name=poet"], r"model.init_from: with optimizer.name=poet the loaded weights become W0 only"),
    ],
)
def test_misuse_is_refused_before_anything_is_written(
    base: Path, tmp_path: Path, overrides: list[str], message: str
) -> None:
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        load_run_config("default", [*TINY, f"model.init_from={base}", f"out_dir={out}", *overrides])
    assert not out.exists()


def test_poet_starts_from_the_loaded_weights_as_w0(base: Path) -> None:
    run, _ = load_run_config(
        "default",
        [*TINY, "optimizer.name=poet", "optimizer.poet.init=normal", "optimizer.poet.block_size=8"]
        + [f"model.init_from={base}", "model.trainable=[sfn_oproj]"],
    )
    module = LlamaPretrainModule(**module_kwargs(run))
    start = _model_state(base)
    for name, layer in poet_modules(module.model):
        assert torch.equal(layer.weight0, start[f"{name}.weight"])
        assert layer.q_out.requires_grad == ("o_proj" in name) and not layer.weight0.requires_grad
    assert torch.equal(module.model.embed_tokens.weight, start["embed_tokens.weight"])
