"""The streaming training set (C4, or local C4-formatted shards): packed on the fly, resumable.

`PackedStream` reads this rank's part of a `datasets` stream (`recipes.data.sources.shard_for_rank`;
inside a DataLoader worker, `datasets` narrows it further to that worker's shards), tokenizes
documents in groups, and yields `seq_len + 1`-token chunks split into inputs and labels
(`recipes.data.packing.StreamPacker`). When the data runs out it starts another pass (reshuffled
when `shuffle_buffer > 0`), so the stream never ends: pretraining runs are bounded by steps.

Resume: `state_dict()` holds the `datasets` stream position (shard and example offset), the tokens
packed but not yet emitted, and the pass number. `torchdata`'s `StatefulDataLoader` collects it from
each worker with every batch, so a checkpoint restores each worker exactly where it stopped (same
`num_workers` required). `shuffle_buffer > 0` gives up exactness: `datasets` does not save the
shuffle buffer's content.

Passes and epochs: each iteration (one per DataLoader worker) reads a private copy of the stream
(`_private_stream`) and sets *that* copy's `datasets` epoch to its own pass number. It must not call
`set_epoch` on `self.source`: a `datasets.IterableDataset` keeps its epoch in a shared-memory tensor
(so that the main process's `set_epoch` reaches persistent workers), which every forked worker
inherits. The workers of a loader reach pass boundaries at different moments and each has its own
pass number, so one shared epoch cannot be right for all of them; worse, `set_epoch` is a
non-atomic read-modify-write (`epoch += new - epoch`), and two workers setting 1 at once left it at
2. The epoch decides the pass's shard order (`datasets` reshuffles data sources by epoch) and is
what `load_state_dict` must match to restore a position, so a clobbered epoch changed the data
read, and the saved state, depending on timing. A private copy makes the epoch a worker reads the
one it set.

Not rank-count independent: ranks read disjoint shards, so the global batch at step k depends on the
world size (the map-style path, `recipes.data.sampler`, is the one that is independent).

Lightning pre-fetches one batch from loaders without a length, which would put the saved position
one batch ahead of the trained one; `__len__` therefore reports a nominal, effectively endless
length (`NOMINAL_LENGTH` sequences) so that Lightning fetches batches only as it trains them
(`tests/recipes/test_resume.py` fails without it). Lightning warns that an `IterableDataset` with a
`__len__` may be inaccurate with several workers: expected here, the length is nominal.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch import Tensor
from torch.utils.data import IterableDataset

from lowrank_recipes.recipes.data.packing import ENCODE_BATCH, StreamPacker, split_inputs_labels
from lowrank_recipes.recipes.data.sources import Origin, iter_texts, shard_for_rank

if TYPE_CHECKING:  # annotations only: `datasets` loads when a stream opens (recipes.data.sources)
    import datasets
from lowrank_recipes.recipes.data.tokenizer import TextTokenizer

# Sequences per rank reported by `len()`: 2^40, far beyond any run, so a Lightning epoch never ends.
NOMINAL_LENGTH = 2**40


class PackedStream(IterableDataset):
    """Endless stream of {"input_ids": (T,), "labels": (T,)} from this rank's shards of `source`.

    Args:
        source: the full stream (`recipes.data.sources.open_stream`), not yet sharded.
        tokenizer: encodes documents; `eos_id` separates them.
        seq_len: T.
        rank: data-parallel rank of this process.
        world_size: number of data-parallel ranks.
        seed: shuffle seed (used only when `shuffle_buffer > 0`).
        shuffle_buffer: `datasets` shuffle buffer size (examples); 0 keeps the stream order, which
            keeps resume exact.
        where: what the stream reads (`sources.origin`), named when a record cannot be read; such a
            record raises `DataContentError` (`sources.iter_texts`).
    """

    def __init__(
        self,
        source: datasets.IterableDataset,
        tokenizer: TextTokenizer,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 0,
        where: Origin = Origin("the training stream"),
    ) -> None:
        super().__init__()
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if shuffle_buffer > 0:
            # Shuffle before sharding so every rank applies the same shard permutation.
            source = source.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.source = shard_for_rank(source, rank, world_size)
        self.rank = rank
        self.world_size = world_size
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.where = where
        self._pass = 0
        self._stream: datasets.IterableDataset | None = None  # this iterator's private copy of `source`
        self._packer: StreamPacker | None = None
        self._resume: dict[str, Any] | None = None

    def __len__(self) -> int:
        return NOMINAL_LENGTH

    @staticmethod
    def _private_stream(source: datasets.IterableDataset) -> datasets.IterableDataset:
        """Returns a copy of `source` whose epoch (and resume point) belongs to the caller alone.

        A pickle round trip, as for a spawned worker, but with the plain pickler: the epoch tensor is
        copied by value, not passed as a handle to the shared memory that `source`, the main process
        and the sibling workers hold.
        """
        return pickle.loads(pickle.dumps(source))

    def _texts(self, stream: datasets.IterableDataset) -> Iterator[list[str]]:
        batch: list[str] = []
        for text in iter_texts(stream, self.where):
            batch.append(text)
            if len(batch) == ENCODE_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        leftover: list[int] = []
        state, self._resume = self._resume, None
        if state is not None:
            self._pass = state["pass"]
            leftover = state["leftover"]
        # Never `self.source.set_epoch(...)`: its epoch is shared with every worker (module docstring).
        stream = self._private_stream(self.source)
        stream.set_epoch(self._pass)
        if state is not None:
            saved_epoch = state["source"].get("epoch", self._pass)
            if saved_epoch != self._pass:
                # `datasets` would silently ignore the position and restart the pass. Such states came from
                # workers that shared one epoch (before private copies); they cannot be resumed exactly.
                raise ValueError(
                    f"stream state of pass {self._pass} holds a position in datasets epoch {saved_epoch}: "
                    "the position cannot be restored exactly"
                )
            stream.load_state_dict(state["source"])  # applies to this pass only: the epoch only grows
        self._stream = stream
        self._packer = StreamPacker(self.tokenizer, self.seq_len, leftover)
        while True:
            emitted = False
            for batch in self._texts(stream):
                self._packer.add(batch)
                for chunk in self._packer.chunks():
                    emitted = True
                    yield split_inputs_labels(chunk)
            if not emitted and not self._packer.leftover():
                return  # an empty shard (e.g. more workers than shards): stop instead of spinning
            self._pass += 1
            stream.set_epoch(self._pass)

    def state_dict(self) -> dict[str, Any]:
        """Returns the position after the last yielded sequence: stream state, unemitted tokens, pass."""
        if self._resume is not None:  # loaded but not iterated yet: the loaded state is the position
            return self._resume
        stream = self._stream if self._stream is not None else self.source
        return {
            "source": stream.state_dict(),
            "leftover": self._packer.leftover() if self._packer is not None else [],
            "pass": self._pass,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Makes the next `iter()` continue from `state_dict` (from `state_dict()` of an earlier stream)."""
        self._resume = dict(state_dict)
