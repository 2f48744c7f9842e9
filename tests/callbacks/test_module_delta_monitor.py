"""ModuleDeltaMonitor on a foreign LightningModule (a tiny LLaMA-like stack with a frozen head): its tags in
TensorBoard (scalars, histograms, the heatmap), the values against an independent float64 computation from copies of
the weights the test keeps, the steps under gradient accumulation, the start snapshot across a checkpoint and resume,
a checkpoint file as reference, a monitor added on resume, the bf16 snapshot, plain parameters held by rank 0 only
under FSDP2 (a one-rank mesh standing in for rank 0 and rank 1), and the refusals before any training (argument
checks under a config layer's prefix, POET models), and the heatmap's red non-finite cells."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowrank.poet import PoetConfig, apply_poet
from lowrank_recipes.callbacks.module_delta import IMAGE_TAG, ModuleDeltaMonitor, monitor_problems

from .helpers import WARNING_FILTERS, RecordingLogger, make_trainer

pytestmark = WARNING_FILTERS
WIDTH, LAYERS = 6, 3
KINDS = ("q_proj", "o_proj", "up_proj", "down_proj")


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(WIDTH)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(WIDTH, WIDTH, bias=False)
        self.self_attn.o_proj = nn.Linear(WIDTH, WIDTH, bias=False)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(WIDTH, 2 * WIDTH, bias=False)
        self.mlp.down_proj = nn.Linear(2 * WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + self.self_attn.o_proj(torch.tanh(self.self_attn.q_proj(h)))
        return x + self.mlp.down_proj(torch.relu(self.mlp.up_proj(x)))


class ToyLM(pl.LightningModule):
    """``model.layers.<i>.self_attn.q_proj.weight`` ...; ``model.head.weight`` frozen (requires_grad=False)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.model.head = nn.Linear(WIDTH, WIDTH, bias=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if param.ndim >= 2:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.4)
        self.model.head.weight.requires_grad_(False)
        self.steps_run = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.model.layers:
            x = layer(x)
        return self.model.head(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.02)


def loader(batches: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(4 * batches, WIDTH, generator=g), torch.randn(4 * batches, WIDTH, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.ndim >= 2}


def kind_of(name: str) -> str:
    return name.split(".")[-2]


def expected_tags(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], threshold: float = 1e-6) -> dict:
    """Per module type, in float64 by hand: l2, relative l2, share, excluded fraction, bimodality (from the explicit
    r values, central moments in two passes); per (layer, type): relative l2."""
    out: dict[str, float] = {}
    squares: dict[str, list[float]] = {}
    refs: dict[str, list[float]] = {}
    rs: dict[str, list[torch.Tensor]] = {}
    counts: dict[str, list[int]] = {}
    for name, w0 in start.items():
        w0, w = w0.double(), end[name].double()
        kind = kind_of(name)
        squares.setdefault(kind, []).append(float(((w - w0) ** 2).sum()))
        refs.setdefault(kind, []).append(float((w0**2).sum()))
        keep = w0.abs() >= threshold
        rs.setdefault(kind, []).append(((w - w0) / w0)[keep])
        counts.setdefault(kind, []).append(int((~keep).sum()))
        layer = ".".join(name.split(".")[:3]) if ".layers." in name else "model"
        out[f"delta_layer/{layer}/{kind}/relative_l2"] = math.sqrt(squares[kind][-1] / refs[kind][-1])
    total = sum(sum(v) for v in squares.values())
    for kind in squares:
        l2, ref = math.sqrt(sum(squares[kind])), math.sqrt(sum(refs[kind]))
        out[f"delta/{kind}/l2"] = l2
        out[f"delta/{kind}/relative_l2"] = l2 / ref if l2 > 0 else 0.0
        out[f"delta/{kind}/share"] = sum(squares[kind]) / total
        r = torch.cat(rs[kind])
        out[f"delta/{kind}/excluded_fraction"] = sum(counts[kind]) / (r.numel() + sum(counts[kind]))
        n, d = r.numel(), r - r.mean()
        m2, m3, m4 = (float((d**k).mean()) for k in (2, 3, 4))
        if m2 > 0:
            skew = math.sqrt(n * (n - 1)) / (n - 2) * m3 / m2**1.5
            excess = (n - 1) / ((n - 2) * (n - 3)) * ((n + 1) * (m4 / m2**2 - 3) + 6)
            out[f"delta/{kind}/bimodality"] = (skew**2 + 1) / (excess + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))
    return out


class Writer:
    """Stands in for TensorBoard's SummaryWriter: records histograms and images."""

    def __init__(self) -> None:
        self.histograms: list[tuple[str, int, list[int]]] = []
        self.images: list[tuple[str, int]] = []

    def add_histogram_raw(self, tag: str, *, bucket_counts: list[int], global_step: int, **_: Any) -> None:
        self.histograms.append((tag, global_step, list(bucket_counts)))

    def add_image(self, tag: str, image: Any, global_step: int, dataformats: str = "CHW") -> None:
        self.images.append((tag, global_step))


class WriterLogger(RecordingLogger):
    def __init__(self) -> None:
        super().__init__()
        self._experiment = Writer()


def deltas_of(logger: RecordingLogger, step: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for s, metrics in logger.calls:
        if s == step:
            out.update({k: v for k, v in metrics.items() if k.startswith("delta")})
    return out


def test_tensorboard_gets_scalars_histograms_and_the_heatmap(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = ToyLM()
    start = weights(module)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version="")
    monitor = ModuleDeltaMonitor(every_n_steps=2, bins=10)
    make_trainer(tmp_path, 4, [monitor], logger).fit(module, loader())
    end = weights(module)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    expected = expected_tags(start, end)
    assert {t for t in tags["scalars"] if t.startswith("delta")} == set(expected)
    assert not [t for t in tags["scalars"] if "layernorm" in t]  # 1-D weights are not followed by default
    for tag, value in expected.items():
        assert [e.step for e in events.Scalars(tag)] == [2, 4], tag
        assert events.Scalars(tag)[-1].value == pytest.approx(value, rel=1e-5, abs=1e-7), tag
    assert [e.value for e in events.Scalars("delta/head/l2")] == [0.0, 0.0]  # frozen
    assert events.Scalars("delta_layer/model/head/relative_l2")[-1].value == 0.0
    assert expected["delta/o_proj/relative_l2"] > 0.01
    # histograms: first, middle, last layer (all three here), every type; the counts are the computed ones
    assert set(tags["histograms"]) == {f"delta_hist/model.layers.{i}/{k}" for i in range(LAYERS) for k in KINDS}
    name = "model.layers.1.mlp.down_proj.weight"
    r = ((end[name].double() - start[name].double()) / start[name].double()).clamp(-1, 1)
    edges = torch.linspace(-1, 1, 11, dtype=torch.float64)
    counts = [int(((r >= edges[i]) & ((r < edges[i + 1]) | (i == 9))).sum()) for i in range(10)]
    histogram = events.Histograms("delta_hist/model.layers.1/down_proj")[-1]
    assert histogram.step == 4
    assert list(histogram.histogram_value.bucket) == counts
    assert list(histogram.histogram_value.bucket_limit) == pytest.approx(edges[1:].tolist())
    assert [e.step for e in events.Images(IMAGE_TAG)] == [2, 4]


def test_accumulation_logs_once_per_optimizer_step(tmp_path: Path) -> None:
    logger = WriterLogger()
    monitor = ModuleDeltaMonitor(every_n_steps=2, histogram_layers=[-1], image_every=2)
    make_trainer(tmp_path, 5, [monitor], logger, accumulate_grad_batches=2).fit(ToyLM(), loader(batches=4))
    assert logger.steps("delta/q_proj/relative_l2") == [2, 4]
    writer = logger.experiment
    assert sorted({(t, s) for t, s, _ in writer.histograms}) == [
        (f"delta_hist/model.layers.2/{k}", s) for k in sorted(KINDS) for s in (2, 4)
    ]
    assert len(writer.histograms) == 8  # one per (type, logged step): never twice per optimizer step
    assert writer.images == [(IMAGE_TAG, 4)]  # every second log
    logger = RecordingLogger()
    make_trainer(tmp_path, 3, [ModuleDeltaMonitor(every_n_steps=1)], logger, accumulate_grad_batches=2).fit(
        ToyLM(), loader(batches=4)
    )
    assert logger.steps("delta/q_proj/relative_l2") == [1, 2, 3]


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_the_start_snapshot_survives_checkpoint_and_resume(tmp_path: Path) -> None:
    module = ToyLM()
    start = weights(module)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = make_trainer(tmp_path, 3, [ModuleDeltaMonitor(every_n_steps=3), saver], False, enable_checkpointing=True)
    first.fit(module, loader())
    (path,) = sorted((tmp_path / "ckpt").iterdir())
    checkpoint = torch.load(path, weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("ModuleDeltaMonitor")]
    assert set(state["snapshot"]) == set(start) and state["logs"] == 1
    for name, tensor in start.items():
        assert torch.equal(state["snapshot"][name], tensor), name
    at_resume = weights(module)

    resumed, logger = ToyLM(seed=1), RecordingLogger()
    make_trainer(tmp_path, 6, [ModuleDeltaMonitor(every_n_steps=3)], logger).fit(resumed, loader(), ckpt_path=path)
    assert logger.steps("delta/q_proj/relative_l2") == [6]
    logged = deltas_of(logger, 6)
    against_start = expected_tags(start, weights(resumed))
    assert logged == pytest.approx(against_start, rel=1e-9)
    against_resume = expected_tags(at_resume, weights(resumed))
    assert logged["delta/q_proj/l2"] > 1.1 * against_resume["delta/q_proj/l2"]  # not measured from the resume point


def test_a_checkpoint_file_as_reference(tmp_path: Path) -> None:
    reference = ToyLM(seed=3)
    path = tmp_path / "reference.ckpt"
    torch.save({"state_dict": reference.state_dict(), "global_step": 0}, path)
    module, logger = ToyLM(), RecordingLogger()
    make_trainer(tmp_path, 2, [ModuleDeltaMonitor(reference=str(path), every_n_steps=2)], logger).fit(module, loader())
    assert deltas_of(logger, 2) == pytest.approx(expected_tags(weights(reference), weights(module)), rel=1e-9)


@pytest.mark.parametrize("problem", ["removed_since", "shape", "missing_key", "not_a_state_dict"])
def test_a_bad_reference_is_refused_before_training(tmp_path: Path, problem: str) -> None:
    state = ToyLM().state_dict()
    path = tmp_path / "reference.ckpt"
    if problem == "shape":
        state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    if problem == "missing_key":
        del state["model.layers.2.self_attn.o_proj.weight"]
    torch.save(["not", "a", "state dict"] if problem == "not_a_state_dict" else {"state_dict": state}, path)
    expected = {
        "removed_since": r"reference: invalid value '.*reference.ckpt' \(no such file\); accepted: 'start' or the path",
        "shape": r"'model.layers.1.mlp.up_proj.weight' has shape \(3, 3\) there, \(12, 6\) in the module",
        "missing_key": "'model.layers.2.self_attn.o_proj.weight' missing",
        "not_a_state_dict": "holds no state dict",
    }[problem]
    module, monitor = ToyLM(), ModuleDeltaMonitor(reference=str(path))
    if problem == "removed_since":
        path.unlink()  # existed when the monitor was built: setup checks again
    with pytest.raises(ValueError, match=expected):
        make_trainer(tmp_path, 2, [monitor]).fit(module, loader())
    assert module.steps_run == 0


ACCEPTED_REFERENCE = (
    "'start' or the path of a single checkpoint file readable by torch.load(weights_only=True) (a Lightning "
    "checkpoint or a plain state dict; from an fsdp2 run, one written with trainer.checkpoint_format=full)"
)


def test_monitor_problems_name_the_arguments_under_a_prefix(tmp_path: Path) -> None:
    valid = {
        "reference": "start",
        "every_n_steps": 100,
        "histogram_layers": None,
        "threshold": 1e-6,
        "bins": 50,
        "snapshot_dtype": "float32",
        "names": None,
        "image_every": 1,
    }
    assert monitor_problems(**valid, prefix="delta.") == []
    assert monitor_problems(**{**valid, "bins": 0}, prefix="delta.") == [
        "delta.bins: invalid value 0; accepted: an integer >= 1"
    ]
    wrong = {**valid, "every_n_steps": 0, "threshold": -1.0, "snapshot_dtype": "float16", "image_every": 0}
    assert monitor_problems(**wrong, prefix="run.delta.") == [
        "run.delta.every_n_steps: invalid value 0; accepted: an integer >= 1",
        "run.delta.threshold: invalid value -1.0; accepted: a finite number > 0",
        "run.delta.snapshot_dtype: invalid value 'float16'; accepted: float32 | bfloat16",
        "run.delta.image_every: invalid value 0; accepted: an integer >= 1 or None",
    ]
    assert monitor_problems(**{**valid, "names": "("})[0].startswith("names: invalid value '('; accepted: None, or")
    # a reference path: an existing regular file, checked without loading it (the file here is no checkpoint)
    (tmp_path / "some.ckpt").write_text("not read here")
    assert monitor_problems(**{**valid, "reference": str(tmp_path / "some.ckpt")}) == []
    sharded = tmp_path / "step=10.ckpt"
    sharded.mkdir()
    missing = tmp_path / "missing.ckpt"
    assert monitor_problems(**{**valid, "reference": sharded}, prefix="delta.") == [
        f"delta.reference: invalid value {str(sharded)!r} (a directory: a sharded checkpoint is not accepted); "
        f"accepted: {ACCEPTED_REFERENCE}"
    ]
    assert monitor_problems(**{**valid, "reference": str(missing)}) == [
        f"reference: invalid value {str(missing)!r} (no such file); accepted: {ACCEPTED_REFERENCE}"
    ]
    assert monitor_problems(**{**valid, "reference": ""}) == [
        f"reference: invalid value ''; accepted: {ACCEPTED_REFERENCE}"
    ]
    # the monitor raises the same problems, unprefixed, at construction
    with pytest.raises(ValueError) as caught:
        ModuleDeltaMonitor(reference=sharded, bins=0)
    assert str(caught.value) == (
        f"ModuleDeltaMonitor: reference: invalid value {str(sharded)!r} (a directory: a sharded checkpoint is not "
        f"accepted); accepted: {ACCEPTED_REFERENCE}; bins: invalid value 0; accepted: an integer >= 1"
    )


class PoetLM(pl.LightningModule):
    """An MLP whose ``up_proj`` is a POETLinear (``weight0``, ``q_out``, ``q_in``)."""

    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(WIDTH, 16, bias=False)
        self.down_proj = nn.Linear(16, WIDTH, bias=False)
        apply_poet(self, PoetConfig(block_size=4), [r"\bup_proj\b"], seed=0)
        self.steps_run = 0

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        x, y = batch
        return nn.functional.mse_loss(self.down_proj(torch.relu(self.up_proj(x))), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.01)


def test_a_poet_model_is_refused_before_training(tmp_path: Path) -> None:
    module = PoetLM()
    assert type(module.up_proj).__name__ == "POETLinear" and hasattr(module.up_proj, "weight0")
    message = (
        "ModuleDeltaMonitor: the module holds POET layers (W = R W0 P: the effective weights are not parameters); "
        "accepted: a model without POETLinear layers; compare POET checkpoints offline with `lowrank-diagnose "
        "delta`, which reads them as their effective weights"
    )
    with pytest.raises(ValueError) as caught:
        make_trainer(tmp_path, 2, [ModuleDeltaMonitor(every_n_steps=1)]).fit(module, loader())
    assert str(caught.value) == message
    assert module.steps_run == 0


def test_bf16_snapshot_logs_l2_only(tmp_path: Path) -> None:
    module, logger = ToyLM(), WriterLogger()
    start = weights(module)
    monitor = ModuleDeltaMonitor(every_n_steps=2, snapshot_dtype="bfloat16")
    make_trainer(tmp_path, 2, [monitor], logger).fit(module, loader())
    logged = deltas_of(logger, 2)
    rounded = {n: w.bfloat16().double() for n, w in start.items()}
    expected = expected_tags(rounded, weights(module))
    l2_only = {k: v for k, v in expected.items() if k.rsplit("/", 1)[1] in ("l2", "relative_l2", "share")}
    assert logged == pytest.approx(l2_only, rel=1e-9)
    assert logger.experiment.histograms == [] and logger.experiment.images == [(IMAGE_TAG, 2)]
    assert all(t.dtype == torch.bfloat16 for t in monitor.state_dict()["snapshot"].values())


def test_names_choose_the_followed_parameters(tmp_path: Path) -> None:
    logger = RecordingLogger()
    monitor = ModuleDeltaMonitor(every_n_steps=1, names=[r"o_proj", r"layernorm\.weight"], histogram_layers=())
    make_trainer(tmp_path, 1, [monitor], logger).fit(ToyLM(), loader())
    assert {k.split("/")[1] for k in deltas_of(logger, 1) if k.startswith("delta/")} == {"o_proj", "input_layernorm"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"names": ["nothing_matches"]}, r"names: \['nothing_matches'\] follows no parameter"),
        ({"histogram_layers": [3]}, r"histogram_layers: indices \[3\] out of range for 3 layers .*\[-3, 2\]"),
    ],
)
def test_choices_that_do_not_fit_the_module_are_refused_before_training(
    tmp_path: Path, kwargs: dict, message: str
) -> None:
    module = ToyLM()
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, 2, [ModuleDeltaMonitor(**kwargs)]).fit(module, loader())
    assert module.steps_run == 0


@pytest.mark.parametrize(
    ("kwargs", "key", "accepted"),
    [
        ({"reference": ""}, "reference", "'start' or the path"),
        ({"reference": 3}, "reference", "'start' or the path"),
        ({"every_n_steps": 0}, "every_n_steps", "an integer >= 1"),
        ({"histogram_layers": [0.5]}, "histogram_layers", "None or a sequence of layer indices"),
        ({"histogram_layers": "0"}, "histogram_layers", "None or a sequence of layer indices"),
        ({"threshold": -1.0}, "threshold", "a finite number > 0"),
        ({"bins": 0}, "bins", "an integer >= 1"),
        ({"snapshot_dtype": "float16"}, "snapshot_dtype", "float32 | bfloat16"),
        ({"names": ["("]}, "names", "None, or regular expressions"),
        ({"names": [3]}, "names", "None, or regular expressions"),
        ({"image_every": 0}, "image_every", "an integer >= 1 or None"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs: dict, key: str, accepted: str) -> None:
    with pytest.raises(ValueError, match=f"ModuleDeltaMonitor: .*{key}: invalid value .*; accepted: {accepted}"):
        ModuleDeltaMonitor(**kwargs)


def test_a_second_fit_keeps_the_first_start(tmp_path: Path) -> None:
    module, logger = ToyLM(), RecordingLogger()
    start = weights(module)
    monitor = ModuleDeltaMonitor(every_n_steps=2)
    make_trainer(tmp_path, 2, [monitor], False).fit(module, loader())
    make_trainer(tmp_path, 4, [monitor], logger).fit(module, loader(), ckpt_path=None)
    last = max(s for s in logger.steps("delta/q_proj/l2") if s is not None)
    assert deltas_of(logger, last) == pytest.approx(expected_tags(start, weights(copy.deepcopy(module))), rel=1e-9)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_a_monitor_added_on_resume_measures_from_the_resume_point(tmp_path: Path) -> None:
    module = ToyLM()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    make_trainer(tmp_path, 3, [saver], False, enable_checkpointing=True).fit(module, loader())
    (path,) = sorted((tmp_path / "ckpt").iterdir())
    assert not torch.load(path, weights_only=True).get("callbacks", {}).get("ModuleDeltaMonitor")
    at_resume = weights(module)
    resumed, logger = ToyLM(seed=1), RecordingLogger()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="ModuleDeltaMonitor")  # Lightning restores nothing: no warning
        make_trainer(tmp_path, 6, [ModuleDeltaMonitor(every_n_steps=3)], logger).fit(resumed, loader(), ckpt_path=path)
    assert deltas_of(logger, 6) == pytest.approx(expected_tags(at_resume, weights(resumed)), rel=1e-9)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_a_checkpoint_with_the_monitor_state_but_no_snapshot_warns(tmp_path: Path) -> None:
    reference = tmp_path / "reference.ckpt"
    torch.save({"state_dict": ToyLM(seed=3).state_dict()}, reference)
    module = ToyLM()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = ModuleDeltaMonitor(reference=str(reference), every_n_steps=3)
    make_trainer(tmp_path, 3, [first, saver], False, enable_checkpointing=True).fit(module, loader())
    (path,) = sorted((tmp_path / "ckpt").iterdir())
    state = torch.load(path, weights_only=True)["callbacks"]["ModuleDeltaMonitor"]
    assert state["reference"] == str(reference) and "snapshot" not in state
    at_resume = weights(module)
    resumed, logger = ToyLM(seed=1), RecordingLogger()
    with pytest.warns(UserWarning, match="holds no start snapshot .*the reference is the weights at the resume point"):
        make_trainer(tmp_path, 6, [ModuleDeltaMonitor(every_n_steps=3)], logger).fit(resumed, loader(), ckpt_path=path)
    assert deltas_of(logger, 6) == pytest.approx(expected_tags(at_resume, weights(resumed)), rel=1e-9)


def test_a_ddp_rank_other_than_zero_drops_the_restored_snapshot() -> None:
    module = ToyLM()
    start = weights(module)
    state = {"reference": "start", "snapshot_dtype": "float32", "logs": 2, "snapshot": start}
    others, zero = ModuleDeltaMonitor(), ModuleDeltaMonitor()
    for rank, monitor in ((1, others), (0, zero)):
        monitor.load_state_dict(dict(state))  # Lightning does this on every rank
        monitor.prepare(module, rank)
    assert others._snapshot == {} and others._pending is None and others.compute(module) is None
    assert set(zero._snapshot) == set(start)
    assert all(torch.equal(zero._snapshot[n], t) for n, t in start.items())


def test_a_snapshot_that_does_not_fit_names_the_way_out() -> None:
    module = ToyLM()
    foreign = {"model.other.weight": torch.zeros(2, 2)}
    monitor = ModuleDeltaMonitor()
    monitor.load_state_dict({"reference": "start", "snapshot_dtype": "float32", "logs": 0, "snapshot": foreign})
    with pytest.raises(ValueError, match="does not match the followed parameters: .*missing.*; accepted: a snapshot"):
        monitor.prepare(module, 0)
    monitor = ModuleDeltaMonitor()
    monitor.prepare(module, 0)  # a first fit
    other = nn.Sequential(nn.Linear(2, 2))  # a second fit of the same monitor, on another module
    with pytest.raises(ValueError, match=r"has no 0\.weight; accepted: the parameters that fit followed .*new Module"):
        monitor.prepare(other, 0)


class MixedModule(nn.Module):
    """One sharded (DTensor) weight and one plain weight, as FSDP2 leaves an unwrapped parameter."""

    def __init__(self, mesh: Any) -> None:
        from torch.distributed.tensor import Shard, distribute_tensor

        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.sharded = nn.Parameter(distribute_tensor(torch.randn(4, 3, generator=g), mesh, [Shard(0)]))
        self.plain = nn.Parameter(torch.randn(3, 3, generator=g))


def test_fsdp2_plain_parameters_are_kept_by_rank_zero_only(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        module = MixedModule(init_device_mesh("cpu", (1,)))
        start = {"sharded": module.sharded.full_tensor().clone(), "plain": module.plain.detach().clone()}
        other, zero = ModuleDeltaMonitor(), ModuleDeltaMonitor()
        other.prepare(module, 1)  # what global rank 1 holds: its shard, no plain parameter
        zero.prepare(module, 0)
        assert set(other._snapshot) == {"sharded"} and set(zero._snapshot) == {"sharded", "plain"}
        assert other.state_dict()["snapshot"] == {}  # the gather runs, only rank 0 keeps the result
        snapshot = zero.state_dict()["snapshot"]
        assert set(snapshot) == set(start) and all(torch.equal(snapshot[n], t) for n, t in start.items())
        with torch.no_grad():
            module.plain.add_(0.5)
        (plain_of_other,) = [d for d in other.compute(module) if d.name == "plain"]
        assert (plain_of_other.l2, plain_of_other.included) == (0.0, 0)  # rank 1 adds nothing for it
        (plain,) = [d for d in zero.compute(module) if d.name == "plain"]
        assert plain.l2 == pytest.approx(0.5 * 3, rel=1e-12)  # ||0.5 * ones(3, 3)||_F
    finally:
        dist.destroy_process_group()


def test_the_heatmap_shows_non_finite_cells_in_red() -> None:
    pytest.importorskip("matplotlib")
    from lowrank_recipes.callbacks.module_delta_figure import render_delta_heatmap

    def red_pixels(cells: dict[tuple[str, str], float]) -> int:
        image = render_delta_heatmap(cells, step=3)  # (H, W, 3) uint8
        return int(((image[..., 0] > 200) & (image[..., 1] < 40) & (image[..., 2] < 40)).sum())

    healthy = {("model.layers.0", "q_proj"): 0.1, ("model.layers.0", "o_proj"): 0.2, ("model.layers.1", "q_proj"): 0.3}
    assert red_pixels(healthy) == 0  # viridis has no pure red
    one_nan = {**healthy, ("model.layers.0", "o_proj"): math.nan}
    both = {**one_nan, ("model.layers.1", "q_proj"): math.inf}
    assert 0 < red_pixels(one_nan) < red_pixels(both)  # a NaN cell is red, not blank like a cell without weights
