"""`PretrainDataModule`: packed next-token-prediction batches for the pretraining recipe.

Batches are dicts {"input_ids": (B, T) int64, "labels": (B, T) int64} with B = `micro_batch_size`
per rank and T = `seq_len`; `labels` are the inputs shifted by one token.

Sources (`DataConfig.source`):

* `"embedded"` (default): the stdlib docstring corpus (`recipes.data.corpus`), tokenized once into a flat
  tensor; every `holdout_every`-th document is validation.
* `"stdlib_code"`: the stdlib's source files (`recipes.data.code_corpus`), the same way; the embedded BPE is
  trained on this corpus (its own tokenizer, cached under its own hash).
* `"files"`: local JSONL (`text` field) or text files, read through the same `datasets` streaming
  code as C4, then tokenized into a flat tensor like the embedded corpus; validation from
  `val_files`, or every `holdout_every`-th document when none are given.
* `"c4"`: C4 streamed from the Hub (`allenai/c4`, `en`), packed on the fly, sharded per rank and per
  worker; with `train_files` / `val_files` set, the same path reads local C4-formatted shards instead.

Ordering and resume (map-style sources, `recipes.data.sampler`): the training order is a seeded
stream cut into micro-batches; rank r of W takes micro-batches r, r+W, ..., so the global batch of
each optimizer step is the same for any split of micro_batch_size x W x accumulation over processes.
The loader is a `torchdata` `StatefulDataLoader`; Lightning saves its `state_dict` in every checkpoint
and `trainer.fit(ckpt_path=...)` continues mid-epoch with exactly the batches the uninterrupted run
would have seen (same `num_workers` and `micro_batch_size` required). The C4 stream resumes exactly
too (`recipes.data.stream`, every rank's position kept by `recipes.data.loader`), with the same
world size and `num_workers`; its batches depend on the world size.

Distributed: the module slices data per rank itself. Lightning would otherwise replace the sampler
with a `DistributedSampler`, so the Trainer MUST be built with `use_distributed_sampler=False`;
`setup` raises when it is not. Keep `max_steps` (not `max_epochs`) as the run length: Lightning
drops loader states on resume when `estimated_stepping_batches` has to load the data early
(Lightning issue #20550), which `max_epochs=-1` with `max_steps` avoids.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Subset
from torchdata.stateful_dataloader import StatefulDataLoader

if TYPE_CHECKING:  # annotations only: `datasets` loads when a stream opens (the embedded source needs none)
    import datasets

from lowrank_recipes.recipes.data import sources
from lowrank_recipes.recipes.data.code_corpus import load_code_corpus
from lowrank_recipes.recipes.data.config import BUILTIN_SOURCES, C4_DEFAULT_VAL_TOKENS, DataConfig, data_seed
from lowrank_recipes.recipes.data.corpus import corpus_hash, load_corpus
from lowrank_recipes.recipes.data.loader import RankStatefulDataLoader
from lowrank_recipes.recipes.data.packing import PackedSequences, iter_packed, pack_tokens, split_inputs_labels
from lowrank_recipes.recipes.data.sampler import GlobalBatchSampler
from lowrank_recipes.recipes.data.stream import PackedStream
from lowrank_recipes.recipes.data.tokenizer import EMBEDDED, TextTokenizer, load_tokenizer


def rank_slice(dataset: Dataset, rank: int, world_size: int, cap: int | None = None) -> Subset:
    """Returns items r, r+W, ... of the first min(len, cap) items, truncated so every rank gets as many."""
    total = len(dataset) if cap is None else min(len(dataset), cap)
    total -= total % world_size
    return Subset(dataset, range(rank, total, world_size))


class PretrainDataModule(pl.LightningDataModule):
    """Tokenized, packed pretraining data with rank-count-independent order and exact mid-epoch resume.

    Args:
        config: the data settings.
        rank: data-parallel rank; None = the attached trainer's `global_rank` (0 without a trainer).
        world_size: data-parallel size; None = the trainer's `world_size` (1 without a trainer).
        accumulate_grad_batches: micro-batches per optimizer step per rank; None = the trainer's
            (1 without a trainer). Only shapes the nominal epoch (`GlobalBatchSampler`).

    The three are read when the loaders are built, so calling `setup()` before `Trainer.fit` starts
    the ranks is fine.
    """

    def __init__(
        self,
        config: DataConfig,
        rank: int | None = None,
        world_size: int | None = None,
        accumulate_grad_batches: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.accumulate_grad_batches = accumulate_grad_batches
        self.tokenizer: TextTokenizer | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._train_source: datasets.IterableDataset | None = None  # unsharded stream ("c4" source)
        self._train_where = sources.Origin("the training stream")  # what it reads, for error messages
        self.corpus_hash: str | None = None  # of the embedded corpus, once read (logged by the recipe)

    def _load_tokenizer(self, documents: list[str] | None) -> TextTokenizer:
        c = self.config
        return load_tokenizer(
            c.tokenizer, vocab_size=c.vocab_size, documents=documents, cache_dir=c.cache_dir, eos_token=c.eos_token
        )

    def _embedded_documents(self) -> list[str]:
        """The built-in corpus of the source: the stdlib's source files for "stdlib_code", else (the embedded source,
        and the corpus the embedded tokenizer of "c4" trains on) the docstring corpus."""
        code = self.config.source == "stdlib_code"
        documents = (load_code_corpus if code else load_corpus)(limit=self.config.max_documents)
        if self.corpus_hash is None:
            self.corpus_hash = corpus_hash(documents)
            rank_zero_info(
                f"{'stdlib source' if code else 'embedded'} corpus: {len(documents)} documents, "
                f"{sum(map(len, documents)):,} characters, sha256 {self.corpus_hash}"
            )
        return documents

    def prepare_data(self) -> None:
        """Trains and caches the embedded tokenizer once per node (Lightning calls this on one process)."""
        # With source "files" the BPE is trained on those files, in `setup`, once they are read.
        if self.config.tokenizer == EMBEDDED and self.config.source != "files":
            self._load_tokenizer(self._embedded_documents())

    def _layout(self) -> tuple[int, int, int]:
        """Returns (rank, world_size, accumulation): explicit arguments, else the trainer's, else (0, 1, 1)."""
        trainer = self.trainer
        rank = self.rank if self.rank is not None else (trainer.global_rank if trainer else 0)
        world = self.world_size if self.world_size is not None else (trainer.world_size if trainer else 1)
        accumulate = self.accumulate_grad_batches
        if accumulate is None:
            accumulate = trainer.accumulate_grad_batches if trainer else 1
        return rank, world, accumulate

    def _check_trainer(self) -> None:
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError(
                "PretrainDataModule slices data per rank itself: build the Trainer with "
                "use_distributed_sampler=False (accepted value: False; got True)"
            )

    def setup(self, stage: str | None = None) -> None:
        """Builds the tokenizer and the datasets (idempotent); rank slicing happens in the loaders."""
        self._check_trainer()
        if self.train_set is not None:
            return
        c = self.config
        if c.source == "c4":
            self._setup_stream()
            return
        if c.source in BUILTIN_SOURCES:
            docs = self._embedded_documents()
            train_docs, val_docs = sources.holdout_split(docs, c.holdout_every)
            self.tokenizer = self._load_tokenizer(docs)
        else:
            spec = sources.files_spec(c.train_files or [], c.val_files)
            train_docs = sources.read_documents(spec, "train")
            if c.val_files:
                val_docs = sources.read_documents(spec, "validation")
            else:
                train_docs, val_docs = sources.holdout_split(train_docs, c.holdout_every)
            self.tokenizer = self._load_tokenizer(train_docs if c.tokenizer == EMBEDDED else None)
        self.train_set = PackedSequences(pack_tokens(train_docs, self.tokenizer), c.seq_len)
        self.val_set = PackedSequences(pack_tokens(val_docs, self.tokenizer), c.seq_len)
        if len(self.val_set) == 0:
            raise ValueError(
                f"data: the validation documents ({len(val_docs)}) give no sequence of data.seq_len={c.seq_len} "
                "tokens, so no val/loss would be logged; accepted: more validation text (data.val_files, or a "
                "smaller data.holdout_every), or a smaller data.seq_len"
            )

    def _setup_stream(self) -> None:
        c = self.config
        if c.train_files:
            spec = sources.files_spec(c.train_files, c.val_files)
        else:
            spec = sources.StreamSpec(path=c.c4_dataset, name=c.c4_config)
        self._train_where = sources.origin(spec, "train")
        self.tokenizer = self._load_tokenizer(self._embedded_documents() if c.tokenizer == EMBEDDED else None)
        self._train_source = sources.open_stream(spec, "train")
        self.train_set = self._stream_for_layout()
        cap = c.val_sequences or max(1, C4_DEFAULT_VAL_TOKENS // c.seq_len)
        # Every rank reads the same first `cap` sequences of one pass over the validation split,
        # then keeps its slice (`val_dataloader`), so the validation set does not depend on W.
        texts = sources.iter_texts(sources.open_stream(spec, "validation"), sources.origin(spec, "validation"))
        chunks = itertools.islice(iter_packed(texts, self.tokenizer, c.seq_len), cap)
        self.val_set = [split_inputs_labels(chunk) for chunk in chunks]  # type: ignore[assignment]

    def _stream_for_layout(self) -> PackedStream:
        """Returns the training stream sharded for the current (rank, world size).

        Rebuilt when the layout changed since `setup`, e.g. `setup()` called by the user before
        `Trainer.fit` forked or spawned the ranks.
        """
        c = self.config
        rank, world, _ = self._layout()
        current = self.train_set
        if isinstance(current, PackedStream) and (current.rank, current.world_size) == (rank, world):
            return current
        assert self.tokenizer is not None and self._train_source is not None
        return PackedStream(
            self._train_source,
            self.tokenizer,
            c.seq_len,
            rank=rank,
            world_size=world,
            seed=data_seed(c),
            shuffle_buffer=c.shuffle_buffer,
            where=self._train_where,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        """Returns this rank's resumable training loader (its state rides in Lightning checkpoints)."""
        c = self.config
        assert self.train_set is not None, "call setup() first"
        rank, world, accumulate = self._layout()
        if isinstance(self.train_set, PackedStream):
            self.train_set = self._stream_for_layout()
            # Each rank streams its own shards: keep every rank's position in the checkpoint.
            return RankStatefulDataLoader(
                self.train_set, batch_size=c.micro_batch_size, num_workers=c.num_workers, rank=rank, world_size=world
            )
        sampler = GlobalBatchSampler(len(self.train_set), c.micro_batch_size, rank, world, data_seed(c), accumulate)
        return StatefulDataLoader(self.train_set, batch_sampler=sampler, num_workers=c.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Returns this rank's slice (items r, r+W, ...) of the validation sequences, in order."""
        c = self.config
        assert self.val_set is not None, "call setup() first"
        cap = c.val_sequences if c.source != "c4" else None  # the stream was capped when read
        rank, world, _ = self._layout()
        subset = rank_slice(self.val_set, rank, world, cap)
        return DataLoader(subset, batch_size=c.micro_batch_size, shuffle=False, num_workers=c.num_workers)
