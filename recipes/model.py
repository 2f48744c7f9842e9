"""A LLaMA decoder in plain PyTorch, sized like the GaLore/SARA pretraining runs.

Architecture (as in Touvron et al. 2023 and the Hugging Face `LlamaForCausalLM` the reference runs
used): token embedding -> `num_layers` x [RMSNorm -> causal self-attention with rotary position
embeddings -> residual, RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> untied output head.
No biases anywhere. Module names follow the Hugging Face layout (`layers.0.self_attn.q_proj.weight`,
...), so parameter-group patterns written for those checkpoints match here too.

Shapes: B batch, T sequence length, C hidden size, H heads, D = C / H head size, F intermediate
size, V vocabulary size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lowrank.checks import is_int, is_number


@dataclass
class LlamaConfig:
    """Model size and numerics.

    Attributes:
        vocab_size: number of token ids (V); the paper runs use the T5 tokenizer's 32000.
        hidden_size: residual stream width (C).
        intermediate_size: SwiGLU inner width (F); LLaMA uses about 8/3 C.
        num_heads: attention heads (H); must divide `hidden_size`, and C / H must be even for RoPE.
        num_layers: decoder blocks.
        max_seq_len: longest input accepted by `forward`; the paper runs use 256.
        rms_norm_eps: epsilon inside RMSNorm's square root (LLaMA: 1e-6).
        rope_theta: RoPE base; frequencies are theta^(-2i/D) (LLaMA: 10000).
        activation_checkpointing: recompute each decoder block in backward instead of storing its
            activations (saves memory, costs about one extra forward).
        init_std: standard deviation of the normal init of every linear and embedding weight (0.02,
            as in the Hugging Face LLaMA the reference runs used).
        compile: compile each decoder block in place with ``nn.Module.compile()`` (torch.compile; the
            state-dict keys stay those of an uncompiled model, so checkpoints move freely between the two). The
            recipe's LightningModule does it in ``configure_model``; a bare ``Llama`` ignores it.
        init_from: start from these weights instead of the random initialisation (a recipe checkpoint file, a
            sharded checkpoint directory, a weights file of ``lowrank-diagnose merge | destroy``, or Hugging Face
            LLaMA safetensors: ``lowrank_recipes.recipes.weights``): weights only,
            a new optimizer, step 0, the config's shape (a mismatch is refused before anything is written). A
            resumed run restores its checkpoint's weights instead. The recipe's LightningModule loads it; a bare
            ``Llama`` ignores it.
        trainable: which parameters train (``lowrank.trainable``): null for all, else preset names (``all``,
            ``companions``, ``sfn_oproj``, ``attention``, ``mlp``) and regular expressions on parameter names;
            the rest is frozen (no gradient, no optimizer state). A bare ``Llama`` ignores it.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    max_seq_len: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    activation_checkpointing: bool = False
    init_std: float = 0.02
    compile: bool = False
    init_from: str | None = None
    trainable: list[str] | None = None

    def __post_init__(self) -> None:
        problems = []
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_layers", "max_seq_len"):
            value = getattr(self, key)
            if not is_int(value, 1):
                problems.append(f"{key} must be a positive int, got {value!r}")
        for key in ("rms_norm_eps", "rope_theta", "init_std"):
            value = getattr(self, key)
            if not (is_number(value) and value > 0):
                problems.append(f"{key} must be a number > 0, got {value!r}")
        if not problems and self.hidden_size % self.num_heads != 0:
            problems.append(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        elif not problems and (self.hidden_size // self.num_heads) % 2 != 0:
            head = self.hidden_size // self.num_heads
            problems.append(f"head size hidden_size / num_heads = {head} must be even (RoPE)")
        if problems:
            raise ValueError("invalid LlamaConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        """Per-head size D = C / H."""
        return self.hidden_size // self.num_heads


# The paper sizes (docs/reference.md): T5 vocabulary, sequence length 256, untied head.
# Parameter counts (norms included): 58.1M, 134.1M, 368.0M, 1339.1M, 6738.4M.
_PRESET_SHAPES: dict[str, tuple[int, int, int, int]] = {
    # name: (hidden_size, intermediate_size, num_heads, num_layers)
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 16, 24),
    "1b": (2048, 5461, 32, 24),
    "7b": (4096, 11008, 32, 32),
}
PRESET_NAMES: tuple[str, ...] = tuple(_PRESET_SHAPES)


def llama_preset(name: str, **overrides: object) -> LlamaConfig:
    """Returns a paper-size config (vocab 32000, max_seq_len 256), with fields optionally overridden.

    Args:
        name: one of `PRESET_NAMES` ("60m", "130m", "350m", "1b", "7b"), case-insensitive.
        **overrides: `LlamaConfig` fields to replace, e.g. `vocab_size=4096`.

    Raises:
        ValueError: unknown preset name or override key.
    """
    key = name.lower()
    if key not in _PRESET_SHAPES:
        raise ValueError(f"model preset {name!r} is unknown; accepted values: {list(PRESET_NAMES)}")
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown LlamaConfig override(s) {unknown}; accepted keys: {sorted(fields)}")
    hidden, inter, heads, layers = _PRESET_SHAPES[key]
    base = dict(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=inter,
        num_heads=heads,
        num_layers=layers,
        max_seq_len=256,
    )
    base.update(overrides)
    return LlamaConfig(**base)  # type: ignore[arg-type]


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back to x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # (..., C) -> (..., C)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> Tensor:
    """Returns the RoPE inverse frequencies theta^(-2i/D), i < D/2, shape (D/2,), float32."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def rope_cos_sin(inv_freq: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Returns cos and sin of position x frequency, each (T, D), halves repeated (rotate-half layout)."""
    positions = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)  # (T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, D)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates channel pairs (i, i + D/2) of x (B, H, T, D) by the position angle (rotate-half form)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE on queries and keys."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        c = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(c, c, bias=False)
        self.k_proj = nn.Linear(c, c, bias=False)
        self.v_proj = nn.Linear(c, c, bias=False)
        self.o_proj = nn.Linear(c, c, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # (B, T, C) -> (B, T, C)
        b, t, c = x.shape
        # (B, T, C) -> (B, H, T, D)
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, c))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): C -> F -> C."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, T, C)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # (B, T, C) -> (B, T, C)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """LLaMA decoder: `forward(input_ids (B, T)) -> logits (B, T, V)`.

    Build on `torch.device("meta")` to inspect sizes without memory; after `to_empty(device=...)`
    call `init_weights()` to fill the parameters.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # No RoPE buffer: the angles are recomputed in float32 every forward (D/2 x T values, negligible),
        # so casting the module to bf16 ("bf16-true") cannot round them, and meta-device
        # construction leaves nothing but parameters to initialise.
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialises every weight: linears and embedding ~ N(0, init_std^2), norms = 1."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def forward(self, input_ids: Tensor) -> Tensor:  # (B, T) int -> (B, T, V)
        t = input_ids.shape[1]
        if t > self.config.max_seq_len:
            raise ValueError(f"input length {t} exceeds max_seq_len={self.config.max_seq_len}")
        inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta, device=input_ids.device)
        cos, sin = rope_cos_sin(inv_freq, t)  # (T, D) each, float32
        x = self.embed_tokens(input_ids)  # (B, T, C)
        for layer in self.layers:
            if self.config.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy in float32.

    Args:
        logits: (B, T, V) predictions for positions 0..T-1.
        labels: (B, T) the tokens that follow each input position (inputs shifted by one).

    Returns:
        Scalar loss.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def count_parameters(config: LlamaConfig) -> int:
    """Counts the parameters of `Llama(config)` built on the meta device (no memory allocated)."""
    with torch.device("meta"):
        model = Llama(config)
    return sum(p.numel() for p in model.parameters())
