"""Test oracles built from PEFT and plain state dicts: an adapter inside a PEFT model (PEFT computes the
forward) and the dense ``W₀ + ΔW`` model. Only the tests use them; the library patches weights instead
(:mod:`orthomerge.patching`)."""
from __future__ import annotations

import torch
from torch import nn

from orthomerge.adapters import PREFIX, LoraAdapter, peft_config_dict
from orthomerge.errors import OrthomergeError
from orthomerge.evaluate import adapter_deltas
from orthomerge.patching import patched_state


def lora_config(adapter: LoraAdapter):
    """A ``peft.LoraConfig`` equivalent to what :func:`orthomerge.adapters.save_adapter` writes."""
    from peft import LoraConfig

    cfg = peft_config_dict(adapter)
    cfg.pop("peft_type")
    cfg["inference_mode"] = False
    return LoraConfig(**cfg)


def to_peft_model(model: nn.Module, adapter: LoraAdapter):
    """Wrap ``model`` with PEFT and load the adapter into it (PEFT computes the forward)."""
    from peft import get_peft_model, set_peft_model_state_dict

    peft_model = get_peft_model(model, lora_config(adapter))
    state = {f"{PREFIX}{m}.lora_A.weight": adapter.A[m] for m in adapter.modules}
    state.update({f"{PREFIX}{m}.lora_B.weight": adapter.B[m] for m in adapter.modules})
    state.update({f"{PREFIX}{k}": v for k, v in adapter.heads.items()})
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k or k.startswith(PREFIX)]
    if unexpected:
        raise OrthomergeError(f"{adapter.name}: keys not used by the model: {unexpected[:3]}")
    return peft_model.eval()


def merged_state_dict(model: nn.Module, adapter: LoraAdapter, head: bool = True) -> dict[str, torch.Tensor]:
    """``model``'s weights plus every ΔW of ``adapter`` (and its head): the dense merged model."""
    state = patched_state({k: v.clone() for k, v in model.state_dict().items()}, adapter_deltas(adapter))
    if head:
        state.update({k: v.clone() for k, v in adapter.heads.items()})
    return state
