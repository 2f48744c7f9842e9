"""Every bad input the recipe refuses, run through ``main(argv)`` in this process: a non-zero exit, one paragraph on
stderr naming the key or file, no traceback, and ``out_dir`` exactly as it was (absent stays absent).

The catalogue holds the config and data mistakes caught before anything is written (``load_run_config``: the YAML,
the keys, the trainer, the tokenizer, the data files' names and first records, the output folder, the checkpoint to
resume). A bad record past the pre-flight sample is met during the run: those tests check the same kind of message,
exit 2 and the checkpoints kept.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lowrank_recipes.recipes.checkpoints import checkpoint_problem
from lowrank_recipes.recipes.config import CONFIG_DIR, load_run_config
from lowrank_recipes.recipes.data import file_check
from lowrank_recipes.recipes.data.packing import ENCODE_BATCH
from lowrank_recipes.recipes.pretrain import main

from .test_pretrain import TINY

UNSET = "LOWRANK_CATALOGUE_UNSET"


def _documents(n: int, start: int = 0) -> str:
    """``n`` JSON-lines records of about 120 characters each."""
    return "".join(json.dumps({"text": f"document {start + i}: " + "lorem ipsum dolor " * 6}) + "\n" for i in range(n))


def _write(path: Path, content: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _files(
    tmp: Path,
    train: str | bytes | None = None,
    name: str = "train.jsonl",
    val: str | bytes | None = None,
    val_name: str = "val.jsonl",
) -> list[str]:
    """Overrides of a ``files`` run over ``tmp/data``: a training and a validation file, good unless given."""
    train_file = _write(tmp / "data" / name, _documents(40) if train is None else train)
    val_file = _write(tmp / "data" / val_name, _documents(8, start=100) if val is None else val)
    return ["data.source=files", f"data.train_files=[{train_file}]", f"data.val_files=[{val_file}]"]


def _yaml_with(tmp: Path, line: str) -> list[str]:
    """``--config`` of the default config with ``seed: 0`` replaced by ``line``."""
    text = (CONFIG_DIR / "default.yaml").read_text().replace("seed: 0", line)
    return ["--config", _write(tmp / "bad.yaml", text)]


def _gzip_cut() -> bytes:
    whole = gzip.compress(_documents(60).encode())
    return whole[: len(whole) // 2]


def _gzip_corrupt() -> bytes:
    whole = bytearray(gzip.compress(_documents(60).encode()))
    whole[20:60] = bytes(40)  # header intact, deflate data zeroed
    return bytes(whole)


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _checkpoint_dir(tmp: Path) -> str:
    folder = _folder(tmp / "not_a_checkpoint")
    _write(folder / "notes.txt", "hello")
    return str(folder)


@dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
        make: (tmp folder, out_dir) -> the arguments of ``main`` (``out_dir=`` is added unless they hold one); may
            create files under the tmp folder.
        needles: what the message must hold; ``{tmp}`` stands for the tmp folder.
        out: out_dir, relative to the tmp folder.
        prepare: gets the monkeypatch and the tmp folder first (environment, machine, existing outputs).
    """

    make: Callable[[Path, Path], list[str]]
    needles: tuple[str, ...]
    out: str = "run"
    prepare: Callable[[pytest.MonkeyPatch, Path], None] | None = None


def _no_gpu(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _unset(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    monkeypatch.delenv(UNSET, raising=False)


def _old_checkpoints(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    _write(tmp / "run" / "checkpoints" / "step=000002.ckpt", b"an earlier run's checkpoint")
    _write(tmp / "run" / "config.yaml", "seed: 0\n")


def _file_as_parent(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    _write(tmp / "taken", "a file where a folder would go")


def _checkpoints_a_file(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    _write(tmp / "run" / "checkpoints", "a file where the checkpoints folder goes")


def _read_only_parent(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """``tmp/ro`` refuses writing as os.access sees it (tests run as root, whom permission bits do not stop)."""
    (tmp / "ro").mkdir()
    real = os.access

    def access(path: object, mode: int, *args: object, **kwargs: object) -> bool:
        if Path(str(path)) == tmp / "ro" and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", access)


def _chmod_read_only(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)


def _tokenizer_file(tmp: Path) -> str:
    from lowrank_recipes.recipes.data.corpus import load_corpus
    from lowrank_recipes.recipes.data.tokenizer import embedded_tokenizer

    tokenizer = embedded_tokenizer(load_corpus(limit=120), 384, tmp / "cache")
    path = tmp / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tokenizer.tokenizer.save(str(path))
    return str(path)


CASES: dict[str, Case] = {
    # the YAML and its keys
    "yaml-unknown-interpolation": Case(
        lambda tmp, out: _yaml_with(tmp, "seed: ${oops}"), ("{tmp}/bad.yaml", "seed:", "oops", "oc.env")
    ),
    "yaml-env-interpolation": Case(
        lambda tmp, out: _yaml_with(tmp, "seed: ${env:" + UNSET + "}"),
        ("{tmp}/bad.yaml", "seed:", "${oc.env:NAME}"),
        prepare=_unset,
    ),
    "yaml-unset-environment-variable": Case(
        lambda tmp, out: _yaml_with(tmp, "seed: ${oc.env:" + UNSET + "}"),
        ("{tmp}/bad.yaml", "seed:", UNSET, "${oc.env:NAME,default}"),
        prepare=_unset,
    ),
    "override-unknown-interpolation": Case(lambda tmp, out: ["seed=${oops}"], ("seed:", "oops")),
    "unknown-key": Case(lambda tmp, out: ["trainer.max_stepz=3"], ("trainer.max_stepz", "trainer.max_steps")),
    "wrongly-nested-key": Case(lambda tmp, out: ["lowrank.rank=4"], ("unknown key lowrank", "optimizer.lowrank.rank")),
    "moved-key": Case(lambda tmp, out: ["subspace.update_gap=5"], ("subspace", "optimizer.refresh.update_gap")),
    "moved-key-stagger": Case(lambda tmp, out: ["subspace.stagger=2"], ("subspace.stagger", "optimizer.refresh")),
    # model, optimizer and trainer values
    "infinite-lr": Case(lambda tmp, out: ["optimizer.lr=.inf"], ("optimizer.lr", "finite number > 0")),
    "data-vocab-above-model-vocab": Case(
        lambda tmp, out: ["data.vocab_size=8192"], ("data.vocab_size: 8192 exceeds model.vocab_size = 384",)
    ),
    "data-vocab-below-bpe-minimum": Case(lambda tmp, out: ["data.vocab_size=100"], ("data.vocab_size", ">= 258")),
    "unknown-accelerator": Case(
        lambda tmp, out: ["trainer.accelerator=tpu9"], ("trainer.accelerator", "'tpu9'", "auto | cpu | gpu")
    ),
    "gpu-on-a-machine-without": Case(
        lambda tmp, out: ["trainer.accelerator=gpu"],
        ("trainer.accelerator: 'gpu'", "no GPU", "auto | cpu"),
        prepare=_no_gpu,
    ),
    "cuda-on-a-machine-without": Case(
        lambda tmp, out: ["trainer.accelerator=cuda"], ("trainer.accelerator: 'cuda'", "no GPU"), prepare=_no_gpu
    ),
    "negative-limit-val-batches": Case(
        lambda tmp, out: ["trainer.limit_val_batches=-1"], ("trainer.limit_val_batches", ">= 0")
    ),
    "negative-gradient-clip": Case(
        lambda tmp, out: ["trainer.gradient_clip_val=-1.0"], ("trainer.gradient_clip_val", "null (off)")
    ),
    "per-layer-with-accumulation": Case(
        lambda tmp, out: ["trainer.per_layer_updates=true", "trainer.global_batch_size=8"],
        ("trainer.global_batch_size: 8", "per_layer_updates", "trainer.global_batch_size=4"),
    ),
    "per-layer-with-global-clipping": Case(
        lambda tmp, out: ["trainer.per_layer_updates=true", "trainer.gradient_clip_val=1.0"],
        ("trainer.gradient_clip_val: 1.0", "per_layer_clip_norm"),
    ),
    "per-layer-with-ddp": Case(
        lambda tmp, out: [
            "trainer.per_layer_updates=true",
            "trainer.strategy=ddp",
            "trainer.devices=2",
            "trainer.global_batch_size=8",
        ],
        ("trainer.per_layer_updates", "devices=2", "trainer.devices=1"),
    ),
    # tokenizer
    "tokenizer-path-missing": Case(
        lambda tmp, out: [f"data.tokenizer={tmp}/missing/tokenizer.json"],
        ("data.tokenizer", "missing/tokenizer.json", "does not exist", "t5-base"),
    ),
    "tokenizer-relative-path-missing": Case(
        lambda tmp, out: ["data.tokenizer=./no_such_tokenizer"], ("data.tokenizer", "./no_such_tokenizer")
    ),
    "tokenizer-under-a-local-folder-missing": Case(
        lambda tmp, out: [f"data.tokenizer={_folder(tmp / 'tokenizers').name}/t5"],  # cwd: tmp
        ("data.tokenizer", "'tokenizers/t5'", "does not exist"),
    ),
    "tokenizer-vocab-above-model-vocab": Case(
        lambda tmp, out: [f"data.tokenizer={_tokenizer_file(tmp)}", "model.vocab_size=300"],
        ("model.vocab_size: 300", "{tmp}/tok/tokenizer.json", ">= 384"),
    ),
    # data files: names
    "embedded-with-train-files": Case(
        lambda tmp, out: [f"data.train_files=[{_write(tmp / 'a.jsonl', _documents(3))}]"],
        ("data.train_files", "'embedded'", "data.source=files"),
    ),
    "unsupported-extension": Case(
        lambda tmp, out: _files(tmp, name="train.csv"), ("data.train_files", "train.csv", "'.jsonl'")
    ),
    "a-folder-as-file": Case(
        lambda tmp, out: [*_files(tmp)[:2], f"data.val_files=[{tmp}]"], ("data.val_files", "folders", "{tmp}")
    ),
    "json-lines-mixed-with-text": Case(
        lambda tmp, out: _files(tmp, val_name="val.txt", val="held-out text " * 20),
        ("data.train_files / data.val_files", "val.txt", "mixed"),
    ),
    # data files: content (the first records)
    "empty-validation-file": Case(
        lambda tmp, out: _files(tmp, val=""), ("data.val_files", "{tmp}/data/val.jsonl", "no document")
    ),
    "invalid-json": Case(
        lambda tmp, out: _files(tmp, _documents(2) + "{broken\n" + _documents(2)),
        ("data.train_files", "{tmp}/data/train.jsonl", "row 3", "invalid JSON"),
    ),
    "record-without-text": Case(
        lambda tmp, out: _files(tmp, _documents(1) + '{"url": "https://example.com"}\n'),
        ("{tmp}/data/train.jsonl", "row 2", "no 'text' field"),
    ),
    "text-not-a-string": Case(
        lambda tmp, out: _files(tmp, '{"text": 5}\n' + _documents(3)),
        ("{tmp}/data/train.jsonl", "row 1", "'text' is a JSON int"),
    ),
    "not-utf8": Case(
        lambda tmp, out: _files(tmp, _documents(2).encode() + b'{"text": "caf\xe9"}\n'),
        ("{tmp}/data/train.jsonl", "row 3", "not UTF-8"),
    ),
    "truncated-gzip": Case(
        lambda tmp, out: _files(tmp, _gzip_cut(), name="train.jsonl.gz"),
        ("{tmp}/data/train.jsonl.gz", "truncated gzip"),
    ),
    "corrupt-gzip": Case(
        lambda tmp, out: _files(tmp, _gzip_corrupt(), name="train.jsonl.gz"),
        ("{tmp}/data/train.jsonl.gz", "corrupt gzip"),
    ),
    "not-gzip": Case(
        lambda tmp, out: _files(tmp, _documents(3), name="train.jsonl.gz"),
        ("{tmp}/data/train.jsonl.gz", "not a gzip file"),
    ),
    "texts-too-short": Case(
        lambda tmp, out: _files(tmp, '{"text": "too short"}\n'), ("data.train_files", "train.jsonl", "rough check")
    ),
    "validation-too-short": Case(
        lambda tmp, out: _files(tmp, val='{"text": "short"}\n'),
        ("data.val_files", "val.jsonl", "no val/loss", "rough check"),
    ),
    # outputs and resume
    "empty-out-dir": Case(lambda tmp, out: ["out_dir=''"], ("out_dir: empty",)),
    "out-dir-under-a-file": Case(
        lambda tmp, out: [], ("out_dir", "{tmp}/taken", "is a file"), out="taken/run", prepare=_file_as_parent
    ),
    "checkpoints-is-a-file": Case(
        lambda tmp, out: [], ("out_dir", "{tmp}/run/checkpoints", "is a file"), prepare=_checkpoints_a_file
    ),
    "out-dir-read-only": Case(
        lambda tmp, out: [], ("out_dir", "{tmp}/ro", "read-only"), out="ro/run", prepare=_read_only_parent
    ),
    "resume-never-over-checkpoints": Case(
        lambda tmp, out: ["resume=never"], ("resume: never", "already holds checkpoints"), prepare=_old_checkpoints
    ),
    "resume-missing": Case(lambda tmp, out: [f"resume={tmp}/nothing.ckpt"], ("resume", "does not exist")),
    "resume-a-folder-not-a-checkpoint": Case(
        lambda tmp, out: [f"resume={_checkpoint_dir(tmp)}"],
        ("resume", "{tmp}/not_a_checkpoint", "not a usable checkpoint", ".metadata"),
    ),
    "resume-a-file-not-a-checkpoint": Case(
        lambda tmp, out: [f"resume={_write(tmp / 'notes.ckpt', 'not a checkpoint')}"],
        ("resume", "{tmp}/notes.ckpt", "not a usable checkpoint"),
    ),
}


def _listing(root: Path) -> dict[str, tuple[int, int]] | None:
    """Every path under ``root`` with its size and modification time; None when ``root`` does not exist."""
    if not root.exists():
        return None
    if root.is_file():
        return {".": (root.stat().st_size, root.stat().st_mtime_ns)}
    paths = [root, *sorted(root.rglob("*"))]
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in paths}


def _check_refused(case: Case, tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp)
    if case.prepare is not None:
        case.prepare(monkeypatch, tmp)
    out = tmp / case.out
    args = case.make(tmp, out)
    config = args[:2] if args[:1] == ["--config"] else []
    overrides = [*TINY, *args[len(config) :]]  # the case's own overrides come last, and win
    if not any(a.startswith("out_dir=") for a in overrides):
        overrides.append(f"out_dir={out}")
    watched = tmp / case.out.split("/")[0]  # the folder the run would create, or the file in its way
    before = _listing(watched)
    code = main([*config, *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for needle in case.needles:
        needle = needle.replace("{tmp}", str(tmp))
        assert needle in err, (needle, err)
    assert _listing(watched) == before, "out_dir changed"


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_before_anything_is_written(name, tmp_path, monkeypatch, capsys):
    _check_refused(CASES[name], tmp_path, monkeypatch, capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder (the os.access case covers it)")
def test_a_read_only_parent_is_refused(tmp_path, monkeypatch, capsys):
    case = Case(lambda tmp, out: [], ("out_dir", "{tmp}/ro", "read-only"), out="ro/run", prepare=_chmod_read_only)
    try:
        _check_refused(case, tmp_path, monkeypatch, capsys)
    finally:
        (tmp_path / "ro").chmod(0o755)


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.accelerator=auto"],
        ["trainer.accelerator=cpu", "trainer.limit_val_batches=0"],
        ["data.tokenizer=t5-base"],  # a Hub name: not looked up
        ["data.tokenizer=google/t5-v1_1-base"],
        ["trainer.per_layer_updates=true", "trainer.gradient_clip_val=0.0", "trainer.per_layer_clip_norm=1.0"],
        ["trainer.strategy=ddp", "trainer.devices=2", "trainer.global_batch_size=8"],
    ],
    ids=["auto", "cpu-no-validation", "hub-name", "hub-namespace-name", "per-layer", "ddp"],
)
def test_accepted_values_stay_accepted(tmp_path, monkeypatch, overrides):
    _no_gpu(monkeypatch, tmp_path)
    load_run_config("default", [*TINY, *overrides, f"out_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()


def test_good_files_pass_the_preflight(tmp_path):
    overrides = _files(tmp_path, gzip.compress(_documents(40).encode()), name="train.jsonl.gz")
    run, _ = load_run_config("default", [*TINY, *overrides, f"out_dir={tmp_path / 'run'}"])
    assert run.data.train_files == [str(tmp_path / "data" / "train.jsonl.gz")]


def test_the_preflight_reads_only_the_first_records(tmp_path):
    """A bad row past the sample is not seen up front (the reader meets it during the run); the full scan finds it."""
    path = _write(tmp_path / "big.jsonl", _documents(file_check.SAMPLE_RECORDS + 20) + "{broken\n")
    assert file_check.preflight(path).problem is None and not file_check.preflight(path).complete
    problem = file_check.scan(path).problem
    assert problem is not None and problem.startswith(f"row {file_check.SAMPLE_RECORDS + 21}: invalid JSON")
    assert file_check.main([path]) == 1


def test_data_content_error_drops_a_worker_traceback():
    """torch re-raises a DataLoader worker's exception with the worker's traceback as the message."""
    paragraph = "data.train_files: /x/a.jsonl, row 9: invalid JSON (...); fix: ..."
    worker = (
        "Caught DataContentError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "stream.py", line 1, in _texts\n'
        f"lowrank_recipes.recipes.data.file_check.DataContentError: {paragraph}\n"
    )
    assert str(file_check.DataContentError(worker)) == paragraph


def _error_line(err: str) -> str:
    """The recipe's last ``error: ...`` paragraph (the progress bar may share its line: it ends without a newline)."""
    assert "error: " in err, err
    return "error: " + err.rsplit("error: ", 1)[1].splitlines()[0]


@pytest.fixture
def logs_to_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's and `datasets`' log handlers hold the stderr of the test that first imported them (closed since,
    so that logging prints "--- Logging error ---" with a traceback): point them at this test's captured stderr."""
    loggers = [
        logging.getLogger(),
        *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)),
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler:
                monkeypatch.setattr(handler, "stream", sys.stderr)


def _stream_overrides(tmp: Path, out: Path) -> list[str]:
    """C4-formatted local shards: a good one (three groups of documents the stream tokenizes together), then one
    whose bad row lies past the pre-flight sample."""
    short = "".join(json.dumps({"text": f"doc {i} lorem ipsum"}) + "\n" for i in range(3 * ENCODE_BATCH))
    good = _write(tmp / "c4" / "c4-train.00000-of-00002.json", short)
    rows = file_check.SAMPLE_RECORDS + 10
    bad = _write(tmp / "c4" / "c4-train.00001-of-00002.json", _documents(rows, start=500) + "{broken\n")
    val = _write(tmp / "c4" / "c4-validation.00000-of-00001.json", _documents(8, start=900))
    return [
        *TINY,
        "data.source=c4",
        f"data.train_files=[{good},{bad}]",
        f"data.val_files=[{val}]",
        "trainer.max_steps=200",
        "trainer.checkpoint_every_n_steps=5",
        "trainer.val_every_n_steps=1000",
        f"out_dir={out}",
    ]


@pytest.mark.parametrize("workers", [0, 1], ids=["main-process", "worker"])
@pytest.mark.usefixtures("logs_to_capture")
def test_a_bad_row_met_during_training_stops_the_run_and_keeps_the_checkpoints(tmp_path, capsys, workers):
    out = tmp_path / "run"
    code = main([*_stream_overrides(tmp_path, out), f"data.num_workers={workers}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    last = _error_line(err)
    bad = tmp_path / "c4" / "c4-train.00001-of-00002.json"
    assert last.startswith(f"error: data.train_files: {bad}, row {file_check.SAMPLE_RECORDS + 11}: invalid JSON"), last
    assert "checkpoints written so far are kept" in last, last
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "last.ckpt" in saved and len(saved) > 1, saved
    assert all(checkpoint_problem(out / "checkpoints" / name) is None for name in saved)


@pytest.mark.usefixtures("logs_to_capture")
def test_a_bad_row_of_files_read_whole_names_the_file_and_row(tmp_path, capsys):
    rows = file_check.SAMPLE_RECORDS + 20
    overrides = _files(tmp_path, _documents(rows) + "{broken\n")
    code = main([*TINY, *overrides, f"out_dir={tmp_path / 'run'}", "trainer.max_steps=2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    last = _error_line(err)
    assert last.startswith(f"error: data.train_files: {tmp_path}/data/train.jsonl, row {rows + 1}: invalid JSON"), last


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_exit_status_of_a_config_error_in_a_subprocess(tmp_path):
    config = _yaml_with(tmp_path, "seed: ${oops}")[1]
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "pretrain.py"), "--config", config, f"out_dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: --config: {config}: seed:"), result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_exit_status_of_a_content_error_during_the_run_in_a_subprocess(tmp_path):
    rows = file_check.SAMPLE_RECORDS + 20
    overrides = _files(tmp_path, _documents(rows) + "{broken\n")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "pretrain.py"), *TINY, *overrides, f"out_dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"row {rows + 1}: invalid JSON" in _error_line(result.stderr), result.stderr


@pytest.mark.usefixtures("logs_to_capture")
def test_a_reader_error_in_files_too_large_to_read_again_points_to_the_scan(tmp_path, monkeypatch):
    from lowrank_recipes.recipes.data import sources

    monkeypatch.setattr(sources, "LOCATE_BYTES", 0)
    path = _write(tmp_path / "a.jsonl", _documents(3) + "{broken\n")
    with pytest.raises(file_check.DataContentError) as info:
        sources.read_documents(sources.files_spec([path]), "train")
    message = str(info.value)
    assert message.startswith(f"data.train_files ({path}): the reader failed on a record"), message
    assert file_check.SCAN_COMMAND in message and "checkpoints written so far are kept" in message, message
