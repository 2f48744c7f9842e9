"""Data pipeline of the pretraining recipe: corpus, tokenizer, sources, packing, sampler, stream, loader, datamodule."""

from recipes.data.datamodule import DataConfig, PretrainDataModule
from recipes.data.loader import RankStatefulDataLoader
from recipes.data.packing import PackedSequences, StreamPacker, pack_tokens, split_inputs_labels
from recipes.data.sampler import GlobalBatchSampler
from recipes.data.stream import PackedStream
from recipes.data.tokenizer import TextTokenizer, load_tokenizer

__all__ = [
    "DataConfig",
    "GlobalBatchSampler",
    "PackedSequences",
    "PackedStream",
    "PretrainDataModule",
    "RankStatefulDataLoader",
    "StreamPacker",
    "TextTokenizer",
    "load_tokenizer",
    "pack_tokens",
    "split_inputs_labels",
]
