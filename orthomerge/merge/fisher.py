"""Fisher merging (Matena & Raffel, NeurIPS 2022) with an exact per-example diagonal Fisher of every
module's weight (docs/merging.md#fisher), and the model/data plumbing the data-driven methods share.

Per adapted module W (m×n) and task i, the diagonal Fisher of the merged-space weight W = W₀ + ΔW_i
(the expert θ_i, task i's own head) over task i's examples::

    F_i = (1/N) Σ_x E_y[ g_{x,y} ⊙ g_{x,y} ],   g_{x,y} = ∂ log p(y|x) / ∂W = Σ_tokens (∂ log p/∂out_t) x_tᵀ

computed exactly per example (hooks capture each module's input and the gradient at its output; no
batch-level squaring, unlike MergeLM/FusionBench which square the gradient of a batch sum). E_y is
``labels="expected"`` (default, the true Fisher: Σ_y p(y|x) g², one backward pass per class),
``"gold"`` (the empirical Fisher with the data's labels) or ``"sample"`` (y ~ p(y|x), seeded).
Regression heads use a unit-variance Gaussian: g = (y − ŷ)∂ŷ (gold), ε∂ŷ with ε ~ N(0,1) (sample) or ∂ŷ
(expected, E[(y−ŷ)²] = 1). Merge, with F̃_i = F_i + ``floor`` (FusionBench's additive
``minimal_fisher_weight`` = 1e-6)::

    ΔW = λ Σ_i c_i F̃_i ⊙ ΔW_i / Σ_i |c_i| F̃_i,   c_i = w_i / (‖F_i‖ + floor) if ``normalize_fisher`` else w_i

(``normalize_fisher``: FusionBench's ``normalize_fisher_weight``, each task's Fisher divided by its L2 norm
over all adapted modules). For weights ≥ 0 this is the paper's weighted Fisher average; |c_i| in the
denominator extends it to negative weights (task negation), which the paper does not define.

Data: ``split="train"`` (default: Matena & Raffel estimate the Fisher on training data; never test),
the first ``samples`` rows (256, FusionBench's usual ``num_fisher_examples``). Memory: one dense m×n
Fisher per module and task, plus a ``batch_size``×m×n per-example gradient buffer. A bare rule call
without Fishers uses the isotropic Fisher (F = 1: the weighted average, the paper's "isotropic merging"
baseline); through the API a missing model or data is an error.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from ..errors import OrthomergeError
from ..encoding import batches
from .data import TaskModels, data_split, lowrank_hooks
from .registry import Dense, MergeContext, ModuleUpdates, Prepared, register

# ---------------------------------------------------------------- the Fisher


def _targets(logits: torch.Tensor, labels, mode: str, generator: torch.Generator):
    """``[(scalar whose per-example gradients are g, per-example weight or None), ...]``."""
    if logits.shape[-1] == 1:                      # regression, unit-variance Gaussian
        pred = logits[:, 0]
        if mode == "gold":
            return [(((torch.tensor(labels, dtype=pred.dtype, device=pred.device) - pred).detach() * pred).sum(), None)]
        if mode == "sample":
            return [((torch.randn(pred.shape, generator=generator).to(pred.device) * pred).sum(), None)]
        return [(pred.sum(), None)]
    logp = torch.log_softmax(logits, -1)
    if mode == "expected":
        probs = logp.exp().detach()
        return [(logp[:, c].sum(), probs[:, c]) for c in range(logp.shape[-1])]
    if mode == "gold":
        y = torch.tensor(labels, dtype=torch.long, device=logits.device)
    else:
        y = torch.multinomial(logp.exp().detach().cpu(), 1, generator=generator)[:, 0].to(logits.device)
    return [(logp[torch.arange(len(y), device=y.device), y].sum(), None)]


def diagonal_fisher(model, tokenizer, split, factors: dict, labels: str = "expected", max_length: int = 64,
                    batch_size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-example diagonal Fisher (m×n, float32) of every module in ``factors`` at W₀ + B A (see module doc)."""
    if labels == "gold" and any(y is None for y in split.labels):
        raise OrthomergeError("fisher labels='gold' needs labelled rows (or use labels='expected')")
    modules = list(factors)
    device = next(model.parameters()).device
    fisher = {m: torch.zeros(model.get_submodule(m).weight.shape, dtype=torch.float32, device=device) for m in modules}
    generator = torch.Generator().manual_seed(seed)
    capture: dict = {}
    with lowrank_hooks(model, factors, capture=capture), torch.enable_grad():
        for idx, batch in batches(tokenizer, split, max_length, batch_size, device=device):
            capture.clear()
            logits = model(**batch).logits.float()
            xs = [capture[m][0] for m in modules]
            outs = [capture[m][1] for m in modules]
            terms = _targets(logits, [split.labels[i] for i in idx], labels, generator)
            for k, (target, weight) in enumerate(terms):
                grads = torch.autograd.grad(target, outs, retain_graph=k < len(terms) - 1, allow_unused=True)
                for m, x, g in zip(modules, xs, grads):
                    if g is None:
                        continue
                    b = x.shape[0]
                    per = torch.einsum("blo,bli->boi", g.reshape(b, -1, g.shape[-1]).float(),
                                       x.reshape(b, -1, x.shape[-1]).float())
                    sq = per.square_()
                    if weight is not None:
                        sq.mul_(weight.view(-1, 1, 1))
                    fisher[m] += sq.sum(0)
    for m in modules:
        fisher[m] /= len(split)
    return fisher


def _prepare(ctx: MergeContext) -> Prepared:
    p = ctx.params
    models = TaskModels(ctx.model, ctx.adapters, ctx.names)
    tok = ctx.get_tokenizer()
    fishers, sizes = [], []
    for i, adapter in enumerate(ctx.adapters):
        split = data_split(ctx.data[i], p["split"], int(p["samples"]), "fisher")
        fishers.append(diagonal_fisher(models.get(i), tok, split, {m: adapter.scaled_factors(m) for m in ctx.modules}, p["labels"],
                                       int(p["max_length"]), int(p["batch_size"]), ctx.seed))
        sizes.append(len(split))
    norms = [math.sqrt(sum(float((f * f).sum()) for f in fi.values())) for fi in fishers]
    extras = {m: {"fisher": [fi[m] for fi in fishers], "fisher_norms": norms} for m in ctx.modules}
    return Prepared(extras, {"fisher": {"split": p["split"], "examples": dict(zip(ctx.names, sizes)),
                                        "labels": p["labels"], "norms": dict(zip(ctx.names, norms))}})


@register("fisher", space="dense", family="data", needs_data=True, prepare=_prepare,
          summary="Fisher merging: Σ c_i F_i ⊙ ΔW_i / Σ c_i F_i with exact per-example diagonal Fishers of "
                  "each module's W (needs the base model and task data, train split)")
def fisher(updates: ModuleUpdates, scale: float = 1.0, floor: float = 1e-6, normalize_fisher: bool = True,
           labels: Literal["expected", "gold", "sample"] = "expected", split: Literal["train", "validation"] = "train",
           samples: int = 256, batch_size: int = 16, max_length: int = 64) -> Dense:
    """Fisher-weighted average of the ΔW_i of one module (Fishers from ``prepare``; isotropic without)."""
    if floor < 0:
        raise OrthomergeError(f"fisher: floor={floor} must be ≥ 0")
    extras = updates.extras or {}
    fishers = extras.get("fisher") or [None] * len(updates)
    norms = extras.get("fisher_norms")
    coeffs = [w / (n + floor) if normalize_fisher and norms and n + floor > 0 else w
              for w, n in zip(updates.weights, norms or [0.0] * len(updates))]
    like = dict(dtype=torch.float64, device=updates.device)
    num = torch.zeros(updates.shape, **like)
    den = torch.zeros(updates.shape, **like)
    for i, (f, c) in enumerate(zip(fishers, coeffs)):
        ft = (f.to(**like) if f is not None else torch.ones(updates.shape, **like)) + floor
        num += (c * ft) * updates.full(i).to(torch.float64)
        den += abs(c) * ft
    out = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    return Dense((scale * out).to(torch.float32))
