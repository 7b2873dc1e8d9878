"""Shared helpers for the merge tests: a tiny BERT folder, random PEFT adapters, random factors, oracles."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch

from orthomerge.merge.registry import ModuleUpdates

NUM_LABELS = 3


def tiny_config(num_labels: int = NUM_LABELS):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)


@pytest.fixture(scope="session")
def merge_model_dir(tmp_path_factory) -> str:
    """A saved 2-layer hidden-32 BERT classifier (3 labels), so ``--model <folder>`` works offline."""
    from transformers import BertForSequenceClassification

    path = tmp_path_factory.mktemp("merge_bert")
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_config()).save_pretrained(path)
    return str(path)


def load_base(model_dir: str, num_labels: int = NUM_LABELS):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels).eval()


def make_adapter(model_dir: str, out: Path, r: int = 4, alpha: float = 8, seed: int = 1, rslora: bool = False,
                 rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                 targets=("query", "value"), num_labels: int = NUM_LABELS) -> Path:
    """A PEFT SEQ_CLS LoRA with random nonzero A, B and head, saved with ``save_pretrained``."""
    from peft import LoraConfig, get_peft_model

    model = load_base(model_dir, num_labels)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), task_type="SEQ_CLS",
                     use_rslora=rslora, rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "classifier" in name and "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    peft_model.save_pretrained(str(out))
    return Path(out)


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory, merge_model_dir):
    """Three adapters on the tiny base with different ranks/alphas, one with rsLoRA, one with rank_pattern."""
    root = tmp_path_factory.mktemp("merge_adapters")
    return [
        make_adapter(merge_model_dir, root / "task_a", r=4, alpha=8, seed=1),
        make_adapter(merge_model_dir, root / "task_b", r=2, alpha=3, seed=2, rslora=True),
        make_adapter(merge_model_dir, root / "task_c", r=3, alpha=6, seed=3,
                     rank_pattern={"layer.0.attention.self.query": 5},
                     alpha_pattern={"layer.0.attention.self.query": 4}),
    ]


def random_task(m: int = 24, n: int = 20, ranks=(3, 2, 4), weights=None, seed: int = 0,
                name: str = "mod") -> ModuleUpdates:
    """A :class:`ModuleUpdates` of random float32 factors (scale already folded)."""
    g = torch.Generator().manual_seed(seed)
    factors = [(torch.randn(m, r, generator=g), torch.randn(r, n, generator=g) / n**0.5) for r in ranks]
    weights = list(weights) if weights is not None else [1.0] * len(ranks)
    return ModuleUpdates(name=name, factors=factors, weights=weights, seeds=[seed * 100 + i for i in range(len(ranks))])


def permuted(task: ModuleUpdates, order) -> ModuleUpdates:
    return ModuleUpdates(name=task.name, factors=[task.factors[i] for i in order],
                      weights=[task.weights[i] for i in order], seeds=[task.seeds[i] for i in order],
                      grams=[task.grams[i] for i in order] if task.grams else None,
                      tokens=[task.tokens[i] for i in order] if task.tokens else None)


def deltas(task: ModuleUpdates) -> list[np.ndarray]:
    return [(b.double() @ a.double()).numpy() for b, a in task.factors]


def update(out) -> np.ndarray:
    """Dense float64 array of a rule's output (LowRank or Dense)."""
    if hasattr(out, "delta"):
        return out.delta.double().cpu().numpy()
    return (out.B.double() @ out.A.double()).cpu().numpy()


def rel(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def tokens(n: int = 4, length: int = 9, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def patched_logits(model_dir: str, deltas_by_module: dict, head: dict | None = None,
                   num_labels: int = NUM_LABELS) -> torch.Tensor:
    """Logits of base + ΔW patched directly into a copy of the model (the dense oracle)."""
    model = load_base(model_dir, num_labels)
    state = model.state_dict()
    with torch.no_grad():
        for m, d in deltas_by_module.items():
            state[f"{m}.weight"] += torch.as_tensor(d, dtype=torch.float32)
        for k, v in (head or {}).items():
            state[k] = v
    model.load_state_dict(state)
    with torch.no_grad():
        return model(**tokens()).logits


def peft_logits(model_dir: str, adapter_dir, num_labels: int = NUM_LABELS) -> torch.Tensor:
    """Logits through plain ``PeftModel.from_pretrained``."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(model_dir, num_labels), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(**tokens()).logits
