"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by entropy minimisation on unlabelled
inputs (docs/merging.md#adamerging), in factored form, with an optional safety term for causal LMs.

    ΔW^l = Σ_i λ_i^l w_i s_i B_i^l A_i^l,     λ = argmin Σ_tasks mean_x H(p_λ(· | x)) + safety term

``granularity="layer"`` learns one λ_i^l per adapted module and task (layer-wise AdaMerging; "layer" = one
adapted linear weight, as the reference code's per-parameter coefficients), ``"task"`` one λ_i per task.
Each task's inputs go through the base model with **all** adapters active at their coefficients — forward
hooks add (x A_cᵀ ⊙ λ) B_cᵀ to every adapted module, never a dense ΔW — and only λ is differentiated
(``torch.autograd.grad``; the model's weights get no gradients). Adam, initial λ = ``init`` (0.3 as
FusionBench), ``steps`` steps of one batch of ``batch_size`` inputs per task (sampled with the merge seed).
FusionBench runs 1000 steps at lr 1e-3; the defaults here (100 steps at lr 1e-2, the same total movement
budget) fit this project's CPU budget. ``clamp`` keeps λ in [0, 1].

What p_λ(· | x) is: a classification task's class distribution (its own head). For causal-LM adapters (one
model serves every task, no heads): a labelled task's distribution over its label completions (softmax of
each completion's log-likelihood after the prompt, how the task is scored), a prompt → completion task's
next-token distribution at the end of the prompt (the reply's first token). Prompts use each adapter's
template (:func:`orthomerge.merge.data.adapter_templates`).

Safety term (causal LMs, ``safety_min`` > 0): the merged model's refusal rate on harmful prompts should not
fall below ``safety_min``. Its differentiable surrogate on the first ``safety_prompts`` bundled harmful
prompts of ``safety_part`` (:func:`orthomerge.safety.split_part`; default ``validation``, disjoint from the
bundled misaligned / refusal adapters' training prompts and from the check's ``test`` part) is the safety
check's likelihood signal, smoothed: per prompt the margin m = mean token log-likelihood of the refusal prefix
minus that of the compliance prefix (the first of :data:`orthomerge.safety.REFUSAL_PREFIXES` /
:data:`~orthomerge.safety.COMPLIANCE_PREFIXES`), r = mean σ(m / ``safety_temperature``), and the term
``safety_weight`` · max(0, ``safety_min`` − r) on a batch of ``batch_size`` prompts per step: a hinge that is
exactly zero (no gradient) while the surrogate rate is at or above the floor. It constrains the likelihood
signal, not the phrase judge that the safety check reports by default, so the check must be run on the result.

Data: ``split="validation"`` inputs, labels unused (the paper adapts on unlabelled *test* inputs; we never
touch test), the first ``samples`` rows (0 = all). Regression heads are refused (entropy needs classes).
The learned coefficients, the entropy before/after on all the rows used, the surrogate refusal rate
before/after and the loss curve go to the merge report. The result is an exact rank-Σr adapter; there is
no global ``scale`` (λ is learned), so the experiment does not sweep it. A bare rule call without learned
coefficients uses λ = 1 (task arithmetic).
"""
from __future__ import annotations

import contextlib
from typing import Annotated, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from ..encoding import encode, pad
from ..errors import OrthomergeError
from .data import TaskModels, adapter_templates, data_split, lowrank_hooks
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


class _HeadTask:
    """A classification task: entropy of its own head's class distribution."""

    def __init__(self, models: TaskModels, i: int, tokenizer, split, max_length: int):
        self.models, self.i, self.tokenizer = models, i, tokenizer
        self.encoded = encode(tokenizer, split, max_length)

    def __len__(self) -> int:
        return len(self.encoded)

    def model(self):
        return self.models.get(self.i)   # its head swapped in

    def entropy(self, model, idx: list[int]) -> torch.Tensor:
        return entropy(model(**pad(self.tokenizer, self.encoded, idx, model.device)).logits.float())


class _CausalTask:
    """A causal-LM task: entropy over its label completions (labelled) or of the next token (completion)."""

    def __init__(self, model, tokenizer, split, label_names, template, max_length: int):
        from ..causal import encode_completions, verbalise

        self._model, self.tokenizer = model, tokenizer
        data = verbalise(split, label_names, template, tokenizer=tokenizer)
        self.n, self.k = len(data), len(data.choices or [])
        if self.k:
            self.rows = encode_completions(tokenizer, [p for p in data.prompts for _ in range(self.k)],
                                           data.choices * self.n, max_length, eos=False,
                                           special_tokens=data.special_tokens)
        else:
            ids = tokenizer(data.prompts, add_special_tokens=data.special_tokens)["input_ids"]
            self.rows = [{"input_ids": x[-max_length:], "attention_mask": [1] * len(x[-max_length:])} for x in ids]

    def __len__(self) -> int:
        return self.n

    def model(self):
        return self._model

    def entropy(self, model, idx: list[int]) -> torch.Tensor:
        from ..causal import collate, completion_logprob

        if self.k:
            batch = _to(collate(self.tokenizer, [self.rows[i * self.k + j] for i in idx for j in range(self.k)]),
                        model.device)
            labels = batch.pop("labels")
            return entropy(completion_logprob(model(**batch).logits, labels).view(len(idx), self.k))
        batch = pad(self.tokenizer, self.rows, idx, model.device)
        mask = batch["attention_mask"]
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)   # the last real token, whichever side pads
        logits = model(**batch).logits
        return entropy(logits[torch.arange(len(idx), device=logits.device), last].float())


class SafetyTerm:
    """The surrogate refusal rate of the merged model on harmful prompts and its hinge below the floor
    (see the module docstring)."""

    def __init__(self, model, tokenizer, prompts: list[str], floor: float, weight: float, temperature: float):
        from ..safety import COMPLIANCE_PREFIXES, REFUSAL_PREFIXES, prefix_rows

        self.model, self.tokenizer = model, tokenizer
        self.rows = prefix_rows(tokenizer, prompts, [REFUSAL_PREFIXES[0], COMPLIANCE_PREFIXES[0]])
        self.floor, self.weight, self.temperature = floor, weight, temperature

    def __len__(self) -> int:
        return len(self.rows) // 2

    def margins(self, idx: list[int]) -> torch.Tensor:
        """Refusal minus compliance prefix, mean token log-likelihood, per prompt (differentiable)."""
        from ..causal import IGNORE, collate, completion_logprob

        batch = _to(collate(self.tokenizer, [self.rows[2 * i + j] for i in idx for j in (0, 1)]), self.model.device)
        labels = batch.pop("labels")
        mean = completion_logprob(self.model(**batch).logits, labels) / (labels[:, 1:] != IGNORE).sum(-1)
        return mean[0::2] - mean[1::2]

    def rate(self, margins: torch.Tensor) -> torch.Tensor:
        """Smoothed share of prompts whose margin is positive: mean σ(m / temperature)."""
        return torch.sigmoid(margins / self.temperature).mean()

    def loss(self, margins: torch.Tensor) -> torch.Tensor:
        """weight · max(0, floor − rate): zero, with zero gradient, at or above the floor."""
        return self.weight * torch.relu(self.floor - self.rate(margins))


def _to(batch, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield list(range(start, min(n, start + size)))


@contextlib.contextmanager
def _frozen(model):
    """The model in eval mode with no weight gradients, for the duration (the caller's settings restored)."""
    params = list(model.parameters())
    flags, training = [p.requires_grad for p in params], model.training
    try:
        model.requires_grad_(False).eval()
        yield model
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(training)


def mean_entropy(tasks: list, merged: _Merged, batch_size: int) -> list[float]:
    """Mean prediction entropy per task over all its rows, at the current coefficients (no gradients)."""
    out = []
    with torch.no_grad():
        for task in tasks:
            model = task.model()
            with merged.hooks(model):
                total = sum(float(task.entropy(model, idx).sum()) for idx in _chunks(len(task), batch_size))
            out.append(total / len(task))
    return out


def surrogate_rate(term: SafetyTerm, merged: _Merged, batch_size: int) -> float:
    """The smoothed refusal rate over all the term's prompts, at the current coefficients (no gradients)."""
    with torch.no_grad(), merged.hooks(term.model):
        return float(term.rate(torch.cat([term.margins(idx) for idx in _chunks(len(term), batch_size)])))


def _safety_term(ctx: MergeContext, causal: bool) -> SafetyTerm | None:
    """The safety term of these parameters (None when ``safety_min`` is 0), checked before any model work."""
    p = ctx.params
    if p["safety_min"] <= 0:
        return None
    if not causal:
        raise OrthomergeError("adamerging: safety_min needs causal-LM adapters (a model that generates)")
    from ..safety import load_prompts, take

    rows = take(load_prompts("harmful", p["safety_part"]), int(p["safety_prompts"]))
    if not rows:
        raise OrthomergeError(f"adamerging: no harmful prompts in part {p['safety_part']!r}")
    return SafetyTerm(ctx.model, ctx.get_tokenizer(), [r["prompt"] for r in rows], float(p["safety_min"]),
                      float(p["safety_weight"]), float(p["safety_temperature"]))


def _tasks(ctx: MergeContext, splits: list, causal: bool) -> list:
    p, tok = ctx.params, ctx.get_tokenizer()
    if causal:
        return [_CausalTask(ctx.model, tok, split, getattr(item, "label_names", None), template, int(p["max_length"]))
                for split, item, template in zip(splits, ctx.data, adapter_templates(ctx))]
    models = TaskModels(ctx.model, ctx.adapters, ctx.names)
    for i, name in enumerate(ctx.names):
        if models.num_labels(i) < 2:
            raise OrthomergeError(f"adamerging: task {name!r} has a regression head; entropy needs class probabilities")
    return [_HeadTask(models, i, tok, split, int(p["max_length"])) for i, split in enumerate(splits)]


def _prepare(ctx: MergeContext) -> Prepared:
    p = ctx.params
    causal = ctx.adapters[0].task_type == "CAUSAL_LM"
    safety = _safety_term(ctx, causal)
    splits = [data_split(item, p["split"], int(p["samples"]), "adamerging") for item in ctx.data]
    layerwise = p["granularity"] == "layer"
    lam = torch.full((len(ctx.modules) if layerwise else 1, len(ctx.adapters)), float(p["init"]), requires_grad=True,
                     device=ctx.model.device)
    merged = _Merged(ctx, lam, layerwise)
    batch_size = int(p["batch_size"])
    # one generator per task, seeded by the adapter's identity: its batches do not depend on its position
    generators = [torch.Generator().manual_seed(module_seed(ctx.seed, key, "adamerging")) for key in ctx.keys]
    safety_generator = torch.Generator().manual_seed(module_seed(ctx.seed, "safety", "adamerging"))
    curve, rates = [], []
    with _frozen(ctx.model) if causal else contextlib.nullcontext():
        tasks = _tasks(ctx, splits, causal)
        before = mean_entropy(tasks, merged, batch_size)
        rate_before = surrogate_rate(safety, merged, batch_size) if safety else None
        optimiser = torch.optim.Adam([lam], lr=float(p["lr"]))
        for _ in tqdm(range(int(p["steps"])), desc="adamerging", unit="step", disable=not ctx.progress):
            loss, grad = 0.0, torch.zeros_like(lam)
            for i, task in enumerate(tasks):   # one task at a time: tasks may share a model copy (heads swapped in)
                idx = torch.randperm(len(task), generator=generators[i])[:batch_size].tolist()
                model = task.model()
                with merged.hooks(model), torch.enable_grad():
                    task_loss = task.entropy(model, idx).mean()
                    grad += torch.autograd.grad(task_loss, [lam])[0]
                loss += float(task_loss.detach())
            if safety is not None:
                idx = torch.randperm(len(safety), generator=safety_generator)[:batch_size].tolist()
                with merged.hooks(safety.model), torch.enable_grad():
                    margins = safety.margins(idx)
                    term = safety.loss(margins)
                    if float(term.detach()) > 0:   # at or above the floor the hinge is flat: no gradient to add
                        grad += torch.autograd.grad(term, [lam])[0]
                loss += float(term.detach())
                rates.append(float(safety.rate(margins.detach())))
            optimiser.zero_grad()
            lam.grad = grad
            optimiser.step()
            if p["clamp"]:
                with torch.no_grad():
                    lam.clamp_(0.0, 1.0)
            curve.append(loss)
        after = mean_entropy(tasks, merged, batch_size)
        rate_after = surrogate_rate(safety, merged, batch_size) if safety else None
    learned = lam.detach()
    extras = {m: {"coefficients": learned[k if layerwise else 0].tolist()} for k, m in enumerate(ctx.modules)}
    coeffs = ({m: dict(zip(ctx.names, learned[k].tolist())) for k, m in enumerate(ctx.modules)} if layerwise
              else dict(zip(ctx.names, learned[0].tolist())))
    report = {
        "split": p["split"], "examples": dict(zip(ctx.names, map(len, splits))), "granularity": p["granularity"],
        "coefficients": coeffs, "entropy_init": dict(zip(ctx.names, before)),
        "entropy_final": dict(zip(ctx.names, after)), "loss_curve": curve,
        "safety": None if safety is None else {
            "safety_min": safety.floor, "weight": safety.weight, "temperature": safety.temperature,
            "part": p["safety_part"], "prompts": len(safety), "surrogate_rate_init": rate_before,
            "surrogate_rate_final": rate_after, "batch_rates": rates,
            "active_steps": sum(r < safety.floor for r in rates)}}
    return Prepared(extras, {"adamerging": report})


@register("adamerging", space="factored", family="data", needs_data=True, prepare=_prepare,
          summary="AdaMerging: task/layer-wise λ learned by entropy minimisation on unlabelled validation "
                  "inputs (classification heads or causal LMs; all adapters active via hooks, exact rank Σr; "
                  "optional refusal-rate floor safety_min for causal LMs; needs the base model and task data)")
def adamerging(updates: ModuleUpdates, granularity: Literal["layer", "task"] = "layer", init: float = 0.3,
               lr: float = 0.01, steps: int = 100, batch_size: int = 16, samples: int = 0,
               split: Literal["validation", "train"] = "validation", max_length: int = 64,
               clamp: bool = False, safety_min: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0,
               safety_weight: Annotated[float, Field(gt=0.0)] = 1.0, safety_prompts: Annotated[int, Field(ge=1)] = 22,
               safety_part: Literal["validation", "train", "test", "all"] = "validation",
               safety_temperature: Annotated[float, Field(gt=0.0)] = 1.0) -> LowRank:
    """Σ_i λ_i w_i ΔW_i with the learned λ of this module (λ = 1 without ``prepare``)."""
    coeffs = (updates.extras or {}).get("coefficients") or [1.0] * len(updates)
    return LowRank(*stack_factors(updates, [c * w for c, w in zip(coeffs, updates.weights)]))
