"""The data section of a run (``data.*``): one dataclass, importable without the data pipeline's libraries."""

from __future__ import annotations

from dataclasses import dataclass

EMBEDDED = "embedded"  # the stdlib corpus as source, and the BPE trained on it as tokenizer
C4_DATASET = "allenai/c4"
C4_CONFIG = "en"

SOURCES: tuple[str, ...] = ("embedded", "stdlib_code", "files", "c4")
# The corpora that ship with Python (read offline, validation held out every `holdout_every`-th document).
BUILTIN_SOURCES: tuple[str, ...] = ("embedded", "stdlib_code")
# Validation cap of the C4 stream when `val_sequences` is None: about 10M tokens, as in the paper runs.
C4_DEFAULT_VAL_TOKENS = 10_000_000


@dataclass
class DataConfig:
    """Data pipeline settings.

    Attributes:
        source: "embedded" (the stdlib's docstrings and help topics, about 2M characters), "stdlib_code" (the stdlib's
            own source files without its test suites, about 12M characters: `recipes.data.code_corpus`), "files"
            (local JSONL/text, held in memory) or "c4" (streamed).
        train_files: local training files; required for "files"; for "c4" they replace the Hub download.
        val_files: local validation files ("files": optional, else `holdout_every`; "c4" with
            `train_files`: required).
        holdout_every: k: every k-th document is validation ("embedded", "stdlib_code", and "files" without
            `val_files`).
        tokenizer: "embedded" (a byte-level BPE of `vocab_size`, trained and cached: on the source's own corpus for
            "embedded" and "stdlib_code", on the training files for "files", on the docstring corpus for "c4"), a
            tokenizer.json path, or a Hub
            name such as "t5-base" (the paper runs' tokenizer; needs network access).
        vocab_size: BPE size when `tokenizer` is "embedded" (4096 suits the ~2M-character corpus).
        eos_token: end-of-document token; None picks the first known one (`tokenizer.EOS_CANDIDATES`).
        seq_len: T, tokens per input sequence (the paper runs use 256).
        micro_batch_size: sequences per rank per forward pass.
        num_workers: DataLoader worker processes per rank (0 = load in the training process).
        seed: fixes the training order (map-style) or the shuffle (C4 with `shuffle_buffer` > 0); None (the
            default) follows the run's top-level `seed` (a data set used on its own, outside a run: 0).
        val_sequences: cap on validation sequences, over all ranks; None = all held-out data
            ("embedded", "stdlib_code", "files") or about `C4_DEFAULT_VAL_TOKENS` tokens ("c4").
        max_documents: use only the first N documents of a built-in corpus (quick runs, tests).
        shuffle_buffer: "c4" only: `datasets` shuffle buffer (examples); 0 keeps stream order and
            exact resume.
        cache_dir: tokenizer cache root; None = `$LOWRANK_RECIPES_CACHE` or ~/.cache/lowrank-recipes.
        c4_dataset: Hub dataset of the "c4" source.
        c4_config: its configuration name.
    """

    source: str = "embedded"
    train_files: list[str] | None = None
    val_files: list[str] | None = None
    holdout_every: int = 20
    tokenizer: str = EMBEDDED
    vocab_size: int = 4096
    eos_token: str | None = None
    seq_len: int = 256
    micro_batch_size: int = 16
    num_workers: int = 0
    seed: int | None = None
    val_sequences: int | None = None
    max_documents: int | None = None
    shuffle_buffer: int = 0
    cache_dir: str | None = None
    c4_dataset: str = C4_DATASET
    c4_config: str = C4_CONFIG

    def __post_init__(self) -> None:
        problems = []
        if self.source not in SOURCES:
            problems.append(f"source={self.source!r} is unknown; accepted values: {list(SOURCES)}")
        if self.source == "files" and not self.train_files:
            problems.append("source='files' needs train_files (a list of .jsonl/.json(.gz) or .txt(.gz) files)")
        if self.source == "c4" and self.train_files and not self.val_files:
            problems.append("source='c4' with local train_files needs val_files (the C4 validation split)")
        for key in ("seq_len", "micro_batch_size"):
            if getattr(self, key) < 1:
                problems.append(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("num_workers", "shuffle_buffer"):
            if getattr(self, key) < 0:
                problems.append(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.holdout_every < 2:
            problems.append(f"holdout_every must be >= 2, got {self.holdout_every}")
        for key in ("val_sequences", "max_documents"):
            value = getattr(self, key)
            if value is not None and value < 1:
                problems.append(f"{key} must be None or >= 1, got {value}")
        if problems:
            raise ValueError("invalid DataConfig: " + "; ".join(problems))


def data_seed(config: DataConfig) -> int:
    """The seed of the data order: ``config.seed``, or 0 for a data config used outside a run (a run's loader fills
    None from its top-level ``seed``)."""
    return 0 if config.seed is None else config.seed
