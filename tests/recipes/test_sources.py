"""Tests of the document sources: local C4-formatted shards through the C4 stream code, rank sharding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from lowrank_recipes.recipes.data import sources
from lowrank_recipes.recipes.data.sources import (
    StreamSpec,
    files_spec,
    holdout_split,
    iter_texts,
    open_stream,
    shard_for_rank,
)


def all_texts(paths: list[str]) -> list[str]:
    texts = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f)
    return texts


def test_local_c4_shards_stream_like_c4(c4_shards: dict[str, list[str]]) -> None:
    spec = files_spec(c4_shards["train"], c4_shards["validation"])
    assert spec == StreamSpec(
        path="json", name=None, data_files={"train": c4_shards["train"], "validation": c4_shards["validation"]}
    )
    train = open_stream(spec, "train")
    assert train.n_shards == 4
    assert list(iter_texts(train)) == all_texts(c4_shards["train"])
    assert list(iter_texts(open_stream(spec, "validation"))) == all_texts(c4_shards["validation"])
    assert next(iter(train)).keys() == {"text"}  # timestamp and url dropped


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_are_disjoint_and_cover_everything(c4_shards: dict[str, list[str]], world_size: int) -> None:
    # 4 shards: split by whole shards for 2 ranks, by examples (every 3rd) for 3 ranks.
    stream = open_stream(files_spec(c4_shards["train"]), "train")
    per_rank = [list(iter_texts(shard_for_rank(stream, r, world_size))) for r in range(world_size)]
    seen = [t for texts in per_rank for t in texts]
    assert len(seen) == len(set(seen))
    assert sorted(seen) == sorted(all_texts(c4_shards["train"]))
    assert all(per_rank)


def test_workers_split_a_rank_shard(c4_shards: dict[str, list[str]]) -> None:
    # Inside a rank, `datasets` gives each DataLoader worker its own shards.
    rank0 = shard_for_rank(open_stream(files_spec(c4_shards["train"]), "train"), 0, 2)
    loader = DataLoader(rank0, batch_size=None, num_workers=2)
    texts = [example["text"] for example in loader]
    assert sorted(texts) == sorted(iter_texts(rank0))
    assert len(texts) == len(set(texts)) == 24


def test_text_files_are_one_document_each(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"line one of {i}\nline two of {i}\n")
    files = sorted(str(p) for p in tmp_path.glob("*.txt"))
    docs = sources.read_documents(files_spec(files), "train")
    assert docs == [f"line one of {i}\nline two of {i}\n" for i in range(3)]


def test_builder_errors_name_accepted_values() -> None:
    with pytest.raises(ValueError, match=r"unsupported extension; accepted: \['.json'"):
        files_spec(["data.csv"])
    with pytest.raises(ValueError, match="all be JSON lines or all be text"):
        files_spec(["a.jsonl", "b.txt"])
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\)"):
        shard_for_rank(None, 2, 2)  # type: ignore[arg-type]


def test_holdout_split_every_kth() -> None:
    docs = [str(i) for i in range(10)]
    train, val = holdout_split(docs, 4)
    assert val == ["3", "7"]
    assert train == ["0", "1", "2", "4", "5", "6", "8", "9"]
    with pytest.raises(ValueError, match="holdout_every must be >= 2"):
        holdout_split(docs, 1)
