"""Every shipped config loads and validates; C4 configs follow the reference protocol; bad input is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lowrank_recipes.recipes.config import CONFIG_DIR, ConfigError, available_configs, load_run_config
from lowrank_recipes.recipes.model import count_parameters

REPO = Path(__file__).resolve().parents[2]

# The reference protocol (docs/reference.md): (params in millions, hidden, intermediate, heads, layers, rank, steps)
REFERENCE = {
    "c4_60m": (58.1, 512, 1376, 8, 8, 128, 10_000),
    "c4_130m": (134.1, 768, 2048, 12, 12, 256, 20_000),
    "c4_350m": (368.0, 1024, 2736, 16, 24, 256, 60_000),
    "c4_1b": (1339.1, 2048, 5461, 32, 24, 512, 100_000),
    "c4_7b": (6738.4, 4096, 11008, 32, 32, 1024, 150_000),
}


@pytest.fixture
def gpu_machine(monkeypatch):
    """The C4 configs ask for trainer.accelerator=gpu, which load_run_config checks against the machine: pretend one."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_all_configs_present():
    assert set(available_configs()) == {"default", *REFERENCE}


@pytest.mark.parametrize("name", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_loads_validates_and_opens_with_a_comment(name, gpu_machine):
    run, resolved = load_run_config(str(name))
    assert resolved["trainer"]["max_steps"] == run.trainer.max_steps
    header = name.read_text().splitlines()[:8]
    assert header[0].startswith("#")
    assert any("Launch:" in line for line in header) and any("Hardware:" in line for line in header)
    assert any("Expected:" in line for line in header)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_c4_configs_follow_the_reference_protocol(name, gpu_machine):
    params, hidden, inter, heads, layers, rank, steps = REFERENCE[name]
    run, _ = load_run_config(name)
    m, o, t = run.model, run.optimizer, run.trainer
    assert (m.hidden_size, m.intermediate_size, m.num_heads, m.num_layers) == (hidden, inter, heads, layers)
    assert m.vocab_size == 32000 and m.max_seq_len == 256 and run.data.seq_len == 256
    assert count_parameters(m) / 1e6 == pytest.approx(params, rel=0.01)  # meta device: nothing allocated
    assert run.data.source == "c4" and run.data.tokenizer == "t5-base"
    assert o.name == "lowrank" and o.lowrank.rank == rank and o.lowrank.alpha == 0.25
    assert o.betas == (0.9, 0.999) and o.eps == 1e-6 and o.weight_decay == 0.0
    assert t.max_steps == steps and t.global_batch_size == 512
    assert run.schedule.warmup_fraction == 0.1 and run.schedule.min_lr_ratio == 0.1
    assert t.precision == "bf16-true"
    if name == "c4_7b":
        assert (o.lr, o.refresh.update_gap, t.gradient_clip_val) == (0.005, 500, 1.0)
    else:
        assert (o.lr, o.refresh.update_gap, t.gradient_clip_val) == (0.01, 200, None)


def test_bare_name_with_suffix_and_overrides():
    run, resolved = load_run_config("default.yaml", ["trainer.max_steps=7", "optimizer.lowrank.selector=dominant"])
    assert run.trainer.max_steps == 7 and run.optimizer.lowrank.selector == "dominant"
    assert resolved["optimizer"]["betas"] == [0.9, 0.999]  # plain YAML-able values
    assert run.optimizer.lowrank.seed == run.seed


@pytest.mark.parametrize(
    "overrides,needles",
    [
        (["trainer.max_stepz=3"], ["trainer.max_stepz", "did you mean trainer.max_steps"]),
        (["trainer.max_steps=abc"], ["trainer.max_steps", "expected int"]),
        (["trainer.max_steps"], ["key=value"]),
        (["data.seq_len=4096"], ["data.seq_len", "model.max_seq_len"]),
        (["optimizer.lowrank.rank=999"], ["optimizer.lowrank.rank", "q_proj.weight", "1 .. 128"]),
        (["trainer.strategy=fsdp"], ["trainer.strategy", "FSDP1", "ddp"]),
        (["trainer.strategy=deepspeed_stage_2"], ["trainer.strategy", "DeepSpeed", "ddp"]),
        (
            ["trainer.strategy=fsdp2", "optimizer.lowrank.side=left"],
            ["optimizer.lowrank.side", "fsdp2", "right | auto"],
        ),
        (["trainer.strategy=fsdp2", "trainer.per_layer_updates=true"], ["trainer.per_layer_updates", "fsdp2"]),
        (["trainer.precision=fp8"], ["trainer.precision", "bf16-mixed"]),
        (
            ["trainer.strategy=fsdp2", "optimizer.refresh.split_across_ranks=true"],
            ["optimizer.refresh.split_across_ranks", "fsdp2", "false"],
        ),
        (
            ["trainer.per_layer_updates=true", "optimizer.refresh.split_across_ranks=true"],
            ["optimizer.refresh.split_across_ranks", "per_layer_updates", "false"],
        ),
        (["trainer.checkpoint_format=single"], ["trainer.checkpoint_format", "auto | sharded | full"]),
        (
            ["trainer.checkpoint_format=sharded", "trainer.strategy=ddp"],
            ["trainer.checkpoint_format", "fsdp2", "'ddp'", "auto | full"],
        ),
        (["data.source=files", "data.train_files=[/nonexistent.jsonl]"], ["data.train_files", "/nonexistent.jsonl"]),
        (["optimizer.lowrank.selector=top"], ["optimizer.lowrank.selector", "importance"]),
        (["trainer.global_batch_size=20"], ["trainer.global_batch_size", "multiple"]),
        (["resume=/no/such.ckpt"], ["resume", "auto | never"]),
        ([f"data.train_files=[{REPO / 'README.md'}]"], ["data.train_files", "'embedded'", "data.source=files"]),
        (["trainer.gradient_clip_val=-1.0"], ["trainer.gradient_clip_val: invalid value -1.0", "null (off)"]),
        (["out_dir=''"], ["out_dir: empty", "current folder"]),
        (
            ["optimizer.lowrank.projected_gradients=true", "trainer.per_layer_updates=true"],
            ["optimizer.lowrank.projected_gradients", "per_layer_updates", "false"],
        ),
        (
            ["optimizer.lowrank.projected_gradients=true", "optimizer.lowrank.fira=true"],
            ["optimizer.lowrank.projected_gradients", "fira", "accepted with fira: false"],
        ),
        (
            ["optimizer.lowrank.projected_gradients=true", "optimizer.name=adamw"],
            ["optimizer.lowrank.projected_gradients", "optimizer.name=lowrank", "adamw: false"],
        ),
    ],
)
def test_bad_overrides_raise_config_errors(overrides, needles):
    with pytest.raises(ConfigError) as info:
        load_run_config("default", overrides)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


@pytest.mark.parametrize("side", ["auto", "right"])
def test_fsdp2_is_accepted_and_projects_on_the_right(side):
    run, resolved = load_run_config("default", ["trainer.strategy=fsdp2", f"optimizer.lowrank.side={side}"])
    assert run.trainer.strategy == "fsdp2" and run.optimizer.lowrank.side == "right"
    assert resolved["optimizer"]["lowrank"]["side"] == "right"


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ([], "full"),
        (["trainer.strategy=ddp", "trainer.checkpoint_format=full"], "full"),
        (["trainer.strategy=fsdp2"], "sharded"),
        (["trainer.strategy=fsdp2", "trainer.checkpoint_format=sharded"], "sharded"),
        (["trainer.strategy=fsdp2", "trainer.checkpoint_format=full"], "full"),
    ],
)
def test_checkpoint_format_auto_resolves_per_strategy(overrides, expected):
    run, resolved = load_run_config("default", overrides)
    assert run.trainer.checkpoint_format == resolved["trainer"]["checkpoint_format"] == expected


@pytest.mark.parametrize("fmt,distributed", [("sharded", True), ("full", False)])
def test_fsdp2_checkpoint_format_reaches_the_strategy(fmt, distributed):
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lowrank_recipes.recipes.trainer import strategy

    run, _ = load_run_config("default", ["trainer.strategy=fsdp2", f"trainer.checkpoint_format={fmt}"])
    built = strategy(run)
    assert isinstance(built, ModelParallelStrategy) and built._save_distributed_checkpoint is distributed


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="available: .*default"):
        load_run_config("no_such_config")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(str(broken))
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(str(listing))
    as_file = tmp_path / "taken"
    as_file.write_text("x")
    with pytest.raises(ConfigError, match="out_dir.*is a file"):
        load_run_config("default", [f"out_dir={as_file}"])


def test_cli_errors_are_one_paragraph_without_traceback_and_write_nothing(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "pretrain.py"), "trainer.max_stepz=3", f"out_dir={out}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: unknown key trainer.max_stepz")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_refresh_section_reaches_the_optimizers_schedule():
    from lowrank_recipes.recipes.module import LlamaPretrainModule, module_kwargs

    overrides = [
        "trainer.strategy=ddp",
        "optimizer.refresh.split_across_ranks=true",
        "optimizer.refresh.stagger=3",
        "optimizer.refresh.update_gap=7",
        "trainer.max_steps=50",
    ]
    run, resolved = load_run_config("default", overrides)
    optimizer = LlamaPretrainModule(**module_kwargs(run)).configure_optimizers()["optimizer"]
    schedule = optimizer.schedule
    assert (schedule.split_across_ranks, schedule.stagger, schedule.update_gap) == (True, 3, 7)
    assert schedule.max_steps == 50 == resolved["optimizer"]["refresh"]["max_steps"]  # null means trainer.max_steps


@pytest.mark.parametrize(
    "override,new_key",
    [
        ("optimizer.lowrank.update_gap=5", "optimizer.refresh.update_gap"),
        ("subspace.stagger=2", "optimizer.refresh.stagger"),
        ("subspace.switch_at=0.5", "optimizer.refresh.switch_at"),
        ("subspace.split_across_ranks=true", "optimizer.refresh.split_across_ranks"),
        ("subspace.image_interval=3", "monitor.image_interval"),
        ("subspace.frozen_patience=3", "monitor.frozen_patience"),
    ],
)
def test_old_schedule_and_monitor_keys_name_their_new_place(override, new_key):
    with pytest.raises(ConfigError) as info:
        load_run_config("default", [override])
    message = str(info.value)
    assert override.split("=")[0] in message and f"moved to {new_key}" in message, message


def test_schedule_and_monitor_problems_are_collected_with_their_keys():
    overrides = [
        "optimizer.refresh.stagger=0",
        "optimizer.refresh.switch_to=best",
        "monitor.frozen_threshold=2",
        "monitor.image_interval=0",
    ]
    with pytest.raises(ConfigError) as info:
        load_run_config("default", overrides)
    message = str(info.value)
    for needle in (
        "optimizer.refresh.stagger: invalid value 0",
        "optimizer.refresh.switch_to: invalid value 'best'",
        "optimizer.refresh.switch_at and optimizer.refresh.switch_to go together",
        "monitor.frozen_threshold: invalid value 2",
        "monitor.image_interval: invalid value 0",
    ):
        assert needle in message, (needle, message)


def test_config_module_imports_no_training_library():
    code = (
        "import sys; import recipes.config; "
        "print(sorted(m for m in ('lightning', 'lightning.pytorch', 'datasets', 'torchdata') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_tilde_in_paths_means_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    run, resolved = load_run_config("default", ["out_dir=~/runs/x"])
    assert run.out_dir == str(tmp_path / "runs" / "x") == resolved["out_dir"]


@pytest.mark.parametrize(
    "name, content",
    [
        ("val.jsonl", ""),
        ("val.jsonl", '\n{"text": ""}\n{"text": "", "url": "x"}\n'),
        ("val.txt", "  \n\n"),
        ("val.json", '[{"text": ""}]'),
    ],
)
def test_a_validation_file_without_a_document_is_refused(tmp_path, name, content):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "some training text"}\n' if name != "val.txt" else "")
    (tmp_path / "train.txt").write_text("some training text")
    if name == "val.txt":
        train = tmp_path / "train.txt"
    val = tmp_path / name
    val.write_text(content)
    out = tmp_path / "run"
    overrides = ["data.source=files", f"data.train_files=[{train}]", f"data.val_files=[{val}]", f"out_dir={out}"]
    overrides += ["data.seq_len=4", "data.micro_batch_size=1", "trainer.global_batch_size=1"]  # texts this short
    with pytest.raises(ConfigError, match=rf"data.val_files: file\(s\) \['{val}'\] hold no document.*no val/loss"):
        load_run_config("default", overrides)
    assert not out.exists()
    # one document is enough, and an empty training file is refused as well
    val.write_text('{"text": "held-out text"}\n' if name != "val.txt" else "held-out text")
    if name.endswith(".json"):
        val.write_text('[{"text": "held-out text"}]')
    load_run_config("default", overrides)
    train.write_text("")
    with pytest.raises(ConfigError, match=r"data.train_files: .* hold no document.*nothing to train on"):
        load_run_config("default", overrides)


def test_a_compressed_file_is_looked_into(tmp_path):
    import gzip

    from lowrank_recipes.recipes.data.file_check import has_document

    empty, full = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    with gzip.open(empty, "wt") as f:
        f.write('{"text": ""}\n')
    with gzip.open(full, "wt") as f:
        f.write('{"text": ""}\n{"text": "x", "url": "u"}\n')
    assert (has_document(str(empty)), has_document(str(full))) == (False, True)
