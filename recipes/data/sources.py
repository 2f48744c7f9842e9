"""Where documents come from: the embedded corpus, C4, or local text/JSONL files.

C4 and local files go through one code path, `open_stream`: `datasets.load_dataset(...,
streaming=True)`, reduced to its text column. C4 is `load_dataset("allenai/c4", "en", split=...)`;
local files are `load_dataset("json", data_files=...)` (or the `text` builder for `.txt` files), so
C4-formatted shards on disk (JSON lines with `text`, `timestamp`, `url`, optionally `.gz`) run through
exactly the code that streams C4 from the Hub, which is how the tests exercise it offline.

Sharding: `shard_for_rank` splits a stream between data-parallel ranks with
`datasets.distributed.split_dataset_by_node` (whole shards per rank when the shard count divides by
the world size, else every rank reads everything and keeps one example in `world_size`); inside a
rank, `datasets` itself hands each DataLoader worker a disjoint subset of that rank's shards.

Validation: C4 uses its `validation` split; local files use `val_files` when given; the embedded
corpus (and local files without `val_files`) hold out every `holdout_every`-th document
(`holdout_split`), deterministically.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import datasets
from datasets.distributed import split_dataset_by_node

from lowrank_recipes.recipes.data.config import C4_CONFIG, C4_DATASET  # noqa: F401 (read as sources.C4_DATASET too)

TEXT_FIELD = "text"

# File name endings -> the `datasets` builder that reads them (compressed forms are read transparently).
_BUILDERS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".txt": "text",
    ".txt.gz": "text",
}


@dataclass(frozen=True)
class StreamSpec:
    """Arguments of `datasets.load_dataset` for one document source.

    Attributes:
        path: a Hub dataset (`"allenai/c4"`) or a packaged builder (`"json"`, `"text"`).
        name: the dataset configuration (`"en"` for C4), None for builders.
        data_files: split name -> files, for local files; None for Hub datasets.
        text_field: the column holding the document text.
    """

    path: str = C4_DATASET
    name: str | None = C4_CONFIG
    data_files: dict[str, list[str]] | None = None
    text_field: str = TEXT_FIELD


def builder_for(files: Sequence[str]) -> str:
    """Returns the `datasets` builder ("json" or "text") shared by all `files`.

    Raises:
        ValueError: an unsupported ending, or files that need different builders.
    """
    builders = set()
    for f in files:
        ending = next((e for e in sorted(_BUILDERS, key=len, reverse=True) if f.endswith(e)), None)
        if ending is None:
            raise ValueError(f"data file {f!r} has an unsupported extension; accepted: {sorted(_BUILDERS)}")
        builders.add(_BUILDERS[ending])
    if len(builders) != 1:
        raise ValueError(f"data files must all be JSON lines or all be text, got builders {sorted(builders)}")
    return builders.pop()


def files_spec(train_files: Sequence[str], val_files: Sequence[str] | None = None) -> StreamSpec:
    """Returns the spec reading local files (splits "train" and, if given, "validation")."""
    if not train_files:
        raise ValueError("train_files is empty; give at least one .jsonl/.json(.gz) or .txt(.gz) file")
    builder = builder_for(list(train_files) + list(val_files or []))
    data_files = {"train": list(train_files)}
    if val_files:
        data_files["validation"] = list(val_files)
    return StreamSpec(path=builder, name=None, data_files=data_files)


def open_stream(spec: StreamSpec, split: str) -> datasets.IterableDataset:
    """Opens one split as a streaming `datasets.IterableDataset` with the single column "text".

    Args:
        spec: which dataset (C4 on the Hub or local files).
        split: "train" or "validation".

    Returns:
        The stream; nothing is read until it is iterated.
    """
    kwargs = {}
    if spec.path == "text":
        # One example per file, not per line: a text file is a document.
        kwargs["sample_by"] = "document"
    ds = datasets.load_dataset(spec.path, spec.name, split=split, data_files=spec.data_files, streaming=True, **kwargs)
    if spec.text_field != TEXT_FIELD:
        ds = ds.rename_column(spec.text_field, TEXT_FIELD)
    return ds.select_columns([TEXT_FIELD])


def shard_for_rank(ds: datasets.IterableDataset, rank: int, world_size: int) -> datasets.IterableDataset:
    """Returns rank `rank`'s part of a stream (`split_dataset_by_node`); the stream itself if world_size is 1."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if world_size == 1:
        return ds
    return split_dataset_by_node(ds, rank=rank, world_size=world_size)


def iter_texts(ds: datasets.IterableDataset) -> Iterator[str]:
    """Yields the non-empty texts of a stream."""
    for example in ds:
        text = example[TEXT_FIELD]
        if text:
            yield text


def read_documents(spec: StreamSpec, split: str, limit: int | None = None) -> list[str]:
    """Reads a (local) split fully into memory, in stream order, keeping at most `limit` documents."""
    docs = []
    for text in iter_texts(open_stream(spec, split)):
        if limit is not None and len(docs) >= limit:
            break
        docs.append(text)
    return docs


def holdout_split(documents: Sequence[str], holdout_every: int) -> tuple[list[str], list[str]]:
    """Splits documents deterministically: document i is held out when i % holdout_every == holdout_every - 1.

    Args:
        documents: all documents, in corpus order.
        holdout_every: k; every k-th document (the last of each group of k) goes to validation.

    Returns:
        (training documents, validation documents), each in corpus order.
    """
    if holdout_every < 2:
        raise ValueError(f"holdout_every must be >= 2, got {holdout_every}")
    train = [d for i, d in enumerate(documents) if i % holdout_every != holdout_every - 1]
    val = [d for i, d in enumerate(documents) if i % holdout_every == holdout_every - 1]
    return train, val
