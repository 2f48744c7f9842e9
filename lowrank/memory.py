"""Training-memory estimator for a LLaMA-style decoder: bytes by component, counted from shapes (nothing allocated).

    shape = ModelShape(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_heads=32, num_layers=32)
    est = estimate_memory(shape, OptimizerShape("lowrank", rank=1024, state_precision="8bit"),
                          TrainingShape(micro_batch_size=1, seq_len=256, param_dtype=torch.bfloat16,
                                        per_layer_updates=True))
    est.total, est.as_dict()

Notation: L layers, C hidden, F intermediate, H heads, Hkv key/value heads, D = C / H, Ckv = Hkv * D, V vocabulary,
N = micro-batch x sequence length tokens per device, s the parameter dtype's size (2 for bf16, 4 for fp32).

Components (bytes, per device):

* weights: sum of numel x s over the parameters. Per layer 2 C (norms) + C (C + 2 Ckv) + C C (attention) + 3 C F
  (SwiGLU); plus V C (embedding), C (final norm) and V C (output head, absent when tied).
* gradients: without per-layer updates every parameter's gradient is held until the step (= weights). With
  per-layer updates (:mod:`lowrank.per_layer`) a gradient is freed as soon as its weight is stepped inside backward,
  so the estimate is the largest single parameter's gradient (the embedding or output head for a LLaMA). With a
  data-parallel world size above 1, DDP's default bucket buffers (``gradient_as_bucket_view=False``) add one more
  gradient-sized copy (``grad_buckets``).
* optimizer state (per parameter, ``step`` counters excluded, as in ``LowRankOptimizer.state_bytes``):

  - AdamW: two moments of the parameter's shape. ``fp32``: s bytes per element (torch's AdamW, which ``fp32``
    builds, keeps the moments in the parameter's dtype: bf16 weights get bf16 moments); ``bf16``: 2;
    ``8bit``: 1 byte per element plus float32 absmax scales, one per block, blocks aligned to rows: a (m, n)
    tensor has m x ceil(n / block_size) scales (:func:`lowrank.quantization.quantized_bytes`); tensors under
    ``min_8bit_size`` elements stay float32 (max(s, 4) bytes).
  - low-rank (a 2-D target weight (m, n), rank r): the side is the smaller dimension (``auto``: right when
    m >= n, basis (n, r), moments (m, r); left: basis (m, r), moments (r, n)), so the basis is min(m, n) x r in the
    parameter's dtype (``bases``) and the two moments max(m, n) x r stored as above (``moments``, ``scales``); with
    Fira a 0-dim float32 norm per matrix (``fira_norms``). Every other parameter gets the base's full-size
    moments.

* POET (``name`` poet, :mod:`lowrank.poet`): the targets become POET layers. Weights add the generators
  ((floor(m/b) + floor(n/b)) b(b-1)/2 each) and the permutations (int64, each with its inverse: 16 (m + n) bytes);
  gradients and Adam's moments cover the generators and the plain parameters only (W0 is frozen); activations: see
  :func:`poet_activation_bytes` (the block products keep a copy of the rotated coordinates, the Cayley-Neumann series
  its b x b partial products; the linears' inputs are no longer kept); the step's workspace is the larger of the
  update's temporaries and a merge's (:func:`poet_merge_bytes`), the gradients still alive.

* activations: bytes of the tensors autograd saves for backward during the forward pass (what is alive when
  backward starts), derived by listing the saved tensors of ``recipes/model.py``'s ops
  (``torch.autograd.graph.saved_tensors_hooks``; the tests check the formula against that count, shared storages
  and parameters counted once/not at all): RMSNorm computes in float32 and keeps its float32 input (``pow``), the
  rsqrt and the normalised x (the two ``mul`` s); RoPE multiplies by constant cos / sin tables, so it keeps only
  those tables; ``scaled_dot_product_attention`` (flash-type kernel, the CPU's and CUDA's default) keeps q, k, v,
  its output (which is also o_proj's input) and a float32 log-sum-exp per head and query; SwiGLU keeps the gate
  output (silu's input), silu's output, the up output and their product (down_proj's input). Per token and
  layer::

      a_layer = 2 (8 C + 4)          two RMSNorms: float32 input, float32 normalised x, float32 rsqrt
              + 2 s C                the two norm outputs (inputs of q/k/v and of gate/up)
              + s (C + 2 Ckv) + 4 H  attention: q, k (rotated), v, and the log-sum-exp
              + s C                  attention output = o_proj's input
              + 4 s F                SwiGLU

      a_head  = 8 C + 4 + s C        final RMSNorm and lm_head's input
              + 4 V                  the float32 log-softmax kept by the cross-entropy
              + 16                   int64 input ids (embedding) and labels (loss)

  plus a fixed part, independent of the batch: 8 T D (the float32 cos / sin tables, T the sequence length) and,
  when s < 4, 4 C per RMSNorm run (the float32 copy of its weight): 2 L + 1 of them, only the final norm's
  under checkpointing (a recomputed block adds its two). Without checkpointing:
  N (L a_layer + a_head) + fixed. With activation checkpointing (each block recomputed in backward, non-reentrant),
  the forward keeps only the blocks' inputs, N (L s C + a_head) + fixed (``saved``), and one block's activations
  come back while it is recomputed: the estimate adds N a_layer (``total``). Not counted here: the transient buffers
  of backward (the peak below counts the logits' gradient; one layer's activation gradients are left out) and the
  logits themselves (N V s, alive until the loss is computed).

Peak (``MemoryEstimate.total``): weights, optimizer state and DDP buckets live throughout; on top of them the peak
is the larger of two moments of a step (their temporaries: :mod:`lowrank.memory_workspace`, checked against the
allocator's record of real steps):

* ``backward``: every activation, plus the loss's float32 gradient of the logits, or a little later the head's
  gradient beside the logits' gradient. Under per-layer updates one weight's gradient with its update (or its
  refresh) instead, every activation counted alive; there is no later peak, the step having happened inside
  backward.
* ``step``: every gradient, plus the refresh of one matrix (an SVD's factors) or, after it, the projected gradients
  of every low-rank weight and the stand-ins the base optimizer updates (2 s sum max(m, n) r: they exist only
  during the step), with the base update's temporaries; plus the old bases that the refresh records of the
  largest stagger slice hold until the step ends.

``MemoryEstimate.sum`` is the plain sum of the components (GaLore's convention for its published breakdown). Both
are estimates to compare with measured peaks (``bench/memory.py``), not guarantees. Not counted: the CUDA context
and the caching allocator's fragmentation, the C library's heap slack on a CPU.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from lowrank import memory_workspace as workspace
from lowrank.compact_adamw import effective_precision
from lowrank.quantization import quantized_bytes

OPTIMIZERS: tuple[str, ...] = ("adamw", "lowrank", "poet")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "8bit")
SELECTOR_NAMES: tuple[str, ...] = ("dominant", "importance", "random", "randomized_dominant", "randomized_importance")
# Attention and MLP projections: the default low-rank targets (lowrank.config.DEFAULT_TARGETS).
PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The sizes of a LLaMA decoder (the fields of ``LlamaConfig`` that memory depends on).

    ``num_kv_heads`` None means multi-head attention (= ``num_heads``); ``tie_embeddings`` drops the output head.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    num_kv_heads: int | None = None
    tie_embeddings: bool = False

    @classmethod
    def from_config(cls, config: object) -> ModelShape:
        """From any object with ``LlamaConfig``'s attribute names (e.g. the recipe's config)."""
        return cls(
            vocab_size=config.vocab_size,  # type: ignore[attr-defined]
            hidden_size=config.hidden_size,  # type: ignore[attr-defined]
            intermediate_size=config.intermediate_size,  # type: ignore[attr-defined]
            num_heads=config.num_heads,  # type: ignore[attr-defined]
            num_layers=config.num_layers,  # type: ignore[attr-defined]
            num_kv_heads=getattr(config, "num_kv_heads", None),
            tie_embeddings=bool(getattr(config, "tie_embeddings", False)),
        )

    @property
    def kv_size(self) -> int:
        """Ckv = Hkv x D: the output size of k_proj and v_proj."""
        return (self.num_kv_heads or self.num_heads) * (self.hidden_size // self.num_heads)

    def parameters(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every parameter, named like ``recipes/model.py``'s ``Llama``."""
        c, f, kv = self.hidden_size, self.intermediate_size, self.kv_size
        params: list[tuple[str, tuple[int, ...]]] = [("embed_tokens.weight", (self.vocab_size, c))]
        for i in range(self.num_layers):
            p = f"layers.{i}."
            params += [
                (p + "input_layernorm.weight", (c,)),
                (p + "self_attn.q_proj.weight", (c, c)),
                (p + "self_attn.k_proj.weight", (kv, c)),
                (p + "self_attn.v_proj.weight", (kv, c)),
                (p + "self_attn.o_proj.weight", (c, c)),
                (p + "post_attention_layernorm.weight", (c,)),
                (p + "mlp.gate_proj.weight", (f, c)),
                (p + "mlp.up_proj.weight", (f, c)),
                (p + "mlp.down_proj.weight", (c, f)),
            ]
        params.append(("norm.weight", (c,)))
        if not self.tie_embeddings:
            params.append(("lm_head.weight", (self.vocab_size, c)))
        return params


@dataclasses.dataclass(frozen=True)
class OptimizerShape:
    """What the optimizer keeps: ``name`` adamw | lowrank | poet (``poet_block_size`` b: the targets become POET
    layers, :func:`poet_linears`); ``rank`` r; ``targets`` module names (last dotted
    component before ``.weight``) that go low-rank; ``side`` auto | left | right; ``state_precision`` fp32 | bf16 |
    8bit with the 8-bit ``block_size`` and ``min_8bit_size`` of :class:`lowrank.CompactAdamW`; ``fira``: a norm
    scalar per low-rank matrix; the refresh's ``selector`` (its ``oversampling`` for the randomized rules) and
    ``stagger`` (how many slices of the low-rank weights refresh at different steps: the old bases of one slice are
    held until its step ends)."""

    name: str = "adamw"
    rank: int = 128
    poet_block_size: int = 256
    targets: tuple[str, ...] = PROJECTIONS
    side: str = "auto"
    state_precision: str = "fp32"
    block_size: int = 256
    min_8bit_size: int = 4096
    fira: bool = False
    selector: str = "importance"
    oversampling: int = 16
    stagger: int = 1


@dataclasses.dataclass(frozen=True)
class TrainingShape:
    """Tokens per device (``micro_batch_size`` x ``seq_len``), parameter dtype, activation checkpointing, per-layer
    updates, the data-parallel world size (DDP: every device holds everything), the ``device`` kind, cpu or cuda
    (it decides the optimizer's temporaries: torch AdamW's single-tensor or foreach implementation, CompactAdamW's
    chunk size) and projected gradients (:mod:`lowrank.projected`: steady state, after the first step, which forms
    every full gradient once to give every weight its first basis; under DDP with ``gradient_as_bucket_view=True``,
    as the recipe sets it, so that DDP's buckets are the gradients themselves)."""

    micro_batch_size: int = 1
    seq_len: int = 256
    param_dtype: torch.dtype = torch.float32
    activation_checkpointing: bool = False
    per_layer_updates: bool = False
    world_size: int = 1
    device: str = "cuda"
    projected_gradients: bool = False


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device by component; ``optimizer`` = ``moments`` + ``scales`` + ``bases`` + ``fira_norms``.

    ``peak_phase`` is where the modelled peak falls: ``backward`` (activations alive, plus ``workspace``: the logits'
    gradient, the first weight gradients, under per-layer updates one weight's update or refresh) or ``step`` (every
    gradient alive, plus ``workspace``: projected gradients, the base update's temporaries, a refresh and the old
    bases its records hold). ``total`` is that peak; ``sum`` adds every component as if all were alive at once
    (weights + gradients + optimizer + activations, the convention of GaLore's published breakdown)."""

    weights: int
    gradients: int
    grad_buckets: int
    moments: int
    scales: int
    bases: int
    fira_norms: int
    activations: int
    workspace: int = 0
    peak_phase: str = "step"

    @property
    def optimizer(self) -> int:
        return self.moments + self.scales + self.bases + self.fira_norms

    @property
    def total(self) -> int:
        alive = self.activations if self.peak_phase == "backward" else self.gradients
        return self.weights + self.grad_buckets + self.optimizer + alive + self.workspace

    @property
    def sum(self) -> int:
        return self.weights + self.gradients + self.grad_buckets + self.optimizer + self.activations

    def as_dict(self) -> dict[str, int | str]:
        fields = dataclasses.asdict(self)
        return {**fields, "optimizer": self.optimizer, "sum": self.sum, "total": self.total}


def _check(optimizer: OptimizerShape, training: TrainingShape) -> None:
    problems = []
    if optimizer.name not in OPTIMIZERS:
        problems.append(f"optimizer name {optimizer.name!r}; accepted: {', '.join(OPTIMIZERS)}")
    if optimizer.state_precision not in PRECISIONS:
        problems.append(f"state_precision {optimizer.state_precision!r}; accepted: {', '.join(PRECISIONS)}")
    if optimizer.side not in ("auto", "left", "right"):
        problems.append(f"side {optimizer.side!r}; accepted: auto, left, right")
    if optimizer.selector not in SELECTOR_NAMES:
        problems.append(f"selector {optimizer.selector!r}; accepted: {', '.join(SELECTOR_NAMES)}")
    if training.device not in ("cpu", "cuda"):
        problems.append(f"device {training.device!r}; accepted: cpu, cuda")
    if training.projected_gradients and (optimizer.name != "lowrank" or optimizer.fira or training.per_layer_updates):
        problems.append("projected_gradients need the lowrank optimizer without Fira and without per_layer_updates")
    if optimizer.name == "poet" and training.per_layer_updates:
        problems.append("per_layer_updates need the lowrank optimizer (POET steps its generators after backward)")
    if training.per_layer_updates and training.world_size > 1:
        problems.append("per_layer_updates need world_size 1 (the hooks step before gradients are reduced)")
    if problems:
        raise ValueError("estimate_memory: " + "; ".join(problems))


def weight_bytes(model: ModelShape, dtype: torch.dtype) -> int:
    """Sum of numel x itemsize over the parameters."""
    return sum(math.prod(shape) for _, shape in model.parameters()) * dtype.itemsize


def moment_pair_bytes(shape: tuple[int, ...], optimizer: OptimizerShape, dtype: torch.dtype) -> tuple[int, int]:
    """(codes or values, 8-bit scales) of Adam's two moments of ``shape`` (``dtype``: the parameter's dtype)."""
    numel = math.prod(shape)
    precision = effective_precision(numel, optimizer.state_precision, optimizer.min_8bit_size)
    if precision == "8bit":  # codes plus float32 scales
        scales = quantized_bytes(shape, optimizer.block_size) - numel
        return 2 * numel, 2 * scales
    if precision == "bf16":
        itemsize = 2
    elif optimizer.state_precision == "8bit":  # a small tensor left in CompactAdamW's float32 compute dtype
        itemsize = torch.promote_types(dtype, torch.float32).itemsize
    else:  # torch's AdamW: the parameter's dtype
        itemsize = dtype.itemsize
    return 2 * numel * itemsize, 0


def _is_target(name: str, shape: tuple[int, ...], optimizer: OptimizerShape) -> bool:
    """A low-rank weight (``lowrank``) or a POET layer's W0 (``poet``)."""
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
    return optimizer.name in ("lowrank", "poet") and len(shape) == 2 and module in optimizer.targets


def poet_linears(model: ModelShape, optimizer: OptimizerShape) -> list[tuple[int, int]]:
    """(m, n) of every POET layer (the targets, in parameter order); empty unless ``optimizer.name`` is poet."""
    if optimizer.name != "poet":
        return []
    return [shape for name, shape in model.parameters() if _is_target(name, shape, optimizer)]  # type: ignore[misc]


def poet_generator_shapes(model: ModelShape, optimizer: OptimizerShape) -> list[tuple[int, int]]:
    """Shapes of the generators ``q_out`` (floor(m/b), b(b-1)/2) and ``q_in`` (floor(n/b), b(b-1)/2) of every POET
    layer: the parameters that train in place of the targets."""
    b = optimizer.poet_block_size
    return [(d // b, b * (b - 1) // 2) for m, n in poet_linears(model, optimizer) for d in (m, n)]


def _trainable_shapes(model: ModelShape, optimizer: OptimizerShape) -> list[tuple[int, ...]]:
    """Shapes of the parameters that get a gradient and optimizer state: every parameter, or for POET the
    generators and the non-target parameters (W0 is frozen)."""
    if optimizer.name != "poet":
        return [shape for _, shape in model.parameters()]
    plain = [shape for name, shape in model.parameters() if not _is_target(name, shape, optimizer)]
    return [*poet_generator_shapes(model, optimizer), *plain]


def optimizer_bytes(model: ModelShape, optimizer: OptimizerShape, dtype: torch.dtype) -> dict[str, int]:
    """``moments``, ``scales``, ``bases`` and ``fira_norms`` bytes (module docstring)."""
    out = dict(moments=0, scales=0, bases=0, fira_norms=0)
    if optimizer.name == "poet":  # Adam on the generators and the plain parameters
        for shape in _trainable_shapes(model, optimizer):
            values, scales = moment_pair_bytes(shape, optimizer, dtype)
            out["moments"] += values
            out["scales"] += scales
        return out
    for name, shape in model.parameters():
        moment_shape = shape
        if _is_target(name, shape, optimizer):
            m, n = shape
            side = optimizer.side if optimizer.side != "auto" else ("right" if m >= n else "left")
            r = optimizer.rank
            moment_shape = (m, r) if side == "right" else (r, n)
            out["bases"] += (n if side == "right" else m) * r * dtype.itemsize
            out["fira_norms"] += 4 * optimizer.fira
        values, scales = moment_pair_bytes(moment_shape, optimizer, dtype)
        out["moments"] += values
        out["scales"] += scales
    return out


def activation_bytes(
    model: ModelShape, training: TrainingShape, optimizer: OptimizerShape | None = None
) -> dict[str, int]:
    """Activation bytes of one micro-batch (module docstring): ``layer`` (a_layer) and ``head`` (a_head) per token,
    ``fixed``, ``saved`` (what the forward pass saves) and ``total`` (``saved`` plus, with checkpointing, one
    recomputed block). With a POET ``optimizer`` the layer's linears are POET layers (:func:`poet_activation_bytes`)."""
    c, f, h, kv = model.hidden_size, model.intermediate_size, model.num_heads, model.kv_size
    s, n = training.param_dtype.itemsize, training.micro_batch_size * training.seq_len
    layer = 2 * (8 * c + 4) + 2 * s * c + s * (c + 2 * kv) + 4 * h + s * c + 4 * s * f
    layer_fixed = 0
    if optimizer is not None and optimizer.name == "poet":
        per_token, layer_fixed = poet_activation_bytes(model, optimizer, s)
        # the norm outputs (q/k/v's and gate/up's input) and down_proj's input are no longer kept by a linear: a POET
        # layer's first op is a gather, which keeps only its indices
        layer += per_token - 2 * s * c - s * f
    head = 8 * c + 4 + s * c + 4 * model.vocab_size + 16
    weight_copy = 4 * c if s < 4 else 0  # float32 copy of a norm weight (RMSNorm's weight.float())
    fixed = 8 * training.seq_len * (c // model.num_heads) + weight_copy
    if training.activation_checkpointing:
        saved = n * (model.num_layers * s * c + head) + fixed
        total = saved + n * layer + 2 * weight_copy + layer_fixed
    else:
        fixed += 2 * model.num_layers * weight_copy + model.num_layers * layer_fixed
        saved = total = n * (model.num_layers * layer + head) + fixed
    return {"layer": layer, "head": head, "fixed": fixed, "saved": saved, "total": total}


def poet_activation_bytes(model: ModelShape, optimizer: OptimizerShape, s: int) -> tuple[int, int]:
    """(bytes per token, fixed bytes) that one decoder layer's POET linears keep for backward.

    Per linear (m, n) and side (d = m for R, n for P, nb = floor(d / b)): the block product keeps a contiguous copy
    of the nb b rotated coordinates of every token (``lowrank.poet_rotation.rotate``): nb b s per token. Fixed, per
    side: the Cayley-Neumann series (in float32 at least: ``POETLinear.blocks``) keeps 6 (nb, b, b) tensors (Q, I + Q,
    and the partial sums; 6 nb b^2 max(s, 4)), the product keeps the blocks in the activations' dtype (nb b^2 s), the
    skew-symmetric map keeps its upper-triangle indices (int64, 2 x b(b-1)/2), and the gathers keep the permutation
    and its inverse (int64, 2 d) when the side has a block. W0 is frozen, so the product with it keeps no input."""
    b = optimizer.poet_block_size
    layer_shapes = poet_linears(model, optimizer)[: len(poet_linears(model, optimizer)) // max(1, model.num_layers)]
    per_token = fixed = 0
    for m, n in layer_shapes:
        for d in (m, n):
            nb = d // b
            per_token += nb * b * s
            fixed += nb * b * b * (6 * max(s, 4) + s) + 8 * b * (b - 1) + (16 * d if nb else 0)
    return per_token, fixed


def _lowrank_shapes(model: ModelShape, optimizer: OptimizerShape) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(oriented gradient (d, k), projected R shape) of every low-rank weight, in parameter order: d is the basis
    side's dimension."""
    if optimizer.name != "lowrank":
        return []
    out = []
    for name, shape in model.parameters():
        if _is_target(name, shape, optimizer):
            m, n = shape
            side = optimizer.side if optimizer.side != "auto" else ("right" if m >= n else "left")
            r = optimizer.rank
            out.append(((n, m), (m, r)) if side == "right" else ((m, n), (r, n)))
    return out


def _base_groups(model: ModelShape, optimizer: OptimizerShape) -> list[list[tuple[int, ...]]]:
    """Shapes the base optimizer steps, by its parameter group (``lowrank.factory``'s order: low-rank stand-ins,
    plain matrices, 1-D parameters)."""
    stand_ins = [r for _, r in _lowrank_shapes(model, optimizer)]
    plain = [shape for name, shape in model.parameters() if not _is_target(name, shape, optimizer)]
    first = poet_generator_shapes(model, optimizer) if optimizer.name == "poet" else stand_ins  # POET's group first
    groups = [first, [p for p in plain if len(p) > 1], [p for p in plain if len(p) <= 1]]
    return [g for g in groups if g]


def _update_bytes(groups: list[list[tuple[int, ...]]], optimizer: OptimizerShape, training: TrainingShape) -> int:
    """The base update's temporaries over ``groups`` (:mod:`lowrank.memory_workspace`)."""
    s = training.param_dtype.itemsize
    if optimizer.state_precision != "fp32":
        shapes = [shape for group in groups for shape in group]
        return workspace.compact_bytes(shapes, s, training.device)
    sizes = [[math.prod(shape) for shape in group] for group in groups]
    if training.device == "cuda":
        return workspace.adamw_foreach_bytes(sizes, s)
    return workspace.adamw_single_tensor_bytes(sizes, s)


def _refresh_bytes(oriented: tuple[int, int], optimizer: OptimizerShape, training: TrainingShape) -> int:
    return workspace.svd_bytes(oriented, optimizer.rank, optimizer.selector, training.param_dtype.itemsize)


def _held_old_bases(model: ModelShape, optimizer: OptimizerShape, dtype: torch.dtype) -> int:
    """Old bases the largest stagger slice's refresh records hold until its step ends (slice j = floor(i k / n))."""
    shapes = _lowrank_shapes(model, optimizer)
    slices: dict[int, int] = {}
    for place, (oriented, _) in enumerate(shapes):
        j = place * optimizer.stagger // len(shapes)
        slices[j] = slices.get(j, 0) + oriented[0] * optimizer.rank * dtype.itemsize
    return max(slices.values(), default=0)


def _refresh_slice_gradients(model: ModelShape, optimizer: OptimizerShape, dtype: torch.dtype) -> int:
    """Full gradients (m n) of the largest stagger slice: what a refresh step forms under projected gradients."""
    shapes = _lowrank_shapes(model, optimizer)
    slices: dict[int, int] = {}
    for place, (oriented, _) in enumerate(shapes):
        j = place * optimizer.stagger // len(shapes)
        slices[j] = slices.get(j, 0) + math.prod(oriented) * dtype.itemsize
    return max(slices.values(), default=0)


def poet_merge_bytes(shape: tuple[int, int], s: int) -> int:
    """Temporaries of one POET layer's merge (``POETLinear.merge_``): W0 in float64, and in each of the two rotations
    of ``effective_weight`` its input, the gathered copy, the block product's input, output and reshaped output, the
    concatenation and the scattered result (at most 7 m x n float64 alive at once), then the result in W0's dtype."""
    m, n = shape
    return 7 * 8 * m * n + s * m * n


def workspace_bytes(model: ModelShape, optimizer: OptimizerShape, training: TrainingShape) -> dict[str, int]:
    """Temporaries of the two candidate peaks, ``backward`` and ``step`` (``MemoryEstimate``), beyond the
    activations and the gradients respectively.

    In backward, the loss's own backward holds the float32 gradient of the logits (and its cast to the parameter
    dtype) beside every activation; by the time the output head's backward runs, the log-softmax output it saved is
    released (-4 N V) and the head's gradient arrives beside the logits' gradient in the parameter dtype. Under
    per-layer updates that gradient and its update (or a low-rank weight's and its refresh) take the head's place,
    every activation still counted alive (the earliest weights are the largest)."""
    s, n = training.param_dtype.itemsize, training.micro_batch_size * training.seq_len
    v, c = model.vocab_size, model.hidden_size
    loss_backward = 4 * n * v + (n * v * s if s < 4 else 0)
    released = -4 * n * v  # the log-softmax's saved output, freed once the loss's backward ran
    lowrank = _lowrank_shapes(model, optimizer)
    if training.per_layer_updates:  # one weight at a time
        per_weight = []
        for name, shape in model.parameters():
            if not _is_target(name, shape, optimizer):
                per_weight.append(math.prod(shape) * s + _update_bytes([[shape]], optimizer, training))
        for oriented, r_shape in lowrank:
            projected = 2 * math.prod(r_shape) * s + _update_bytes([[r_shape]], optimizer, training)
            refresh = _refresh_bytes(oriented, optimizer, training) + oriented[0] * optimizer.rank * s
            per_weight.append(math.prod(oriented) * s + max(projected, refresh))
        return {"backward": max(loss_backward, released + max(per_weight)), "step": 0}
    head_backward = released + n * v * s + v * c * s  # the logits' gradient and the head's
    if training.projected_gradients:
        # R is the companions' gradient (in ``gradients``); the plain groups step first, then one low-rank weight at a
        # time with its stand-in (the companions themselves hold no memory after the first step)
        plain = _base_groups(model, optimizer)[1 if lowrank else 0 :]
        one = max((math.prod(r) * s + _update_bytes([[r]], optimizer, training) for _, r in lowrank), default=0)
        update = max(_update_bytes(plain, optimizer, training), one)
    else:  # every projected gradient and its stand-in at once, then the base's update over every group
        projected = 2 * s * sum(math.prod(r) for _, r in lowrank)
        update = projected + _update_bytes(_base_groups(model, optimizer), optimizer, training)
    if optimizer.name == "poet":  # the merge runs after the update, the gradients still alive: the larger of the two
        update = max(update, max((poet_merge_bytes(shape, s) for shape in poet_linears(model, optimizer)), default=0))
    refresh = max((_refresh_bytes(o, optimizer, training) for o, _ in lowrank), default=0)
    if training.projected_gradients:  # the refreshing slice's G lives until it is re-projected, before the update
        refresh += _refresh_slice_gradients(model, optimizer, training.param_dtype)
    held = _held_old_bases(model, optimizer, training.param_dtype) if lowrank else 0
    return {"backward": max(loss_backward, head_backward), "step": held + max(update, refresh)}


def estimate_memory(model: ModelShape, optimizer: OptimizerShape, training: TrainingShape) -> MemoryEstimate:
    """Bytes per device by component for one training step, and the modelled peak (module docstring)."""
    _check(optimizer, training)
    dtype = training.param_dtype
    weights = weight_bytes(model, dtype)
    poet = poet_linears(model, optimizer)
    if poet:  # W0 keeps its shape; the generators and the permutations (int64, each with its inverse) come on top
        generators = sum(math.prod(shape) for shape in poet_generator_shapes(model, optimizer))
        weights += generators * dtype.itemsize + sum(16 * (m + n) for m, n in poet)
    if optimizer.name == "poet":  # only the generators and the plain parameters get gradients
        gradients = sum(math.prod(shape) for shape in _trainable_shapes(model, optimizer)) * dtype.itemsize
    elif training.per_layer_updates:
        gradients = max(math.prod(shape) for _, shape in model.parameters()) * dtype.itemsize
    elif training.projected_gradients:  # plain gradients and R (a refresh slice's G: the step's workspace)
        projected = sum(math.prod(r) for _, r in _lowrank_shapes(model, optimizer)) * dtype.itemsize
        plain = sum(math.prod(p) for n, p in model.parameters() if not _is_target(n, p, optimizer))
        gradients = plain * dtype.itemsize + projected
    else:
        gradients = weights
    # DDP's buckets: a second gradient-sized copy, except with projected gradients (gradient_as_bucket_view=True: the
    # gradients are views into the buckets, and the frozen weights have none)
    buckets = gradients if training.world_size > 1 and not training.projected_gradients else 0
    state = optimizer_bytes(model, optimizer, dtype)
    activations = activation_bytes(model, training, optimizer)["total"]
    work = workspace_bytes(model, optimizer, training)
    backward, step = activations + work["backward"], gradients + work["step"]
    phase = "step" if step > backward and not training.per_layer_updates else "backward"
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        grad_buckets=buckets,
        activations=activations,
        workspace=work[phase],
        peak_phase=phase,
        **state,
    )
