"""The stdlib source corpus (``data.source: stdlib_code``): which files, how they are decoded, and the data module and
config around it."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowrank_recipes.recipes.config import ConfigError, load_run_config
from lowrank_recipes.recipes.data import code_corpus
from lowrank_recipes.recipes.data.code_corpus import code_files, load_code_corpus, read_source
from lowrank_recipes.recipes.data.corpus import corpus_hash, load_corpus, stdlib_root
from lowrank_recipes.recipes.data.datamodule import DataConfig, PretrainDataModule
from lowrank_recipes.recipes.data.tokenizer import embedded_tokenizer_path

from .conftest import SMALL_VOCAB

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


def _fake_stdlib(root: Path) -> None:
    files = {
        "b.py": "x = 1\n",
        "a.py": "# -*- coding: latin-1 -*-\nname = 'caf\xe9'\n",
        "pkg/__init__.py": '"""A package."""\n',
        "pkg/mod.py": "def f():\n    return 2\n",
        "idlelib/run.py": "print('kept: only test suites are left out')\n",
        "test/test_a.py": "assert False\n",
        "pkg/tests/test_b.py": "assert False\n",
        "site-packages/third.py": "third = 1\n",
        "__pycache__/a.cpython-311.py": "cached = 1\n",
        "blank.py": "   \n",
        "notes.txt": "not python\n",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        encoding = "latin-1" if rel == "a.py" else "utf-8"
        path.write_bytes(text.encode(encoding))
    (root / "broken.py").write_bytes(b"x = '\xff\xfe'\n")  # not UTF-8 and no coding cookie: skipped


def test_files_are_the_sources_without_test_suites_in_path_order(tmp_path: Path) -> None:
    _fake_stdlib(tmp_path)
    rel = [p.relative_to(tmp_path).as_posix() for p in code_files(tmp_path)]
    assert rel == sorted(rel)
    assert set(rel) == {"a.py", "b.py", "blank.py", "broken.py", "idlelib/run.py", "pkg/__init__.py", "pkg/mod.py"}


def test_documents_are_whole_files_decoded_as_python_does(tmp_path: Path) -> None:
    _fake_stdlib(tmp_path)
    docs = load_code_corpus(tmp_path)
    # a.py (latin-1 cookie), b.py, idlelib/run.py, pkg/__init__.py, pkg/mod.py; blank.py and broken.py are skipped
    assert docs == [
        "# -*- coding: latin-1 -*-\nname = 'caf\xe9'\n",
        "x = 1\n",
        "print('kept: only test suites are left out')\n",
        '"""A package."""\n',
        "def f():\n    return 2\n",
    ]
    assert read_source(tmp_path / "broken.py") is None and read_source(tmp_path / "missing.py") is None
    assert load_code_corpus(tmp_path, limit=2) == docs[:2]


def test_the_real_corpus_is_large_deterministic_and_not_the_docstring_corpus() -> None:
    root = stdlib_root()
    rel = [p.relative_to(root).as_posix() for p in code_files()]
    assert "argparse.py" in rel and "json/decoder.py" in rel
    assert not any(part in code_corpus.CODE_EXCLUDED_DIRS for r in rel for part in r.split("/")[:-1])
    first = load_code_corpus(limit=5)
    assert first == load_code_corpus(limit=5) and first[0] == read_source(code_files()[0])
    docs = load_code_corpus()
    assert sum(map(len, docs)) > 5_000_000  # about 12M characters under CPython 3.11
    assert corpus_hash(docs[:5]) != corpus_hash(load_corpus(limit=5))


def test_data_module_trains_its_own_tokenizer_on_the_source_files(tmp_path: Path) -> None:
    config = DataConfig(
        source="stdlib_code",
        max_documents=8,
        holdout_every=4,
        vocab_size=SMALL_VOCAB,
        seq_len=32,
        micro_batch_size=4,
        seed=1,
        cache_dir=str(tmp_path),
    )
    dm = PretrainDataModule(config, rank=0, world_size=1)
    dm.prepare_data()
    dm.setup("fit")
    docs = load_code_corpus(limit=8)
    assert dm.corpus_hash == corpus_hash(docs)
    # the BPE is cached under the source corpus's hash: the docstring corpus's tokenizer is another file
    assert embedded_tokenizer_path(docs, SMALL_VOCAB, tmp_path).is_file()
    assert not embedded_tokenizer_path(load_corpus(limit=8), SMALL_VOCAB, tmp_path).exists()
    # training text: documents 0, 1, 2, 4, 5, 6 (3 and 7 are held out), packed with an end-of-document id each
    tokens = sum(len(dm.tokenizer.encode(d)) + 1 for i, d in enumerate(docs) if i % 4 != 3)
    assert len(dm.train_set) == tokens // 33
    val_tokens = sum(len(dm.tokenizer.encode(d)) + 1 for i, d in enumerate(docs) if i % 4 == 3)
    assert len(dm.val_set) == val_tokens // 33
    batch = next(iter(dm.train_dataloader()))
    assert dm.tokenizer.decode(batch["input_ids"][0].tolist()) in "".join(docs)


def test_config_accepts_the_source_and_refuses_files_with_it(tmp_path: Path) -> None:
    run, _ = load_run_config("default", ["data.source=stdlib_code", f"out_dir={tmp_path / 'a'}"])
    assert run.data.source == "stdlib_code"
    train = tmp_path / "train.txt"
    train.write_text("some text\n")
    with pytest.raises(ConfigError, match=r"data.train_files / data.val_files: set, but data.source is 'stdlib_code'"):
        load_run_config("default", ["data.source=stdlib_code", f"data.train_files=[{train}]"])
    with pytest.raises((ConfigError, ValueError), match=r"stdlib_code"):  # the accepted values are listed
        load_run_config("default", ["data.source=stdlib"])
