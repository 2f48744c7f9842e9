"""A model's weights from disk, whatever wrote them: one loader for the diagnose tools and ``model.init_from``.

:func:`load_model_weights` returns :class:`ModelWeights`: the tensors under the keys of ``Llama(config).state_dict()``
(no ``model.`` prefix, CPU tensors), the recipe run's resolved config when the file holds one, and what kind of file
it was. Accepted inputs:

* ``recipe``: a recipe checkpoint file (Lightning's dict; ``state_dict`` with keys ``model.<Llama key>``, every other
  entry ignored), read with ``torch.load(weights_only=True, mmap=True)``: the tensors are mapped, not read, until used.
  A POET run's linears (``<linear>.weight0``, ``.q_out``, ``.q_in``, ``.perm_out``, ``.inv_out``, ``.perm_in``,
  ``.inv_in``) become their effective weight W = R W0 P (``POETLinear.effective_weight``, formed in float64 and stored
  in W0's dtype, as a merge stores it), so every tool sees an ordinary LLaMA.
* ``sharded``: a recipe checkpoint directory of fsdp2 (``torch.distributed.checkpoint``: ``.metadata``, shard files,
  Lightning's ``meta.pt``): the ``state_dict.model.*`` entries are read whole into one process (no process group).
* ``weights``: a file written by :func:`save_model_weights` (the diagnose tools' output): ``{"state_dict":
  {"model." + key: tensor}, "run_config": ..., "diagnose": provenance}``, which ``torch.load(weights_only=True)``
  reads.
* ``huggingface``: LLaMA weights in the Hugging Face layout, as safetensors: a ``.safetensors`` file, or a folder
  with ``model.safetensors`` or sharded ``model-0000x-of-0000y.safetensors`` (with or without
  ``model.safetensors.index.json``). Keys map by dropping the leading ``model.`` (``model.layers.N.self_attn.q_proj
  .weight`` -> ``layers.N.self_attn.q_proj.weight``, ``model.embed_tokens.weight`` -> ``embed_tokens.weight``,
  ``model.norm.weight`` -> ``norm.weight``; ``lm_head.weight`` stays); ``rotary_emb.inv_freq`` buffers are dropped.
  The recipe's RoPE is the rotate-half form (channel i paired with i + D/2), the convention of transformers'
  ``LlamaForCausalLM``, so q_proj and k_proj need no permutation. A ``config.json`` beside the weights fills what the
  shapes do not say (heads, maximum length, RMSNorm epsilon, RoPE base); tied embeddings become an untied head
  holding a copy of the embedding. Needs the optional ``safetensors`` package (``lowrank-recipes[diagnose]``).

Errors (:class:`WeightsError`, a ValueError) name the path and what is accepted: a path that does not exist, a file
of no accepted kind, an incomplete checkpoint (:func:`lowrank_recipes.recipes.checkpoints.checkpoint_problem`), a POET
checkpoint whose settings cannot be recovered.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lowrank.checks import first_problems
from lowrank.names import layer_index
from lowrank.poet_cayley import generator_size
from lowrank.poet_linear import POETLinear
from lowrank_recipes.recipes.checkpoints import META, checkpoint_problem
from lowrank_recipes.recipes.model import Llama, LlamaConfig
from lowrank_recipes.recipes.resume_config import CONFIG_KEY

KINDS: tuple[str, ...] = ("recipe", "sharded", "weights", "huggingface")
MODEL_PREFIX = "model."  # the LightningModule's attribute holding the Llama: its state-dict keys start with it
STATE_KEY = "state_dict"
PROVENANCE_KEY = "diagnose"  # where a diagnose tool's output says how it was made
POET_SUFFIXES: tuple[str, ...] = ("weight0", "q_out", "q_in", "perm_out", "inv_out", "perm_in", "inv_in")
SAFETENSORS_EXTRA = "lowrank-recipes[diagnose]"
ACCEPTED = (
    "a recipe checkpoint file (step=N.ckpt, last.ckpt), an fsdp2 sharded checkpoint directory, a file written by "
    "lowrank-diagnose, or Hugging Face LLaMA safetensors (a .safetensors file, or a folder with model.safetensors or "
    "model-0000x-of-0000y.safetensors)"
)
# Hugging Face config.json keys -> LlamaConfig fields (the shapes come from the tensors)
_HF_FIELDS: dict[str, str] = {
    "num_attention_heads": "num_heads",
    "max_position_embeddings": "max_seq_len",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
}
_HF_SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit; the message names the path (or key) and what is accepted."""


@dataclasses.dataclass
class ModelWeights:
    """A model's weights as ``Llama.state_dict()`` keys them.

    Attributes:
        state: key -> CPU tensor, keys exactly those of ``Llama(config).state_dict()`` (for weights that fit).
        run_config: the recipe run's resolved config (``run_config`` in its checkpoints); for a recipe checkpoint
            written before the config was stored, its hyper-parameters' ``model`` and ``optimizer`` sections (no
            ``data``); None for foreign weights.
        kind: one of :data:`KINDS`.
        path: the path read.
        hints: ``LlamaConfig`` fields read beside foreign weights (a Hugging Face ``config.json``), used by
            :meth:`llama_config` when there is no run config.
    """

    state: dict[str, Tensor]
    run_config: dict[str, Any] | None
    kind: str
    path: str
    hints: dict[str, Any] = dataclasses.field(default_factory=dict)

    def llama_config(self, fallback: Mapping[str, Any] | None = None) -> LlamaConfig:
        """The model's ``LlamaConfig``: the run config's ``model`` section; else the shapes of the tensors (vocabulary,
        hidden and intermediate sizes, layer count) with the other fields from :attr:`hints`, else from ``fallback``
        (``LlamaConfig`` fields, e.g. a recipe config's ``model`` section), else the defaults. ``num_heads`` and
        ``max_seq_len`` cannot be read from shapes: without hints or fallback they are refused."""
        model = (self.run_config or {}).get("model")
        if isinstance(model, Mapping):
            return _config_from(model, f"{self.path}: run_config.model")
        fields = {f.name for f in dataclasses.fields(LlamaConfig)}
        values = {k: v for k, v in (fallback or {}).items() if k in fields}
        values.update(self.hints)
        values.update(_shape_fields(self.state, self.path))
        missing = [key for key in ("num_heads", "max_seq_len") if key not in values]
        if missing:
            raise WeightsError(
                f"{self.path}: {' and '.join(missing)} cannot be read from the tensors' shapes and these "
                f"{self.kind} weights hold no run config (nor a config.json beside them); accepted: a recipe config "
                "whose model section gives them (lowrank-diagnose --config NAME_OR_YAML), or a config.json beside "
                "Hugging Face weights"
            )
        values.update(compile=False, activation_checkpointing=False)
        return _config_from(values, f"{self.path}: the model inferred from its shapes")


def _config_from(values: Mapping[str, Any], where: str) -> LlamaConfig:
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    try:
        return LlamaConfig(**{k: v for k, v in values.items() if k in fields})
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{where}: {err}") from None


def _shape_fields(state: Mapping[str, Tensor], path: str) -> dict[str, int]:
    """vocab_size, hidden_size (embedding (V, C)), intermediate_size (a gate_proj (F, C)) and num_layers (the distinct
    block indices) of a LLaMA state dict."""
    embed = state.get("embed_tokens.weight")
    gate = next((t for k, t in state.items() if k.endswith("mlp.gate_proj.weight")), None)
    if embed is None or embed.dim() != 2 or gate is None or gate.dim() != 2:
        raise WeightsError(
            f"{path}: not a LLaMA state dict (no embed_tokens.weight (V, C) or mlp.gate_proj.weight (F, C) among "
            f"{_some(state)}); accepted: {ACCEPTED}"
        )
    layers = {i for i in map(layer_index, state) if i is not None}
    return {
        "vocab_size": embed.shape[0],
        "hidden_size": embed.shape[1],
        "intermediate_size": gate.shape[0],
        "num_layers": len(layers),
    }


def _some(keys: Mapping[str, Any] | list[str], count: int = 4) -> str:
    names = list(keys)
    shown = ", ".join(names[:count])
    return f"{shown}, ... ({len(names)} keys)" if len(names) > count else shown or "no keys"


def expected_shapes(config: LlamaConfig) -> dict[str, torch.Size]:
    """Key -> shape of ``Llama(config).state_dict()``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Llama(config)
    return {key: tensor.shape for key, tensor in model.state_dict().items()}


def check_compatible(state: Mapping[str, Tensor], config: LlamaConfig) -> list[str]:
    """What keeps ``Llama(config).load_state_dict(state)`` from working: one line per missing key, unexpected key and
    shape mismatch (naming the key, the expected and the found shape). An empty list: compatible."""
    expected = expected_shapes(config)
    problems = [
        f"missing key {key} (expected shape {tuple(shape)})" for key, shape in expected.items() if key not in state
    ]
    problems += [f"unexpected key {key} (shape {tuple(state[key].shape)})" for key in state if key not in expected]
    problems += [
        f"{key}: expected shape {tuple(shape)}, found {tuple(state[key].shape)}"
        for key, shape in expected.items()
        if key in state and tuple(state[key].shape) != tuple(shape)
    ]
    return problems


def initial_weights(path: str | os.PathLike, config: LlamaConfig, key: str = "model.init_from") -> dict[str, Tensor]:
    """The weights at ``path`` for a ``Llama(config)`` (``model.init_from``): loaded, and checked to fit exactly.

    Raises:
        WeightsError: the weights cannot be read (the loader's message), or they do not fit ``config``: the message
            names ``key``, the path, up to five mismatches (key, expected and found shape) and what is accepted.
    """
    try:
        weights = load_model_weights(path)
    except WeightsError as err:
        raise WeightsError(f"{key}: {err}") from None
    problems = check_compatible(weights.state, config)
    if problems:
        shown = first_problems(problems)
        raise WeightsError(
            f"{key}: the weights in {str(path)!r} do not fit model.* ({shown}); accepted: weights of the same shape "
            "as model.* (" + ACCEPTED + ")"
        )
    return weights.state


# ----------------------------------------------------------------------------------------------------------- loading
def load_model_weights(path: str | os.PathLike[str]) -> ModelWeights:
    """Reads the weights at ``path`` (module docstring: the accepted kinds), keyed like ``Llama.state_dict()``.

    Raises:
        WeightsError: ``path`` does not exist, is of no accepted kind, is incomplete, or holds a POET layer whose
            settings cannot be recovered.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights {str(path)!r} do not exist; accepted: {ACCEPTED}")
    if path.is_dir():
        if (path / ".metadata").is_file():
            return _load_sharded(path)
        if _hf_files(path):
            return _load_huggingface(path)
        raise WeightsError(
            f"weights {str(path)!r} is a folder with neither a sharded checkpoint's .metadata nor Hugging Face "
            f"safetensors; accepted: {ACCEPTED}"
        )
    if path.suffix == ".safetensors":
        return _load_huggingface(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise WeightsError(f"weights {str(path)!r} cannot be read: {problem}; accepted: {ACCEPTED}")
    try:
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # an archive of something other than plain data and tensors
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise WeightsError(
            f"weights {str(path)!r}: torch.load(weights_only=True) failed ({cause}); accepted: {ACCEPTED}"
        )
    if not isinstance(loaded, dict) or not isinstance(loaded.get(STATE_KEY), Mapping):
        found = _some(list(loaded)) if isinstance(loaded, dict) else type(loaded).__name__
        raise WeightsError(
            f"weights {str(path)!r}: a torch.save file without a '{STATE_KEY}' mapping (found {found}); "
            f"accepted: {ACCEPTED}"
        )
    kind = "weights" if PROVENANCE_KEY in loaded else "recipe"
    run_config = loaded.get(CONFIG_KEY) if isinstance(loaded.get(CONFIG_KEY), dict) else None
    if run_config is None and isinstance(loaded.get("hyper_parameters"), Mapping):
        hp = loaded["hyper_parameters"]
        run_config = {key: hp[key] for key in ("model", "optimizer") if isinstance(hp.get(key), Mapping)} or None
    state = _strip_prefix(loaded[STATE_KEY], str(path))
    state = _poet_to_dense(state, run_config, str(path))
    return ModelWeights(state=state, run_config=run_config, kind=kind, path=str(path))


def _strip_prefix(state: Mapping[str, Any], path: str) -> dict[str, Tensor]:
    """The Llama's entries of a LightningModule state dict (``model.<key>`` -> ``<key>``); others (metric states) are
    dropped."""
    out = {k[len(MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(MODEL_PREFIX) and isinstance(v, Tensor)}
    if not out:
        raise WeightsError(
            f"weights {path!r}: its {STATE_KEY} holds no '{MODEL_PREFIX}*' tensor (found {_some(list(state))}); "
            f"accepted: {ACCEPTED}"
        )
    return out


def _poet_settings(run_config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    poet = ((run_config or {}).get("optimizer") or {}).get("poet")
    return dict(poet) if isinstance(poet, Mapping) else None


def _poet_to_dense(state: dict[str, Tensor], run_config: Mapping[str, Any] | None, path: str) -> dict[str, Tensor]:
    """Every POET layer's tensors (``<module>.weight0``, ``.q_out``, ...) replaced by ``<module>.weight`` = R W0 P,
    computed by a ``POETLinear`` holding them; the key order otherwise kept."""
    modules = [k[: -len(".weight0")] for k in state if k.endswith(".weight0")]
    if not modules:
        return state
    settings = _poet_settings(run_config)
    if settings is None or "block_size" not in settings or "neumann_terms" not in settings:
        raise WeightsError(
            f"weights {path!r} hold POET layers ({modules[0]}.weight0, ...) but no optimizer.poet settings "
            "(block_size, neumann_terms) to form W = R W0 P; accepted: a recipe checkpoint that stores its run config "
            "or its hyper-parameters (every checkpoint the recipe writes does)"
        )
    dense: dict[str, Tensor] = {}
    for module in modules:
        parts = {suffix: state.get(f"{module}.{suffix}") for suffix in POET_SUFFIXES}
        absent = [f"{module}.{suffix}" for suffix, t in parts.items() if t is None]
        if absent:
            raise WeightsError(f"weights {path!r}: POET layer {module} lacks {', '.join(absent)}")
        size = parts["q_out"].shape[-1]
        block = int(settings["block_size"])
        if generator_size(block) != size:
            raise WeightsError(
                f"weights {path!r}: {module}.q_out holds generators of {size} entries, which is not b(b-1)/2 for "
                f"optimizer.poet.block_size={block} of the run config"
            )
        w0 = parts["weight0"]
        bias = state.get(f"{module}.bias")
        layer = POETLinear(w0, block, int(settings["neumann_terms"]), 0, f"{module}.weight", bias)
        try:
            layer.load_state_dict({k: v for k, v in parts.items()} | ({} if bias is None else {"bias": bias}))
        except RuntimeError as err:
            raise WeightsError(f"weights {path!r}: POET layer {module}: {str(err).splitlines()[0]}") from None
        dense[module] = layer.effective_weight(torch.float64).to(w0.dtype)
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        module, _, suffix = key.rpartition(".")
        if module in dense and suffix in POET_SUFFIXES:
            if suffix == "weight0":
                out[f"{module}.weight"] = dense[module]
            continue
        out[key] = tensor
    return out


def _load_sharded(path: Path) -> ModelWeights:
    """The ``state_dict.model.*`` tensors of a ``torch.distributed.checkpoint`` directory, read whole in this process
    (the planner reassembles each tensor from every rank's shards), and the run config from ``meta.pt``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    problem = checkpoint_problem(path)
    if problem is not None:
        raise WeightsError(f"weights {str(path)!r}: incomplete sharded checkpoint ({problem}); accepted: {ACCEPTED}")
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    prefix = f"{STATE_KEY}."
    entries = {
        key[len(prefix) :]: info
        for key, info in metadata.state_dict_metadata.items()
        if key.startswith(prefix + MODEL_PREFIX) and isinstance(info, TensorStorageMetadata)
    }
    if not entries:
        raise WeightsError(
            f"weights {str(path)!r}: the sharded checkpoint holds no '{prefix}{MODEL_PREFIX}*' tensor (found "
            f"{_some(list(metadata.state_dict_metadata))}); accepted: a recipe checkpoint of trainer.strategy=fsdp2, "
            "or a full one (trainer.checkpoint_format=full)"
        )
    target = {STATE_KEY: {key: torch.empty(info.size, dtype=info.properties.dtype) for key, info in entries.items()}}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(target, checkpoint_id=str(path))
    except Exception as err:  # a reader failure deep inside the planner
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise WeightsError(
            f"weights {str(path)!r}: the sharded checkpoint could not be read in one process ({cause}); accepted: "
            "a full single-file checkpoint (run with trainer.checkpoint_format=full)"
        ) from None
    meta = torch.load(path / META, map_location="cpu", weights_only=True)
    run_config = meta.get(CONFIG_KEY) if isinstance(meta, dict) and isinstance(meta.get(CONFIG_KEY), dict) else None
    state = _strip_prefix(target[STATE_KEY], str(path))
    return ModelWeights(state=state, run_config=run_config, kind="sharded", path=str(path))


# ---------------------------------------------------------------------------------------------------- Hugging Face
def _hf_files(folder: Path) -> list[Path]:
    """The safetensors of a Hugging Face folder: ``model.safetensors``, else the index's files, else the
    ``model-0000x-of-0000y.safetensors`` shards."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise WeightsError(f"weights {str(index)!r}: not a safetensors index (no weight_map: {err})") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(p for p in folder.iterdir() if _HF_SHARD.match(p.name))


def hf_key(key: str) -> str | None:
    """A Hugging Face LLaMA key as ``Llama.state_dict()`` names it (the leading ``model.`` dropped); None for the
    ``rotary_emb.inv_freq`` buffers, which the recipe recomputes."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    return key[len(MODEL_PREFIX) :] if key.startswith(MODEL_PREFIX) else key


def _load_huggingface(path: Path) -> ModelWeights:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise WeightsError(
            f"weights {str(path)!r} are safetensors, which need the optional 'safetensors' package; install it with "
            f"pip install '{SAFETENSORS_EXTRA}' (or pip install safetensors)"
        ) from None
    files = _hf_files(path) if path.is_dir() else [path]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise WeightsError(f"weights {str(path)!r}: the safetensors index lists missing file(s) {missing}")
    state: dict[str, Tensor] = {}
    for file in files:
        try:
            loaded = load_file(str(file), device="cpu")
        except Exception as err:  # SafetensorError: truncated header or data
            cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise WeightsError(f"weights {str(file)!r}: not a readable safetensors file ({cause})") from None
        for key, tensor in loaded.items():
            mapped = hf_key(key)
            if mapped is not None:
                state[mapped] = tensor
    folder = path if path.is_dir() else path.parent
    hints = _hf_hints(folder / "config.json", state)
    return ModelWeights(state=state, run_config=None, kind="huggingface", path=str(path), hints=hints)


def _hf_hints(config_json: Path, state: dict[str, Tensor]) -> dict[str, Any]:
    """LlamaConfig fields from a Hugging Face ``config.json`` (when there is one); a tied head becomes an untied copy
    of the embedding in ``state``. Settings the recipe's LLaMA cannot express are refused."""
    if not config_json.is_file():
        return {}
    try:
        hf = json.loads(config_json.read_text())
    except ValueError as err:
        raise WeightsError(f"{config_json}: not JSON ({err})") from None
    if not isinstance(hf, dict):
        return {}
    heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    if kv_heads is not None and heads is not None and kv_heads != heads:
        raise WeightsError(
            f"{config_json}: num_key_value_heads={kv_heads} differs from num_attention_heads={heads} (grouped-query "
            "attention); accepted: multi-head attention (num_key_value_heads equal to num_attention_heads or unset)"
        )
    if hf.get("rope_scaling"):
        raise WeightsError(
            f"{config_json}: rope_scaling={hf['rope_scaling']!r}; accepted: no rope_scaling (the recipe's RoPE is "
            "plain theta^(-2i/D))"
        )
    if hf.get("tie_word_embeddings") and "lm_head.weight" not in state and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"].clone()
    return {field: hf[key] for key, field in _HF_FIELDS.items() if hf.get(key) is not None}


# ---------------------------------------------------------------------------------------------------------- writing
def _plain_problem(value: Any, where: str) -> str | None:
    """Where ``value`` holds something ``torch.load(weights_only=True)`` would refuse (not plain data)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return None
    if isinstance(value, (list, tuple)):
        return next((p for i, v in enumerate(value) if (p := _plain_problem(v, f"{where}[{i}]"))), None)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                return f"{where}: key {key!r} of type {type(key).__name__}"
            if problem := _plain_problem(item, f"{where}.{key}"):
                return problem
        return None
    return f"{where}: {type(value).__name__}"


def save_model_weights(
    path: str | os.PathLike[str],
    state: Mapping[str, Tensor],
    run_config: dict[str, Any] | None,
    provenance: dict[str, Any],
    overwrite: bool = False,
) -> None:
    """Writes ``{"state_dict": {"model." + key: tensor}, "run_config": run_config, "diagnose": provenance}`` to
    ``path``, which :func:`load_model_weights` reads back as kind ``weights`` and ``torch.load(weights_only=True)``
    opens. Written atomically: a temporary file in the same folder (created with its parents), then ``os.replace``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        WeightsError: ``run_config`` or ``provenance`` is not plain data (dicts, lists, str, numbers, bool, None), or
            ``state`` holds a non-tensor.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; accepted: a new path, or overwrite=True (--overwrite) to replace it")
    for name, value in (("run_config", run_config), ("provenance", provenance)):
        problem = _plain_problem(value, name)
        if problem is not None:
            raise WeightsError(f"save_model_weights: {problem} is not plain data; accepted: dict, list, str, number")
    bad = [key for key, value in state.items() if not isinstance(value, Tensor)]
    if bad:
        raise WeightsError(f"save_model_weights: state[{bad[0]!r}] is not a tensor; accepted: a key -> tensor mapping")
    payload = {
        STATE_KEY: {MODEL_PREFIX + key: value.detach().cpu().contiguous() for key, value in state.items()},
        CONFIG_KEY: run_config,
        PROVENANCE_KEY: provenance,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
