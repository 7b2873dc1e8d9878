"""What the data-driven methods (Fisher, AdaMerging, search) share: each adapter's rows, the base model
with each task's head, and LoRA updates applied by forward hooks (never a dense ΔW)."""
from __future__ import annotations

import contextlib

import torch

from ..errors import OrthomergeError
from ..models import model_for_heads


def data_split(item, split: str, samples: int, method: str):
    """Adapter i's rows for a data-driven method: ``item.<split>`` of a Task, or the Split itself; first ``samples``."""
    from ..tasks import Split

    data = item if isinstance(item, Split) else getattr(item, split)
    if samples and samples > 0:
        data = data.take(int(samples))
    if len(data) == 0:
        raise OrthomergeError(f"{method}: task {getattr(item, 'name', '')!r} has no {split} rows")
    return data


def adapter_templates(ctx) -> list[str | None]:
    """Per adapter, the causal-LM prompt template its task is scored with: the one it was trained with
    (its ``orthomerge.json`` config), else its task's own (``Task.template``), else the default."""
    from ..causal import task_template

    data = ctx.data or [None] * len(ctx.adapters)
    return [task_template(item, (a.metadata.get("config") or {}).get("prompt"))
            for a, item in zip(ctx.adapters, data)]


class TaskModels:
    """The base model with each task's head: one copy per distinct head shape, heads swapped in on demand.

    The copies hold the base weights W₀ (the adapters' updates are added by :func:`lowrank_hooks`).
    """

    def __init__(self, model, adapters, names):
        if any(a.task_type not in (None, "SEQ_CLS") for a in adapters):
            raise OrthomergeError(f"this merge scores a classification head; {adapters[0].task_type} adapters are "
                                  "not supported by it (use a data-free method, search or adamerging)")
        self.adapters = adapters
        base = model.state_dict()
        self.models, self.keys = {}, []
        for adapter, name in zip(adapters, names):
            key = tuple(sorted((k, tuple(v.shape)) for k, v in adapter.heads.items()))
            if key not in self.models:
                copy = model_for_heads(model, adapter.heads, name)
                copy.load_state_dict({**base, **adapter.heads}, strict=True)
                copy.requires_grad_(False)   # only module outputs / coefficients are differentiated
                self.models[key] = copy.eval()
            self.keys.append(key)

    def get(self, i: int):
        model = self.models[self.keys[i]]
        state = model.state_dict()
        with torch.no_grad():
            for k, v in self.adapters[i].heads.items():
                state[k].copy_(v)
        return model

    def num_labels(self, i: int) -> int:
        return int(self.get(i).config.num_labels)


@contextlib.contextmanager
def lowrank_hooks(model, factors: dict, coefficients=None, capture: dict | None = None):
    """Forward hooks adding ``(x Aᵀ ⊙ c) Bᵀ`` to each module's output: ``factors[name] = (B m×R, A R×n)``,
    ``coefficients(name)`` an optional length-R multiplier (differentiable), ``capture[name] = (x, out)``."""
    handles = []

    def make(name, b, a):
        def hook(module, inputs, out):
            x = inputs[0]
            h = x.to(torch.float32) @ a.T   # the update in float32 whatever the model's dtype
            if coefficients is not None:
                h = h * coefficients(name)
            out = out + (h @ b.T).to(out.dtype)
            if capture is not None:
                if not out.requires_grad:   # frozen base: still differentiate w.r.t. this output
                    out.requires_grad_()
                capture[name] = (x.detach(), out)
            return out
        return hook

    try:
        for name, (b, a) in factors.items():
            module = model.get_submodule(name)
            like = dict(device=module.weight.device, dtype=torch.float32)
            handles.append(module.register_forward_hook(make(name, b.to(**like), a.to(**like))))
        yield
    finally:
        for h in handles:
            h.remove()
