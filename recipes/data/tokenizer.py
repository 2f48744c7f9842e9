"""Tokenizer loading through the `tokenizers` library.

Three ways to name a tokenizer (`load_tokenizer(spec, ...)`):

* `"embedded"`: a byte-level BPE trained on the embedded corpus (or any document list) with a given
  vocabulary size. Training is deterministic (same documents and size -> same `tokenizer.json`
  bytes) and the result is cached as `<cache_dir>/bpe-<corpus sha256[:16]>-v<vocab_size>/tokenizer.json`,
  so it is trained once per interpreter version and size.
* a path to a `tokenizer.json` file (or a directory holding one).
* a Hugging Face Hub name such as `"t5-base"` (the paper runs' T5 tokenizer), fetched with
  `Tokenizer.from_pretrained`; needs network access, so only real runs use it.

Documents are encoded without the tokenizer's own special tokens; the packer appends `eos_id`
after every document itself, so every tokenizer kind separates documents the same way.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lowrank_recipes.recipes.data.config import EMBEDDED
from lowrank_recipes.recipes.data.corpus import corpus_hash, load_corpus

# The end-of-document token of the embedded BPE (id 0, its only special token).
EMBEDDED_EOS = "<|endoftext|>"
# End-of-document tokens looked up, in order, when a loaded tokenizer is given no `eos_token`:
# GPT-2 style, T5/LLaMA style, then generic names.
EOS_CANDIDATES: tuple[str, ...] = (EMBEDDED_EOS, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
# Bump when the training recipe below changes, so stale cache entries are not reused.
_CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """Returns `$LOWRANK_RECIPES_CACHE` or `~/.cache/lowrank-recipes` (never a path in the repo)."""
    env = os.environ.get("LOWRANK_RECIPES_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lowrank-recipes"


@dataclass(frozen=True)
class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the id that ends every document.

    Attributes:
        tokenizer: the wrapped tokenizer.
        eos_id: id appended after each document when packing.
    """

    tokenizer: Tokenizer
    eos_id: int

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Encodes one document, without special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes several documents (in parallel inside `tokenizers`), without special tokens."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes ids back to text (special tokens dropped)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def train_bpe(documents: Sequence[str], vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE deterministically.

    Byte-level pre-tokenisation (GPT-2's regex, no prefix space) with all 256 byte symbols in the
    initial alphabet, so any text encodes without unknown tokens. Merges are learnt from pair counts
    with ties broken by the pair itself inside `tokenizers`, so the result does not depend on thread
    scheduling; `tests/recipes/test_tokenizer.py` checks byte equality of two trainings.

    Args:
        documents: training text.
        vocab_size: final size including the 256 byte symbols and `EMBEDDED_EOS`; at least 258.

    Returns:
        The trained tokenizer; `EMBEDDED_EOS` has id 0.
    """
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + EOS + one merge), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # a pair seen once is noise, not a token
        show_progress=False,
        special_tokens=[EMBEDDED_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return tokenizer


def _atomic_write(path: Path, text: str) -> None:
    """Writes `text` to `path` via a temporary file + rename, so concurrent ranks never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def embedded_tokenizer_path(documents: Sequence[str], vocab_size: int, cache_dir: str | Path | None = None) -> Path:
    """Returns where the BPE for these documents and size is cached (whether or not it exists yet)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = f"bpe-{corpus_hash(documents)[:16]}-v{vocab_size}-f{_CACHE_FORMAT}"
    return root / key / "tokenizer.json"


def embedded_tokenizer(
    documents: Sequence[str] | None = None, vocab_size: int = 4096, cache_dir: str | Path | None = None
) -> TextTokenizer:
    """Loads the cached BPE for `documents`, training and caching it first if needed.

    Args:
        documents: training text; defaults to the full embedded corpus (`load_corpus()`).
        vocab_size: BPE vocabulary size (4096 suits the ~2M-character embedded corpus).
        cache_dir: cache root; defaults to `default_cache_dir()`.

    Returns:
        The tokenizer with `eos_id` = id of `EMBEDDED_EOS` (0).
    """
    docs = load_corpus() if documents is None else documents
    path = embedded_tokenizer_path(docs, vocab_size, cache_dir)
    if not path.exists():
        _atomic_write(path, train_bpe(docs, vocab_size).to_str(pretty=True))
    tokenizer = Tokenizer.from_file(str(path))
    return TextTokenizer(tokenizer, _find_eos(tokenizer, EMBEDDED_EOS, str(path)))


def _find_eos(tokenizer: Tokenizer, eos_token: str | None, spec: str) -> int:
    candidates = (eos_token,) if eos_token is not None else EOS_CANDIDATES
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ValueError(
        f"tokenizer {spec!r} has no end-of-document token: looked for eos_token in {list(candidates)}; "
        "pass eos_token=<a token of its vocabulary>"
    )


def load_tokenizer(
    spec: str,
    *,
    vocab_size: int = 4096,
    documents: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    eos_token: str | None = None,
) -> TextTokenizer:
    """Loads a tokenizer by spec: `"embedded"`, a tokenizer.json path (or its directory), or a Hub name.

    Args:
        spec: see the module docstring.
        vocab_size: only for `"embedded"`: the BPE size to train.
        documents: only for `"embedded"`: training text (default: the embedded corpus).
        cache_dir: only for `"embedded"`: cache root (default: `default_cache_dir()`).
        eos_token: the end-of-document token; default: the first of `EOS_CANDIDATES` in the vocabulary.

    Returns:
        The tokenizer and its `eos_id`.

    Raises:
        ValueError: no end-of-document token found.
    """
    if spec == EMBEDDED:
        return embedded_tokenizer(documents, vocab_size, cache_dir)
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        tokenizer = Tokenizer.from_file(str(path))
    else:
        # Not a local file: treat as a Hub repository name (network needed on first use).
        tokenizer = Tokenizer.from_pretrained(spec)
    return TextTokenizer(tokenizer, _find_eos(tokenizer, eos_token, spec))
