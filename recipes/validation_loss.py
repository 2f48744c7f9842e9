"""The recipe's validation loss of given weights, outside training: what ``val/loss`` and ``val/ppl`` would log.

The recipe logs ``val/loss`` as Lightning's epoch mean of each validation batch's ``causal_lm_loss`` weighted by the
batch's sequence count B_b; every sequence has T tokens, so that is the mean next-token cross-entropy over every
validation token:

    loss = sum_b B_b * CE_b / sum_b B_b,      ppl = exp(loss)

(torchmetrics' ``Perplexity`` is exp of the same token mean). :class:`ValidationBatches` builds the recipe's own
validation split with its data module (the same documents, tokenizer, packing, ``data.val_sequences`` cap and
micro-batches, as one rank sees them with one device) and keeps the first ``limit`` batches (the run's
``trainer.limit_val_batches`` counts batches per rank). :func:`validation_loss` runs a ``Llama`` over them under the
run's ``trainer.precision``: ``32-true`` in float32, ``bf16-mixed`` float32 weights under bf16 autocast, ``bf16-true``
weights cast to bf16, as Lightning's precision plugins do. No gradient, no Trainer, no output files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lowrank_recipes.recipes.data.config import DataConfig
from lowrank_recipes.recipes.model import Llama, LlamaConfig, causal_lm_loss

PRECISIONS: tuple[str, ...] = ("32-true", "32", "bf16-mixed", "bf16-true")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Validation loss (mean next-token cross-entropy, nats), perplexity exp(loss), and what it was measured on."""

    loss: float
    ppl: float
    batches: int
    sequences: int
    tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


class ValidationBatches:
    """The recipe's validation micro-batches for ``data`` (one rank of one), the first ``limit`` of them (None: all).

    Building it trains or reads the cached tokenizer and packs the documents once; the batches are then kept in memory
    ({"input_ids": (B, T) int64, "labels": (B, T) int64} each) and reused for every model evaluated.
    """

    def __init__(self, data: DataConfig, limit: int | None = None) -> None:
        from lowrank_recipes.recipes.data.datamodule import PretrainDataModule  # lightning, torchdata: lazily

        if limit is not None and limit < 1:
            raise ValueError(f"limit: invalid value {limit!r}; accepted: an integer >= 1, or None (every batch)")
        module = PretrainDataModule(data, rank=0, world_size=1, accumulate_grad_batches=1)
        module.prepare_data()
        module.setup("validate")
        loader = module.val_dataloader()
        self.data = data
        self.batches: list[dict[str, Tensor]] = list(itertools.islice(loader, limit))
        if not self.batches:
            raise ValueError("data: the validation split holds no batch; accepted: data with validation sequences")
        self.max_token = max(int(torch.maximum(b["input_ids"].max(), b["labels"].max())) for b in self.batches)
        self.seq_len = self.batches[0]["input_ids"].shape[1]

    def check(self, config: LlamaConfig) -> None:
        """Raises ValueError when a model of ``config`` cannot read these batches: a token id not below
        ``vocab_size`` (another tokenizer than the model's), or sequences longer than ``max_seq_len``."""
        if self.max_token >= config.vocab_size:
            raise ValueError(
                f"data: token ids up to {self.max_token}, but model.vocab_size is {config.vocab_size} (another "
                "tokenizer than the model was trained with); accepted: the model's tokenizer (data.tokenizer, "
                "--tokenizer)"
            )
        if self.seq_len > config.max_seq_len:
            raise ValueError(
                f"data.seq_len: {self.seq_len} exceeds the model's max_seq_len {config.max_seq_len}; accepted: "
                f"data.seq_len <= {config.max_seq_len}"
            )


def _precision_context(precision: str, device: torch.device) -> tuple[torch.dtype, contextlib.AbstractContextManager]:
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision: invalid value {precision!r}; accepted: {' | '.join(PRECISIONS)}")
    if precision == "bf16-true":
        return torch.bfloat16, contextlib.nullcontext()
    if precision == "bf16-mixed":
        return torch.float32, torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.float32, contextlib.nullcontext()


def build_model(state: Mapping[str, Tensor], config: LlamaConfig, dtype: torch.dtype, device: torch.device) -> Llama:
    """``Llama(config)`` holding ``state`` (built on the meta device, the tensors assigned, then moved and cast)."""
    with torch.device("meta"):
        model = Llama(dataclasses.replace(config, compile=False, activation_checkpointing=False))
    model.load_state_dict(dict(state), strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def validation_loss(
    state: Mapping[str, Tensor],
    config: LlamaConfig,
    batches: ValidationBatches,
    precision: str = "32-true",
    device: str | torch.device = "cpu",
) -> Evaluation:
    """The recipe's ``val/loss`` and ``val/ppl`` of the weights ``state`` (keys of ``Llama(config).state_dict()``)
    on ``batches`` (module docstring).

    Raises:
        ValueError: a token id of the data is not below ``config.vocab_size`` (another tokenizer than the model's), or
            the sequences are longer than ``config.max_seq_len``; ``precision`` not accepted.
    """
    batches.check(config)
    device = torch.device(device)
    dtype, context = _precision_context(precision, device)
    model = build_model(state, config, dtype, device)
    total, sequences, tokens = 0.0, 0, 0
    with context:
        for batch in batches.batches:
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)  # (B, T) each
            loss = causal_lm_loss(model(ids), labels)  # mean over the B x T tokens
            total += float(loss) * ids.shape[0]
            sequences += ids.shape[0]
            tokens += ids.numel()
    mean = total / sequences
    return Evaluation(loss=mean, ppl=math.exp(mean), batches=len(batches.batches), sequences=sequences, tokens=tokens)
