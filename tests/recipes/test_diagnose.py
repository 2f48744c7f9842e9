"""``lowrank-diagnose`` end to end on a tiny model trained by the recipe: evaluate reproduces the recipe's logged
val/loss (also from a Hugging Face export), delta's numbers against norms computed here, merge and destroy against
the checkpoints' own tensors and the randomness rule, destroy-table against weights destroyed here, and every misuse
refused with status 2, naming the argument, before anything is written."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lowrank.randomness import draw_generator
from lowrank_recipes.recipes import validation_loss as validation_module
from lowrank_recipes.recipes.config import RunConfig, load_run_config
from lowrank_recipes.recipes.diagnose import main
from lowrank_recipes.recipes.model import Llama, LlamaConfig
from lowrank_recipes.recipes.trainer import fit
from lowrank_recipes.recipes.weights import load_model_weights, save_model_weights

from .test_pretrain import TINY

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]
# the recipe's validation data of the TINY run, for weights that carry no run config
DATA = ["data.seq_len=32", "data.max_documents=120", "data.micro_batch_size=4", "data.val_sequences=8"]


@dataclasses.dataclass
class Run:
    out: Path
    cache: Path
    early: Path  # step=000030.ckpt
    last: Path  # step=000060.ckpt
    val_loss: dict[int, float]  # the recipe's logged val/loss by optimizer step
    val_ppl: dict[int, float]
    config: RunConfig  # the run's validated config


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """60 AdamW steps of the TINY recipe run, validated and checkpointed at steps 30 and 60 (about 5 s)."""
    out = tmp_path_factory.mktemp("diagnose-run")
    cache = out / "cache"
    overrides = [
        *TINY,
        "optimizer.name=adamw",
        "trainer.max_steps=60",
        "trainer.val_every_n_steps=30",
        "trainer.checkpoint_every_n_steps=30",
        f"data.cache_dir={cache}",
        f"out_dir={out}",
    ]
    config, resolved = load_run_config("default", overrides)
    fit(config, resolved)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    # Lightning logs the validation after optimizer step s at global step s - 1
    val_loss = {e.step + 1: e.value for e in events.Scalars("val/loss")}
    val_ppl = {e.step + 1: e.value for e in events.Scalars("val/ppl")}
    checkpoints = out / "checkpoints"
    early, last = checkpoints / "step=000030.ckpt", checkpoints / "step=000060.ckpt"
    return Run(out, cache, early, last, val_loss, val_ppl, config)


def _raw(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's Llama tensors read directly (the oracle of what a tool copied)."""
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _variant(path: Path, source: Path, model: dict | None = None, zero: tuple[str, ...] = ()) -> Path:
    """``source``'s weights written to ``path`` with its run config's model section updated by ``model`` and the
    tensors ``zero`` set to 0 (written directly, not by the tool under test)."""
    raw = torch.load(source, weights_only=True)
    run_config = raw["run_config"]
    run_config["model"].update(model or {})
    state = {k: torch.zeros_like(v) if k in zero else v for k, v in _raw(source).items()}
    save_model_weights(path, state, run_config, {})
    return path


def test_evaluate_reproduces_the_logged_validation(run: Run, tmp_path: Path) -> None:
    assert sorted(run.val_loss) == [30, 60]
    for step, checkpoint in ((30, run.early), (60, run.last)):
        out = tmp_path / f"{step}.json"
        assert main(["evaluate", str(checkpoint), "--json", str(out)]) == 0
        result = _json(out)
        assert result["loss"] == pytest.approx(run.val_loss[step], abs=2e-5)
        assert result["ppl"] == pytest.approx(run.val_ppl[step], rel=1e-4)
        assert result["sequences"] == 8 and result["tokens"] == 8 * 32


def test_evaluate_a_huggingface_export(run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    state = _raw(run.last)
    hf = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v.contiguous() for k, v in state.items()}
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(hf, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": 2, "max_position_embeddings": 32}))
    tokenizer = next(run.cache.glob("bpe-*-v384*/tokenizer.json"))  # the run's own BPE

    assert main(["evaluate", str(folder), "--config", "default", *DATA]) == 2
    assert "--tokenizer: required to evaluate" in capsys.readouterr().err
    out = tmp_path / "hf.json"
    argv = ["evaluate", str(folder), "--config", "default", "--tokenizer", str(tokenizer), *DATA, "--json", str(out)]
    assert main(argv) == 0
    assert _json(out)["loss"] == pytest.approx(run.val_loss[60], abs=2e-5)


def test_delta_reports_the_change_between_checkpoints(run: Run, tmp_path: Path) -> None:
    out = tmp_path / "delta"
    assert main(["delta", str(run.early), str(run.last), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["delta.json", "delta.md", "delta.png"]
    assert (out / "delta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = _json(out / "delta.json")
    shares = [t["share"] for t in report["module_types"].values()]
    assert math.fsum(shares) == pytest.approx(1.0, abs=1e-12)
    a, b = _raw(run.early), _raw(run.last)
    total = sum(float((b[k].double() - a[k].double()).square().sum()) for k in a)
    o_proj = [f"layers.{i}.self_attn.o_proj.weight" for i in range(2)]
    squared = sum(float((b[k].double() - a[k].double()).square().sum()) for k in o_proj)
    assert report["module_types"]["o_proj"]["share"] == pytest.approx(squared / total, rel=1e-9)
    cell = next(c for c in report["cells"] if c["layer"] == "layers.1" and c["module_type"] == "down_proj")
    key = "layers.1.mlp.down_proj.weight"
    change = torch.linalg.vector_norm(b[key].double() - a[key].double()).item()
    assert cell["l2"] == pytest.approx(change, rel=1e-9)
    assert cell["relative_l2"] == pytest.approx(change / torch.linalg.vector_norm(a[key].double()).item(), rel=1e-9)
    assert "| o_proj |" in (out / "delta.md").read_text()
    assert main(["delta", str(run.early), str(run.last), "--out", str(out)]) == 2  # exists: refused
    assert main(["delta", str(run.early), str(run.last), "--out", str(out), "--overwrite"]) == 0


def test_delta_reports_an_infinite_relative_change(run: Run, tmp_path: Path) -> None:
    key = "layers.0.mlp.down_proj.weight"
    zeroed = _variant(tmp_path / "zeroed.pt", run.last, zero=(key,))  # reference norm 0: relative change inf
    out = tmp_path / "delta"
    assert main(["delta", str(zeroed), str(run.last), "--out", str(out)]) == 0
    assert (out / "delta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cell = next(c for c in _json(out / "delta.json")["cells"] if c["layer"] == "layers.0" and c["module_type"] ==
                "down_proj")  # fmt: skip
    assert cell["ref_l2"] == 0.0 and cell["l2"] > 0 and cell["relative_l2"] is None
    assert "| layers.0 |" in (out / "delta.md").read_text() and "inf" in (out / "delta.md").read_text()


def test_merge_copies_from_b_and_evaluates(run: Run, tmp_path: Path) -> None:
    merged, result = tmp_path / "merged.pt", tmp_path / "merge.json"
    argv = ["merge", str(run.early), str(run.last), "--modules", "down_proj", "o_proj", "--layers", "1-1"]
    assert main([*argv, "--out", str(merged), "--evaluate", "--json", str(result)]) == 0
    a, b = _raw(run.early), _raw(run.last)
    weights = load_model_weights(merged)
    copied = {"layers.1.mlp.down_proj.weight", "layers.1.self_attn.o_proj.weight"}
    assert weights.kind == "weights" and sorted(weights.state) == sorted(a)
    for key, tensor in weights.state.items():
        assert torch.equal(tensor, b[key] if key in copied else a[key]), key
    raw = torch.load(merged, weights_only=True)
    assert set(raw["diagnose"]["copied"]) == copied and raw["diagnose"]["layers"] == [1, 1]
    assert raw["run_config"] == torch.load(run.early, weights_only=True)["run_config"]
    losses = _json(result)
    assert losses["A"]["loss"] == pytest.approx(run.val_loss[30], abs=2e-5)
    assert losses["B"]["loss"] == pytest.approx(run.val_loss[60], abs=2e-5)

    everything, result = tmp_path / "all.pt", tmp_path / "all.json"
    assert main(["merge", str(run.early), str(run.last), "--modules", ".", "--out", str(everything), "--evaluate",
                 "--json", str(result)]) == 0  # fmt: skip
    losses = _json(result)
    assert losses["merged"]["loss"] == losses["B"]["loss"]  # all of B's tensors: B's model


def test_destroy_zero_reinit_and_remove(run: Run, tmp_path: Path) -> None:
    intact = _raw(run.last)
    down = [f"layers.{i}.mlp.down_proj.weight" for i in range(2)]

    zero, result = tmp_path / "zero.pt", tmp_path / "zero.json"
    argv = ["destroy", str(run.last), "--how", "zero", "--modules", r"mlp\.down_proj"]
    assert main([*argv, "--out", str(zero), "--evaluate", "--json", str(result)]) == 0
    losses = _json(result)
    assert losses["intact"]["loss"] == pytest.approx(run.val_loss[60], abs=2e-5)
    assert losses["destroyed"]["loss"] > losses["intact"]["loss"] + 0.05  # the trained MLPs mattered
    state = load_model_weights(zero).state
    for key in intact:
        assert torch.equal(state[key], torch.zeros_like(intact[key]) if key in down else intact[key]), key

    reinit, result = tmp_path / "reinit.pt", tmp_path / "reinit.json"
    argv = ["destroy", str(run.last), "--how", "reinit", "--modules", "down_proj", "--seed", "7", "--layers", "0-1"]
    assert main([*argv, "--out", str(reinit), "--evaluate", "--json", str(result)]) == 0
    state = load_model_weights(reinit).state
    for key in down:
        expected = torch.randn(tuple(intact[key].shape), generator=draw_generator(7, 0, key)) * 0.02
        assert torch.equal(state[key], expected)
    assert _json(result)["destroyed"]["loss"] > _json(result)["intact"]["loss"]

    removed, result = tmp_path / "removed.pt", tmp_path / "removed.json"
    assert main(["destroy", str(run.last), "--how", "remove", "--layers", "0", "--out", str(removed), "--evaluate",
                 "--json", str(result)]) == 0  # fmt: skip
    weights = load_model_weights(removed)
    assert weights.run_config["model"]["num_layers"] == 1 and weights.llama_config().num_layers == 1
    assert torch.equal(weights.state["layers.0.mlp.up_proj.weight"], intact["layers.1.mlp.up_proj.weight"])
    assert not any(key.startswith("layers.1.") for key in weights.state)
    again = tmp_path / "again.json"
    assert main(["evaluate", str(removed), "--json", str(again)]) == 0  # the output is evaluable by itself
    assert _json(again)["loss"] == pytest.approx(_json(result)["destroyed"]["loss"], abs=1e-6)
    assert _json(result)["destroyed"]["loss"] > _json(result)["intact"]["loss"]


def test_destroy_table_zeroes_each_module_type(run: Run, tmp_path: Path) -> None:
    table = tmp_path / "table.json"
    assert main(["destroy-table", str(run.last), "--device", "cpu", "--json", str(table)]) == 0
    result = _json(table)
    rows = {row["module_type"]: row for row in result["rows"]}
    assert list(rows) == ["input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "post_attention_layernorm",
                          "gate_proj", "up_proj", "down_proj"]  # fmt: skip
    assert result["intact"]["loss"] == pytest.approx(run.val_loss[60], abs=2e-5)  # the recipe's own logged loss
    # the oracle: the checkpoint's tensors zeroed here, evaluated on the run's validation batches
    batches = validation_module.ValidationBatches(run.config.data, run.config.trainer.limit_val_batches)
    state = _raw(run.last)
    for kind in ("up_proj", "q_proj"):
        zeroed = {k: torch.zeros_like(v) if k.endswith(f"{kind}.weight") else v for k, v in state.items()}
        assert sum(k.endswith(f"{kind}.weight") for k in state) == rows[kind]["tensors"] == 2
        expected = validation_module.validation_loss(zeroed, run.config.model, batches, "32-true", "cpu")
        assert rows[kind]["loss"] == pytest.approx(expected.loss, abs=1e-6)
        assert rows[kind]["increase"] == pytest.approx(expected.loss - run.val_loss[60], abs=2e-5)
    assert rows["up_proj"]["increase"] > 0.05  # the trained MLPs mattered


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], *expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)


def test_misuse_is_refused_before_anything_is_written(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, out = str(run.early), str(run.last), tmp_path / "out.pt"
    _refused(capsys, ["merge", a, b, "--modules", "zzz_proj", "--out", str(out)],
             "--modules: pattern 'zzz_proj' matches no")  # fmt: skip
    _refused(capsys, ["merge", a, b, "--modules", "q_proj", "--layers", "0-5", "--out", str(out)],
             "--layers: layers 0-5 reaches outside", "0..1")  # fmt: skip
    _refused(capsys, ["destroy", b, "--how", "zero", "--modules", "q_proj", "--layers", "2", "--out", str(out)],
             "--layers: layers 2-2 reaches outside")  # fmt: skip
    _refused(capsys, ["destroy", b, "--how", "reinit", "--modules", "q_proj", "--std", "-1", "--out", str(out)],
             "--std: invalid value -1.0; accepted: a finite number > 0")  # fmt: skip
    _refused(capsys, ["destroy-table", b, "--std", "0"], "--std: invalid value 0.0")
    _refused(capsys, ["destroy-table", b, "--modules", "zzz_proj"], "--modules: pattern 'zzz_proj' matches no")
    _refused(capsys, ["delta", a, b, "--threshold", "0"], "--threshold: invalid value 0.0; accepted: a finite number")
    _refused(capsys, ["delta", a, b, "--bins", "0"], "--bins: invalid value 0; accepted: an integer >= 1")
    _refused(capsys, ["destroy", b, "--how", "zero", "--modules", "q_proj", "--out", str(out), "--json", str(out)],
             "--json: " + str(out) + " is the --out path")  # fmt: skip
    _refused(capsys, ["destroy", b, "--how", "zero", "--modules", "q_proj", "--out", str(out), "--evaluate",
                      "--device", "nonsense"], "--device: invalid value 'nonsense'")  # fmt: skip
    _refused(capsys, ["merge", a, b, "--modules", "q_proj", "--layers", "one", "--out", str(out)],
             "--layers: invalid value 'one'; accepted: START-END")  # fmt: skip
    _refused(capsys, ["destroy", b, "--how", "remove", "--modules", "q_proj", "--layers", "0", "--out", str(out)],
             "--modules: not used with --how remove")  # fmt: skip
    _refused(capsys, ["destroy", b, "--how", "remove", "--out", str(out)], "--layers: required with --how remove")
    _refused(capsys, ["destroy", b, "--how", "remove", "--layers", "0-1", "--out", str(out)],
             "would remove every one of the 2 layers")  # fmt: skip
    _refused(capsys, ["destroy", b, "--how", "zero", "--out", str(out)], "--modules: required with --how zero")
    _refused(capsys, ["destroy", b, "--how", "melt", "--modules", "q_proj", "--out", str(out)],
             "argument --how: invalid choice: 'melt'")  # fmt: skip
    _refused(capsys, ["destroy", b, "--how", "zero", "--modules", "q_proj", "--out", str(out), "--evaluate",
                      "data.seq_len=64"], "data.seq_len: 64 exceeds model.max_seq_len = 32")  # fmt: skip
    _refused(capsys, ["evaluate", b, "data.no_such_key=1"], "no_such_key")
    _refused(capsys, ["destroy", b, "--how", "zero", "--modules", "q_proj", "data.seq_len=16", "--out", str(out)],
             "overrides ['data.seq_len=16']: nothing reads them without --evaluate")  # fmt: skip
    _refused(capsys, ["merge", a, b, "--modules", "q(?=_proj)", "--out", str(out)],
             "--modules: no pattern given (['q(?=_proj)'] are key=value config overrides")  # fmt: skip
    _refused(capsys, ["evaluate", str(tmp_path / "missing.ckpt")], "WEIGHTS: weights", "missing.ckpt' do not exist")

    other = tmp_path / "three.pt"  # a model of another shape
    config = LlamaConfig(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_heads=2, num_layers=3, max_seq_len=32
    )
    save_model_weights(other, Llama(config).state_dict(), {"model": dataclasses.asdict(config)}, {})
    _refused(capsys, ["merge", a, str(other), "--modules", "q_proj", "--out", str(out)],
             "different architectures", "layers.2.input_layernorm.weight is in B but not in A")  # fmt: skip
    _refused(capsys, ["delta", a, str(other)], "different architectures")
    assert not out.exists()

    out.write_bytes(b"keep me")
    _refused(capsys, ["destroy", b, "--how", "zero", "--modules", "q_proj", "--out", str(out)],
             "--out: " + str(out) + " exists; accepted: a new path, or --overwrite")  # fmt: skip
    _refused(capsys, ["destroy", b, "--how", "zero", "--modules", "q_proj", "--out", b, "--overwrite"],
             "is one of the inputs")  # fmt: skip
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt", "three.pt"]


def test_merge_refuses_a_and_b_of_other_heads_or_lengths(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tensors' shapes agree, the model configs do not: refused before anything is written (with --evaluate, B
    would otherwise fail its evaluation on A's sequences)."""
    a, out, result = str(run.early), tmp_path / "merged.pt", tmp_path / "merge.json"
    short = _variant(tmp_path / "short.pt", run.last, {"max_seq_len": 16})
    heads = _variant(tmp_path / "heads.pt", run.last, {"num_heads": 4, "rope_theta": 500000.0})
    for evaluate in ([], ["--evaluate", "--json", str(result)]):
        _refused(capsys, ["merge", a, str(short), "--modules", "q_proj", "--out", str(out), *evaluate],
                 "A and B:", "model.max_seq_len is 32 in A and 16 in B")  # fmt: skip
    _refused(capsys, ["merge", a, str(heads), "--modules", "q_proj", "--out", str(out)],
             "model.num_heads is 2 in A and 4 in B", "model.rope_theta is 10000.0 in A and 500000.0 in B")  # fmt: skip
    assert not out.exists() and not result.exists()


def test_a_failing_evaluation_leaves_nothing_written(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """merge and destroy evaluate every model in memory before writing: the last evaluation failing writes nothing."""
    real = validation_module.validation_loss
    calls: list[int] = []

    def failing_last(state, config, batches, precision="32-true", device="cpu"):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == last:
            raise ValueError("data.seq_len: simulated failure")
        return real(state, config, batches, precision, device)

    monkeypatch.setattr(validation_module, "validation_loss", failing_last)
    out, result = tmp_path / "out.pt", tmp_path / "out.json"
    a, b = str(run.early), str(run.last)
    for last, argv in (
        (3, ["merge", a, b, "--modules", "o_proj"]),
        (2, ["destroy", b, "--how", "zero", "--modules", "o_proj"]),
        (2, ["destroy", b, "--how", "remove", "--layers", "1"]),
    ):
        calls.clear()
        _refused(capsys, [*argv, "--out", str(out), "--evaluate", "--json", str(result)], "simulated failure")
        assert len(calls) == last and not out.exists() and not result.exists()


def test_overrides_follow_the_recipe_config_rule(run: Run, tmp_path: Path) -> None:
    """Any key=value is an override, top-level keys (seed=...) included, as load_run_config reads them."""
    out = tmp_path / "seed.json"
    assert main(["evaluate", str(run.last), "--limit-batches", "1", "seed=0", "--json", str(out)]) == 0
    assert _json(out)["sequences"] == 4


def test_module_entry_point_reports_errors_without_a_traceback(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "lowrank_recipes.recipes.diagnose", "evaluate", str(tmp_path / "none.ckpt")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: evaluate: WEIGHTS: weights") and "Traceback" not in done.stderr


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_evaluate_follows_the_run_precision(tmp_path: Path, precision: str) -> None:
    overrides = [
        *TINY,
        "optimizer.name=adamw",
        f"trainer.precision={precision}",
        "trainer.max_steps=5",
        "trainer.checkpoint_every_n_steps=5",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"out_dir={tmp_path / 'run'}",
    ]
    config, resolved = load_run_config("default", overrides)
    fit(config, resolved)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    out = tmp_path / "result.json"
    assert main(["evaluate", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--json", str(out)]) == 0
    assert _json(out)["loss"] == pytest.approx(events.Scalars("val/loss")[-1].value, abs=2e-5)
