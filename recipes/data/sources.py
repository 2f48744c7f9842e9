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

Content errors: a record the reader cannot read (invalid JSON, invalid UTF-8, a truncated gzip, a `text` that is
missing or not a string) raises `DataContentError` (one paragraph: the file and row where known, the cause, the fix),
in `open_stream` or `iter_texts`, whichever meets it first; local files up to `LOCATE_BYTES` are then read whole
again (`file_check.scan`) to name the file and row.

Validation: C4 uses its `validation` split; local files use `val_files` when given; the embedded
corpus (and local files without `val_files`) hold out every `holdout_every`-th document
(`holdout_split`), deterministically.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lowrank_recipes.recipes.data.config import C4_CONFIG, C4_DATASET  # noqa: F401 (read as sources.C4_DATASET too)
from lowrank_recipes.recipes.data.file_check import SCAN_COMMAND, DataContentError, scan
from lowrank_recipes.recipes.data.formats import ACCEPTED, file_kind

TEXT_FIELD = "text"
# What the reader raises on content it cannot read: invalid JSON and failed casts (pyarrow, ValueError), invalid UTF-8
# (UnicodeDecodeError), a gzip file cut short (EOFError) or corrupt (zlib.error; BadGzipFile, an OSError), a missing
# text column (ValueError). OSError counts for local files only (it also covers one that went away during the run): from
# the Hub it is the network's, and stays as it is.
if TYPE_CHECKING:  # `datasets` (and pyarrow) load only when a stream opens: the embedded path runs without them
    import datasets


def content_errors() -> tuple[type[BaseException], ...]:
    """What a reader raises on a bad record (pyarrow's errors included: imported here, with `datasets`)."""
    import pyarrow as pa

    return (ValueError, EOFError, zlib.error, pa.ArrowException)


def read_errors() -> tuple[type[BaseException], ...]:
    return (*content_errors(), OSError)


# A reader error in local files this large in all (bytes on disk) is located by reading them whole again
# (`Origin.locate`); larger sets get the scan command to run instead.
LOCATE_BYTES = 1 << 30


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
    """Returns the `datasets` builder ("json" or "text") shared by all `files` (the table of
    `recipes.data.formats`, which the config check uses too).

    Raises:
        ValueError: an unsupported ending, or files that need different builders.
    """
    builders = set()
    for f in files:
        kind = file_kind(f)
        if kind is None:
            raise ValueError(f"data file {f!r} has an unsupported extension; accepted: {ACCEPTED}")
        builders.add(kind)
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
        The stream; nothing is read until it is iterated, except what `datasets` reads to find the columns.

    Raises:
        DataContentError: the first records cannot be read, or they hold no "text" column.
    """
    kwargs = {}
    if spec.path == "text":
        # One example per file, not per line: a text file is a document.
        kwargs["sample_by"] = "document"
    # Local files: what fails here is the files' content (datasets reads the first records to find the columns). A
    # Hub dataset's errors (network, names) are left as they are, but for a missing text column.
    errors = read_errors() if spec.data_files is not None else (ValueError,)
    try:
        import datasets

        ds = datasets.load_dataset(
            spec.path, spec.name, split=split, data_files=spec.data_files, streaming=True, **kwargs
        )
        if spec.text_field != TEXT_FIELD:
            ds = ds.rename_column(spec.text_field, TEXT_FIELD)
        return ds.select_columns([TEXT_FIELD])
    except errors as err:
        raise content_error(origin(spec, split), _cause(err)) from err


def shard_for_rank(ds: datasets.IterableDataset, rank: int, world_size: int) -> datasets.IterableDataset:
    """Returns rank `rank`'s part of a stream (`split_dataset_by_node`); the stream itself if world_size is 1."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if world_size == 1:
        return ds
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(ds, rank=rank, world_size=world_size)


@dataclass(frozen=True)
class Origin:
    """What a stream reads, for its error messages.

    Attributes:
        name: the config key of local files (`data.train_files`, `data.val_files`), or the Hub dataset and split.
        files: the local files, in order; empty for a Hub dataset.
    """

    name: str
    files: tuple[str, ...] = ()

    def __str__(self) -> str:
        if not self.files:
            return self.name
        more = f" and {len(self.files) - 3} more" if len(self.files) > 3 else ""
        return f"{self.name} ({', '.join(self.files[:3])}{more})"

    def locate(self) -> str | None:
        """The first content problem of the files read whole (`file_check.scan`), as ``key: file, row N: cause;
        fix``; None when every file reads, or when the files hold more than `LOCATE_BYTES` (a C4-sized set would take
        hours: the message then points to the scan command instead)."""
        if not self.files or sum(os.path.getsize(f) for f in self.files if os.path.isfile(f)) > LOCATE_BYTES:
            return None
        for path in self.files:
            problem = scan(path).problem
            if problem is not None:
                return f"{self.name}: {path}, {problem}"
        return None


def origin(spec: StreamSpec, split: str) -> Origin:
    """What `open_stream(spec, split)` reads (`Origin`)."""
    if spec.data_files is None:
        return Origin(f"{spec.path} ({spec.name}), split {split}")
    key = "data.val_files" if split == "validation" else "data.train_files"
    return Origin(key, tuple(spec.data_files.get(split, [])))


def content_error(where: Origin, cause: str) -> DataContentError:
    """One paragraph for a record the reader failed on: the file and row when `where.locate()` finds them, else the
    data, the reader's cause and the fix (the scan that names the file and row); checkpoints are kept either way."""
    located = where.locate()
    if located is not None:
        return DataContentError(f"{located}; checkpoints written so far are kept")
    if not where.files:
        fix = "resume=auto continues from the last checkpoint; a record that fails again is the data set's own"
        return DataContentError(
            f"{where}: the reader failed on a record ({cause}); checkpoints written so far are kept; {fix}"
        )
    return DataContentError(
        f"{where}: the reader failed on a record that the pre-flight check did not reach ({cause}); fix: "
        f"`{SCAN_COMMAND} FILE ...` reads every record and names the file and row, then repair or remove it; "
        "checkpoints written so far are kept (resume=auto continues from the last one)"
    )


def _cause(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def iter_texts(ds: Iterable[dict[str, Any]], where: Origin = Origin("the data")) -> Iterator[str]:
    """Yields the non-empty texts of a stream, in order.

    Args:
        ds: the stream (`open_stream`, `shard_for_rank`).
        where: what it reads (`origin`), named in errors.

    Raises:
        DataContentError: the reader failed on a record, or a record's text is missing (null) or not a string.
    """
    examples = iter(ds)
    caught = read_errors() if where.files else content_errors()
    while True:
        try:
            example = next(examples)
        except StopIteration:
            return
        except caught as err:
            raise content_error(where, _cause(err)) from err
        text = example[TEXT_FIELD]
        if not isinstance(text, str):
            kind = "missing (null)" if text is None else f"a {type(text).__name__}, not a string"
            raise content_error(where, f"a record's {TEXT_FIELD!r} is {kind}")
        if text:
            yield text


def read_documents(spec: StreamSpec, split: str, limit: int | None = None) -> list[str]:
    """Reads a (local) split fully into memory, in stream order, keeping at most `limit` documents.

    Raises:
        DataContentError: a record cannot be read (`iter_texts`).
    """
    docs = []
    for text in iter_texts(open_stream(spec, split), origin(spec, split)):
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
