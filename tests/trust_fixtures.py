"""Builders for tests/test_trust.py: tiny random models saved as folders, PEFT adapters and PEFT oracles.

Everything here uses transformers / PEFT directly (never orthomerge), so the oracles are independent of
the code under test. Nothing is downloaded: models are built from configs with random weights.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import shutil
from pathlib import Path

import numpy as np
import torch

HEAD_PREFIXES = ("classifier.", "score.")


# ---------------------------------------------------------------- base models


def bert_config(hidden: int = 32, labels: int = 2):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=2 * hidden, max_position_embeddings=128, num_labels=labels)


def save_bert(path: Path, hidden: int = 32, labels: int = 2, bare: bool = False, seed: int = 0,
              tokenizer_from: str | None = None) -> Path:
    """A 2-layer BERT (classifier, or a bare ``BertModel``) saved to ``path``."""
    from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cls = BertModel if bare else BertForSequenceClassification
    cls(bert_config(hidden, labels)).save_pretrained(path)
    if tokenizer_from:
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)
    return Path(path)


def save_llama(path: Path, causal: bool = False, tokenizer: bool = True, pad: bool = True, labels: int = 2,
               seed: int = 0) -> Path:
    """A 2-layer hidden-32 Llama (causal LM or classifier), with a word tokenizer unless ``tokenizer=False``."""
    from conftest import word_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = word_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id if pad else None, num_labels=labels)
    if not pad:
        cfg.pad_token_id = None
    torch.manual_seed(seed)
    model = (LlamaForCausalLM if causal else LlamaForSequenceClassification)(cfg)
    model.save_pretrained(path)
    if tokenizer:
        tok.save_pretrained(path)
    return Path(path)


def config_only(src: str | Path, path: Path) -> Path:
    """A folder with only ``config.json`` (no weights, no tokenizer)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(src) / "config.json", path / "config.json")
    return path


def model_class(model_dir: str | Path):
    """The transformers class named in the folder's config.json ``architectures``."""
    import transformers

    arch = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch)


def load_base(model_dir: str | Path):
    return model_class(model_dir).from_pretrained(str(model_dir)).eval()


# ---------------------------------------------------------------- adapters


def make_lora(model_dir: str | Path, out: Path, *, r: int = 4, alpha: float = 8, seed: int = 1,
              targets=("query", "value"), task_type: str | None = "SEQ_CLS", safe: bool = True,
              **lora_kwargs) -> Path:
    """A PEFT LoRA on the model in ``model_dir`` with random nonzero A, B, heads and (trainable) biases."""
    from peft import LoraConfig, get_peft_model

    model = model_class(model_dir).from_pretrained(str(model_dir))
    targets = targets if isinstance(targets, str) else list(targets)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, task_type=task_type, **lora_kwargs)
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.requires_grad and name.endswith("bias"):    # bias="lora_only" / "all"
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.save_pretrained(str(out), safe_serialization=safe)
    return Path(out)


def pissa_converted(model_dir: str | Path, out: Path, init_dir: Path, seed: int = 11,
                    task_type: str | None = "FEATURE_EXTRACTION") -> Path:
    """A PiSSA adapter saved with ``path_initial_model_for_weight_conversion`` (i.e. converted to LoRA on W₀).

    Made without a head: PEFT 0.21's conversion drops ``modules_to_save`` tensors while keeping the config
    entry, so a converted SEQ_CLS adapter cannot be loaded even by PEFT itself.
    """
    from peft import LoraConfig, get_peft_model

    model = model_class(model_dir).from_pretrained(str(model_dir))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                  task_type=task_type, init_lora_weights="pissa"))
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(str(init_dir))
    peft_model.peft_config["default"].init_lora_weights = "pissa"
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(init_dir))
    return Path(out)


def edit_config(adapter_dir: Path, **changes) -> Path:
    path = Path(adapter_dir) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2))
    return Path(adapter_dir)


def adapter_modules(adapter_dir: Path) -> list[str]:
    """Module names (without ``base_model.model.``) that carry LoRA factors in an adapter file."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    prefix = "base_model.model."
    return sorted({k[len(prefix):].split(".lora_A")[0] for k in keys if ".lora_A" in k})


def head_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter's ``classifier.*`` / ``score.*`` tensors under model-relative names."""
    from safetensors.torch import load_file

    prefix = "base_model.model."
    out = {}
    for k, v in load_file(str(Path(adapter_dir) / "adapter_model.safetensors")).items():
        name = k[len(prefix):] if k.startswith(prefix) else k
        name = name.replace("modules_to_save.default.", "")
        if name.startswith(HEAD_PREFIXES) and "original_module" not in name and "modules_to_save" not in name:
            out[name] = v
    return out


# ---------------------------------------------------------------- oracles (PEFT only)


def peft_weight_deltas(model_dir: str | Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """``merge_and_unload`` state − base state, per changed tensor: PEFT's own view of the adapter."""
    from peft import PeftModel

    base = load_base(model_dir).state_dict()
    merged = PeftModel.from_pretrained(load_base(model_dir), str(adapter_dir)).merge_and_unload().state_dict()
    return {k: (merged[k].double() - base[k].double()) for k in base if not torch.equal(merged[k], base[k])}


def oracle_model(model_dir: str | Path, adapter_dirs, weights=None, head_from: Path | None = None):
    """Base + Σ wᵢ·(PEFT-merged adapter i − base), heads excluded; optionally one adapter's head."""
    weights = weights or [1.0] * len(adapter_dirs)
    model = load_base(model_dir)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    total = {}
    for d, w in zip(adapter_dirs, weights):
        heads = tuple(f"{h}." for h in json.loads((Path(d) / "adapter_config.json").read_text())
                      .get("modules_to_save") or [])
        for k, v in peft_weight_deltas(model_dir, d).items():
            if heads and k.startswith(heads):     # task heads (modules_to_save) are never merged
                continue
            total[k] = total.get(k, 0) + w * v
    for k, v in total.items():
        state[k] = (state[k].double() + v).to(state[k].dtype)
    if head_from is not None:
        state.update(head_tensors(head_from))
    model.load_state_dict(state)
    return model.eval()


def peft_model(model_dir: str | Path, adapter_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(model_dir), str(adapter_dir)).eval()


def bert_inputs(n: int = 3, length: int = 7, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def llama_inputs(n: int = 3, length: int = 7, seed: int = 0, vocab: int = 50) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def outputs(model, inputs: dict) -> torch.Tensor:
    """Logits, or ``last_hidden_state`` for a bare encoder."""
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def rel(x, y) -> float:
    x = np.asarray(torch.as_tensor(x).double())
    y = np.asarray(torch.as_tensor(y).double())
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def peft_factor_deltas(model_dir: str | Path, adapter_dir: Path) -> dict[str, np.ndarray]:
    """Per LoRA module, ``s·B@A`` in float64 as PEFT reads it (factors and scaling from the loaded layers)."""
    model = peft_model(model_dir, adapter_dir)
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a = module.lora_A["default"].weight.detach().double().numpy()
            b = module.lora_B["default"].weight.detach().double().numpy()
            key = name.replace("base_model.model.", "", 1)
            out[key] = module.scaling["default"] * (b @ a)
    return out
