"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by entropy minimisation on unlabelled
inputs (docs/merging.md#adamerging), in factored form.

    ΔW^l = Σ_i λ_i^l w_i s_i B_i^l A_i^l,     λ = argmin Σ_tasks mean_x H(softmax f_λ(x; head_i))

``granularity="layer"`` learns one λ_i^l per adapted module and task (layer-wise AdaMerging; "layer" = one
adapted linear weight, as the reference code's per-parameter coefficients), ``"task"`` one λ_i per task.
Each task's inputs go through the base model with **all** adapters active at their coefficients — forward
hooks add (x A_cᵀ ⊙ λ) B_cᵀ to every adapted module, never a dense ΔW — and that task's own head; only λ is
differentiated (``torch.autograd.grad``; the model's weights get no gradients). Adam, initial λ = ``init``
(0.3 as FusionBench), ``steps`` steps of one batch of ``batch_size`` inputs per task (sampled with the
merge seed). FusionBench runs 1000 steps at lr 1e-3; the defaults here (100 steps at lr 1e-2, the same
total movement budget) fit this project's CPU budget. ``clamp`` keeps λ in [0, 1].

Data: ``split="validation"`` inputs, labels unused (the paper adapts on unlabelled *test* inputs; we never
touch test), the first ``samples`` rows (0 = all). Classification heads only (entropy needs classes).
The learned coefficients, the entropy before/after on all the rows used, and the loss curve go to the
merge report. The result is an exact rank-Σr adapter; there is no global ``scale`` (λ is learned), so the
experiment does not sweep it. A bare rule call without learned coefficients uses λ = 1 (task arithmetic).
"""
from __future__ import annotations

from typing import Literal

import torch

from ..errors import OrthomergeError
from ..encoding import batches, encode, pad
from .data import TaskModels, data_split, lowrank_hooks
from .linear import stack_factors
from .registry import LowRank, MergeContext, ModuleUpdates, Prepared, module_seed, register


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits), per row."""
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


class _Merged:
    """All adapters as hooks whose per-rank multipliers read the coefficient tensor ``lam`` [rows, T]."""

    def __init__(self, ctx: MergeContext, lam: torch.Tensor, layerwise: bool):
        self.factors, self.index = {}, {}
        for k, m in enumerate(ctx.modules):
            parts = [a.scaled_factors(m, w) for a, w in zip(ctx.adapters, ctx.weights)]
            self.factors[m] = (torch.cat([b for b, _ in parts], 1), torch.cat([a for _, a in parts], 0))
            owner = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor([a.shape[0] for _, a in parts]))
            owner = owner.to(lam.device)
            self.index[m] = (k if layerwise else 0, owner)
        self.lam = lam

    def coefficients(self, name: str) -> torch.Tensor:
        row, owner = self.index[name]
        return self.lam[row, owner]

    def hooks(self, model):
        return lowrank_hooks(model, self.factors, self.coefficients)


def mean_entropy(models: TaskModels, merged: _Merged, splits: list, tokenizer, max_length: int,
                 batch_size: int) -> list[float]:
    """Mean prediction entropy per task over all its rows, at the current coefficients (no gradients)."""
    out = []
    with torch.no_grad():
        for i, split in enumerate(splits):
            model = models.get(i)
            total = 0.0
            with merged.hooks(model):
                for _, batch in batches(tokenizer, split, max_length, batch_size, device=model.device):
                    total += float(entropy(model(**batch).logits.float()).sum())
            out.append(total / len(split))
    return out


def _prepare(ctx: MergeContext) -> Prepared:
    p = ctx.params
    tok = ctx.get_tokenizer()
    models = TaskModels(ctx.model, ctx.adapters, ctx.names)
    for i, name in enumerate(ctx.names):
        if models.num_labels(i) < 2:
            raise OrthomergeError(f"adamerging: task {name!r} has a regression head; entropy needs class probabilities")
    splits = [data_split(item, p["split"], int(p["samples"]), "adamerging") for item in ctx.data]
    layerwise = p["granularity"] == "layer"
    lam = torch.full((len(ctx.modules) if layerwise else 1, len(ctx.adapters)), float(p["init"]), requires_grad=True,
                     device=ctx.model.device)
    merged = _Merged(ctx, lam, layerwise)
    encoded = [encode(tok, s, int(p["max_length"])) for s in splits]
    sizes = int(p["max_length"]), int(p["batch_size"])
    before = mean_entropy(models, merged, splits, tok, *sizes)
    optimiser = torch.optim.Adam([lam], lr=float(p["lr"]))
    # one generator per task, seeded by the adapter's identity: its batches do not depend on its position
    generators = [torch.Generator().manual_seed(module_seed(ctx.seed, key, "adamerging")) for key in ctx.keys]
    curve = []
    for _ in range(int(p["steps"])):
        loss, grad = 0.0, torch.zeros_like(lam)
        for i, enc in enumerate(encoded):   # one task at a time: tasks may share a model copy (heads swapped in)
            idx = torch.randperm(len(enc), generator=generators[i])[:int(p["batch_size"])].tolist()
            model = models.get(i)
            batch = pad(tok, enc, idx, model.device)
            with merged.hooks(model), torch.enable_grad():
                task_loss = entropy(model(**batch).logits.float()).mean()
                grad += torch.autograd.grad(task_loss, [lam])[0]
            loss += float(task_loss.detach())
        optimiser.zero_grad()
        lam.grad = grad
        optimiser.step()
        if p["clamp"]:
            with torch.no_grad():
                lam.clamp_(0.0, 1.0)
        curve.append(loss)
    after = mean_entropy(models, merged, splits, tok, *sizes)
    learned = lam.detach()
    extras = {m: {"coefficients": learned[k if layerwise else 0].tolist()} for k, m in enumerate(ctx.modules)}
    coeffs = ({m: dict(zip(ctx.names, learned[k].tolist())) for k, m in enumerate(ctx.modules)} if layerwise
              else dict(zip(ctx.names, learned[0].tolist())))
    return Prepared(extras, {"adamerging": {
        "split": p["split"], "examples": dict(zip(ctx.names, map(len, splits))), "granularity": p["granularity"],
        "coefficients": coeffs, "entropy_init": dict(zip(ctx.names, before)),
        "entropy_final": dict(zip(ctx.names, after)), "loss_curve": curve}})


@register("adamerging", space="factored", family="data", needs_data=True, prepare=_prepare,
          summary="AdaMerging: task/layer-wise λ learned by entropy minimisation on unlabelled validation "
                  "inputs (all adapters active via hooks, exact rank Σr; needs the base model and task data)")
def adamerging(updates: ModuleUpdates, granularity: Literal["layer", "task"] = "layer", init: float = 0.3,
               lr: float = 0.01, steps: int = 100, batch_size: int = 16, samples: int = 0,
               split: Literal["validation", "train"] = "validation", max_length: int = 64,
               clamp: bool = False) -> LowRank:
    """Σ_i λ_i w_i ΔW_i with the learned λ of this module (λ = 1 without ``prepare``)."""
    coeffs = (updates.extras or {}).get("coefficients") or [1.0] * len(updates)
    return LowRank(*stack_factors(updates, [c * w for c, w in zip(coeffs, updates.weights)]))
