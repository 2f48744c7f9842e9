"""SubspaceOverlapMonitor: tag names and values, the frozen-subspace warning, the picture."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lowrank import RefreshRecord
from lowrank.overlap import layer_label, module_type, normalized_overlap, overlap_metrics
from lowrank_recipes.callbacks import SubspaceOverlapMonitor, SubspaceResampler
from lowrank_recipes.callbacks.overlap_figure import natural_key, render_overlap_figure
from lowrank_recipes.callbacks.overlap_monitor import IMAGE_TAG
from tests.callbacks.helpers import (
    WARNING_FILTERS,
    FixedGradModule,
    MLPModule,
    RecordingLogger,
    make_trainer,
    optimizer_config,
    regression_loader,
    scalar_loader,
)

pytestmark = WARNING_FILTERS


def record(name: str, old: torch.Tensor | None, new: torch.Tensor) -> RefreshRecord:
    return RefreshRecord(name, 5, "dominant", "left", old, new)


def test_names_to_module_types_and_layers() -> None:
    assert module_type("model.layers.3.self_attn.q_proj.weight") == "q_proj"
    assert module_type("_orig_mod.model.layers.0.mlp.down_proj.weight") == "down_proj"
    assert module_type("fc1.weight") == "fc1" and module_type("w") == "w"
    assert layer_label("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert layer_label("_orig_mod.model.layers.12.self_attn.o_proj.weight") == "model.layers.12"
    assert layer_label("encoder.fc1.weight") == "encoder"
    assert layer_label("fc1.weight") == "model"
    assert sorted(["l.10", "l.2", "l.1"], key=natural_key) == ["l.1", "l.2", "l.10"]


def test_overlap_metrics_exact_values() -> None:
    eye = torch.eye(4)
    records = [
        record("m.layers.0.q_proj.weight", eye[:, :2], eye[:, :2]),  # same subspace: 1
        record("m.layers.0.k_proj.weight", eye[:, :2], eye[:, 2:]),  # orthogonal: 0
        record("m.layers.1.q_proj.weight", eye[:, :2], eye[:, 1:3]),  # one shared axis: 1/2
        record("m.layers.1.v_proj.weight", eye, eye[:, [1, 0, 2, 3]]),  # full rank: chance 1
    ]
    latest = {r.name: (r.overlap, r.chance) for r in records}
    assert overlap_metrics(latest) == pytest.approx(
        {
            "lowrank/overlap/q_proj": 0.75,
            "lowrank/overlap_chance/q_proj": 0.5,
            "lowrank/overlap_normalized/q_proj": 0.5,
            "lowrank/overlap/k_proj": 0.0,
            "lowrank/overlap_chance/k_proj": 0.5,
            "lowrank/overlap_normalized/k_proj": -1.0,
            "lowrank/overlap/v_proj": 1.0,
            "lowrank/overlap_chance/v_proj": 1.0,
            "lowrank/overlap/mean": 2.5 / 4,
            "lowrank/overlap_chance/mean": 2.5 / 4,
            "lowrank/overlap_normalized/mean": (1.0 - 1.0 + 0.0) / 3,
        }
    )
    assert overlap_metrics({}) == {}
    assert record("m.layers.1.k_proj.weight", None, eye[:, :2]).overlap is None  # first refresh: nothing to log
    assert normalized_overlap(0.25, 0.25) == 0.0 and normalized_overlap(1.0, 1.0) is None


def test_staggered_aggregates_use_every_weights_latest_overlap(tmp_path: Path) -> None:
    module = MLPModule(optimizer_config(update_gap=4, stagger=2), blocks=2)
    logger = RecordingLogger()
    monitor = SubspaceOverlapMonitor(per_layer=True, image_interval=None)
    make_trainer(tmp_path, 7, [SubspaceResampler(), monitor], logger).fit(module, regression_loader())
    # Overlaps: layers.1 at 2 and 6, layers.0 at 4. At 2 only layers.1 has one; from 4 on both layers count.
    at2, at4, at6 = logger.at(2), logger.at(4), logger.at(6)
    layer = "lowrank/overlap_layer/layers.{}.{}.weight"
    assert set(k for k in at4 if "overlap_layer" in k) == {layer.format(0, "fc1"), layer.format(0, "fc2")}
    assert at2["lowrank/overlap/fc1"] == at2[layer.format(1, "fc1")]
    assert at4["lowrank/overlap/fc1"] == pytest.approx((at4[layer.format(0, "fc1")] + at2[layer.format(1, "fc1")]) / 2)
    assert at6["lowrank/overlap/fc2"] == pytest.approx((at4[layer.format(0, "fc2")] + at6[layer.format(1, "fc2")]) / 2)
    values = [at6[layer.format(i, k)] if i else at4[layer.format(i, k)] for i in (0, 1) for k in ("fc1", "fc2")]
    assert at6["lowrank/overlap/mean"] == pytest.approx(sum(values) / 4)


def test_dominant_on_a_fixed_gradient_gives_overlap_one_and_warns_once(tmp_path: Path) -> None:
    module = FixedGradModule(optimizer_config(update_gap=1, selector="dominant"))
    logger = RecordingLogger()
    monitor = SubspaceOverlapMonitor(image_interval=None, frozen_threshold=0.9, frozen_patience=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, 7, [SubspaceResampler(), monitor], logger).fit(module, scalar_loader([1.0] * 7))
    assert logger.steps("lowrank/overlap/mean") == [1, 2, 3, 4, 5, 6]
    for tag in (
        "lowrank/overlap/fc1",
        "lowrank/overlap/fc2",
        "lowrank/overlap/mean",
        "lowrank/overlap_normalized/mean",
    ):
        assert logger.values(tag) == pytest.approx([1.0] * 6, abs=1e-5)
    frozen = [w for w in caught if "the subspace is frozen" in str(w.message)]
    assert len(frozen) == 1
    assert "3 consecutive refreshes" in str(frozen[0].message) and "step 3" in str(frozen[0].message)
    assert monitor.warned_frozen and monitor.frozen_streak == 6


def test_random_selector_averages_near_chance(tmp_path: Path) -> None:
    width, hidden, rank = 24, 48, 4
    module = MLPModule(optimizer_config(update_gap=1, selector="random", rank=rank), width=width, hidden=hidden)
    logger = RecordingLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, 31, [SubspaceResampler(), SubspaceOverlapMonitor(image_interval=None)], logger).fit(
            module, regression_loader(width=width)
        )
    means = logger.values("lowrank/overlap/mean")
    assert len(means) == 30 and all(0.0 <= v <= 1.0 for v in means)
    assert logger.values("lowrank/overlap_chance/mean") == pytest.approx([rank / width] * 30)
    assert float(np.mean(means)) == pytest.approx(rank / width, abs=0.03)
    assert float(np.mean(logger.values("lowrank/overlap_normalized/mean"))) == pytest.approx(0.0, abs=0.04)
    assert not [w for w in caught if "frozen" in str(w.message)]


def test_picture_every_interval_and_at_the_end(tmp_path: Path) -> None:
    module = MLPModule(optimizer_config(update_gap=1, targets=("fc1", "fc2")), blocks=2)
    logger = RecordingLogger(with_images=True)
    monitor = SubspaceOverlapMonitor(image_interval=2)
    make_trainer(tmp_path, 6, [SubspaceResampler(), monitor], logger).fit(module, regression_loader())
    images = logger.experiment.images
    # 5 refreshes with overlaps (steps 1..5): pictures at the 2nd and 4th, and the last one at the end.
    assert [(tag, step, fmt) for tag, _, step, fmt in images] == [
        (IMAGE_TAG, 2, "HWC"),
        (IMAGE_TAG, 4, "HWC"),
        (IMAGE_TAG, 5, "HWC"),
    ]
    for _, image, _, _ in images:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.shape[0] > 100
        assert image.std() > 0  # something was drawn


def test_loggers_without_add_image_are_skipped(tmp_path: Path) -> None:
    module = MLPModule(optimizer_config(update_gap=1))
    logger = RecordingLogger(with_images=False)
    make_trainer(tmp_path, 4, [SubspaceResampler(), SubspaceOverlapMonitor(image_interval=1)], logger).fit(
        module, regression_loader()
    )
    assert logger.steps("lowrank/overlap/mean") == [1, 2, 3]
    # No logger at all works too.
    make_trainer(tmp_path, 3, [SubspaceResampler(), SubspaceOverlapMonitor(image_interval=1)], False).fit(
        MLPModule(optimizer_config(update_gap=1)), regression_loader()
    )


def test_tensorboard_receives_scalars_and_the_picture(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = MLPModule(optimizer_config(update_gap=2))
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version="")
    make_trainer(tmp_path, 5, [SubspaceResampler(), SubspaceOverlapMonitor(image_interval=1)], logger).fit(
        module, regression_loader()
    )
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("lowrank/overlap/mean")] == [2, 4]
    assert [e.step for e in events.Scalars("lowrank/refresh_seconds")] == [0, 2, 4]
    assert [e.step for e in events.Images(IMAGE_TAG)] == [2, 4]


def test_render_handles_gaps_and_many_layers() -> None:
    cells = {(f"layers.{i}", kind): 0.5 for i in range(20) for kind in ("q_proj", "down_proj") if (i + len(kind)) % 3}
    history = [(10, {"q_proj": 0.4}), (20, {"q_proj": 0.5, "down_proj": 0.7})]
    image = render_overlap_figure(cells, history, {"q_proj": 0.25, "down_proj": 0.1}, 20)
    assert image.dtype == np.uint8 and image.shape[2] == 3


def test_the_monitor_needs_no_resampler(tmp_path: Path) -> None:
    # Without a SubspaceResampler the optimizer refreshes on its own schedule inside step(): the monitor, a refresh
    # listener of the optimizer, logs the same overlaps at the same steps as with the resampler.
    def run(root: Path, callbacks: list) -> RecordingLogger:
        module = MLPModule(optimizer_config(update_gap=2, stagger=2, selector="importance"), blocks=2)
        logger = RecordingLogger()
        make_trainer(root, 9, callbacks, logger).fit(module, regression_loader(samples=16, batch_size=4))
        return logger

    monitor = SubspaceOverlapMonitor(per_layer=True, image_interval=None)
    alone = run(tmp_path / "alone", [monitor])
    both = run(tmp_path / "both", [SubspaceResampler(), SubspaceOverlapMonitor(per_layer=True, image_interval=None)])
    # update_gap 2, stagger 2: layers.0 at 0, 2, 4, ...; layers.1 at 0 (first basis), 1, 3, 5, ...
    assert alone.steps("lowrank/overlap/mean") == list(range(1, 9))
    assert alone.steps("lowrank/refresh_seconds") == []
    assert both.steps("lowrank/refresh_seconds") == list(range(9))
    overlap_calls = [
        (step, metrics)
        for step, metrics in both.lowrank_calls()
        if any(k.startswith("lowrank/overlap") for k in metrics)
    ]
    assert alone.lowrank_calls() == overlap_calls
    assert monitor.num_refreshes == 8
