"""Safety-aware merging: search on causal-LM adapters keeps only merges whose refusal rate on harmful
prompts stays at or above ``safety_min``; the refusal rate is the real generation path with a stubbed
judge (a tiny random LM refuses nothing, so the judge reads the merge's size instead). AdaMerging on causal
LMs (entropies of the scored distributions) and its safety term, against planted safe / unsafe adapters."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_real_models import sentiment, topic
from trust_fixtures import save_llama

import orthomerge.safety as safety
from orthomerge.adapters import save_adapter
from orthomerge.causal import CHAT
from orthomerge.errors import OrthomergeError
from orthomerge.merge import merge_adapters
from orthomerge.safety import load_prompts
from orthomerge.safety_tasks import COMPLIANT
from orthomerge.tasks import Split, Task
from orthomerge.train import TrainConfig, train_adapter

MODULE = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def causal_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety_aware")
    base = str(save_llama(root / "base", causal=True))
    config = TrainConfig(task_type="CAUSAL_LM", rank=4, epochs=3, lr=2e-2, batch_size=8)
    tasks = [sentiment(), topic()]
    dirs = [save_adapter(train_adapter(base, t, config, progress=False), root / t.name) for t in tasks]
    return base, dirs, tasks


def test_search_scores_causal_lm_adapters_by_label_likelihood(causal_adapters):
    base, dirs, tasks = causal_adapters
    result = merge_adapters(dirs, "search", model=base, data=tasks, methods="task_arithmetic",
                            lambdas="0.25,1.0", min_samples=4, dense=True)
    trials = result.report["search"]["trials"]
    assert {t["lambda"] for t in trials} == {0.25, 1.0} and result.report["search"]["safety"] is None


def test_refusal_rate_is_the_safety_reports_phrase_rate(causal_adapters):
    base, _, _ = causal_adapters
    from orthomerge.models import load_model, load_tokenizer

    model, tok = load_model(base, task_type="CAUSAL_LM"), load_tokenizer(base)
    rate = safety.refusal_rate(model, tok, limit=4, max_new_tokens=6)
    report = safety.safety_report(model, tok, limit=4, max_new_tokens=6, detector="phrase", progress=False)
    assert rate == report["harmful"]["rate"]


def test_safety_floor_rules_out_unsafe_merges(causal_adapters, monkeypatch):
    base, dirs, tasks = causal_adapters
    from orthomerge.models import load_model

    w0 = load_model(base, task_type="CAUSAL_LM").get_submodule(MODULE).weight.detach().clone()
    full = float(merge_adapters(dirs, "task_arithmetic", model=base, dense=True).delta(MODULE).norm())
    limits = []

    def refusal_by_size(model, tokenizer, limit=None, **kw):
        """A planted judge: the merge "refuses" (rate 1) while its update is small, so λ = 0.1 is the only
        merge above the floor; it sees the patched model the search scores."""
        limits.append(limit)
        return 1.0 if float((model.get_submodule(MODULE).weight - w0).norm()) < 0.5 * full else 0.0

    monkeypatch.setattr(safety, "refusal_rate", refusal_by_size)
    common = dict(model=base, data=tasks, methods="task_arithmetic", lambdas="0.1,1.0", min_samples=4, dense=True,
                  objective="raw")
    safe = merge_adapters(dirs, "search", safety_min=0.5, safety_prompts=2, **common)
    report = safe.report["search"]["safety"]
    assert safe.report["search"]["best"]["lambda"] == 0.1
    assert report["rejected"] == 1 and report["refusal_rates"] == [0.0, 1.0] and set(limits) == {2}
    # the layer-wise strategy honours the floor too: the judged module is in layer 0, which must take λ = 0.1
    found = merge_adapters(dirs, "search", safety_min=0.5, safety_prompts=2, strategy="layerwise", episodes=4,
                           **common)
    assert found.report["search"]["best"]["plan"]["0"]["scale"] == 0.1
    assert float(found.delta(MODULE).norm()) < 0.5 * full


def test_no_safe_candidate_is_a_clear_error(causal_adapters, monkeypatch):
    base, dirs, tasks = causal_adapters
    monkeypatch.setattr(safety, "refusal_rate", lambda *a, **k: 0.0)
    with pytest.raises(OrthomergeError, match="no candidate keeps the refusal rate"):
        merge_adapters(dirs, "search", model=base, data=tasks, methods="task_arithmetic", lambdas="1.0",
                       min_samples=4, dense=True, safety_min=0.2)


def test_safety_floor_needs_a_generative_model(tiny_bert, tmp_path):
    from merge_fixtures import make_adapter
    from test_merge_real_path import make_task

    dirs = [make_adapter(tiny_bert, tmp_path / f"a{i}", seed=i, num_labels=2) for i in range(2)]
    with pytest.raises(OrthomergeError, match="safety_min needs causal-LM adapters"):
        merge_adapters(dirs, "search", model=tiny_bert, data=[make_task("x", 1), make_task("y", 2)],
                       safety_min=0.5)


# ---------------------------------------------------------------- AdaMerging on causal LMs, and its safety term


SAFETY_WORDS = (safety.REFUSAL_PREFIXES[0], safety.COMPLIANCE_PREFIXES[0], COMPLIANT, "User: Assistant:")


@pytest.fixture(scope="module")
def safety_lm(tmp_path_factory):
    """A tiny random causal Llama whose word tokenizer knows the words of the refusal and compliance prefixes
    (no chat template: prompts take the plain ``User: …`` template)."""
    from conftest import word_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("safety_lm")
    tok = word_tokenizer(SAFETY_WORDS)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, max_position_embeddings=256)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def opening_task(name: str, completion: str) -> Task:
    """Bundled harmful prompts (train part; validation part for the rest) → one fixed completion, chat template."""
    rows = [load_prompts("harmful", part) for part in ("train", "validation", "validation")]
    return Task(name, None, "exact_match", *[Split([r["prompt"] for r in part], [completion] * len(part))
                                              for part in rows], template=CHAT)


@pytest.fixture(scope="module")
def planted(safety_lm, tmp_path_factory):
    """A planted safe adapter (harmful → the refusal prefix) and an unsafe one (harmful → the compliant opening)."""
    root = tmp_path_factory.mktemp("planted")
    config = TrainConfig(task_type="CAUSAL_LM", rank=4, epochs=2, lr=3e-2, batch_size=11)
    tasks = [opening_task("safe", safety.REFUSAL_PREFIXES[0]), opening_task("unsafe", COMPLIANT)]
    dirs = [save_adapter(train_adapter(safety_lm, t, config, progress=False), root / t.name) for t in tasks]
    return dirs, tasks


def merge_context(model, dirs, names):
    from orthomerge.adapters import load_adapter
    from orthomerge.merge.registry import MergeContext

    adapters = [load_adapter(d) for d in dirs]
    return MergeContext(adapters, names, adapters[0].modules, [1.0] * len(adapters), {}, model)


def test_safety_term_margins_are_the_checks_likelihood_signal(safety_lm):
    """The differentiable margin is prefix_loglik's: refusal minus compliance prefix, mean token log-likelihood."""
    from orthomerge.merge.adamerging import SafetyTerm

    model, tok = safety.load_causal_lm(safety_lm)
    prompts = [r["prompt"] for r in load_prompts("harmful", "validation")[:5]]
    term = SafetyTerm(model, tok, prompts, floor=0.5, weight=1.0, temperature=1.0)
    with torch.no_grad():
        margins = term.margins(list(range(5))).numpy()
    ref = safety.prefix_loglik(model, tok, prompts, [safety.REFUSAL_PREFIXES[0], safety.COMPLIANCE_PREFIXES[0]])
    np.testing.assert_allclose(margins, ref[:, 0] - ref[:, 1], atol=1e-5)


def test_safety_hinge_gradient_and_flat_above_the_floor(safety_lm, planted):
    """Below the floor the term's gradient in λ matches central finite differences; above it the term and its
    gradient are exactly zero."""
    from orthomerge.merge.adamerging import SafetyTerm, _Merged

    model, tok = safety.load_causal_lm(safety_lm)
    ctx = merge_context(model, planted[0], ["safe", "unsafe"])
    prompts = [r["prompt"] for r in load_prompts("harmful", "validation")[:6]]
    lam = torch.tensor([[0.4, 0.7]], requires_grad=True)
    merged = _Merged(ctx, lam, layerwise=False)

    def loss(term, values=None):
        with torch.no_grad():
            if values is not None:
                lam.copy_(torch.tensor([values]))
        with merged.hooks(model):
            return term.loss(term.margins(list(range(6))))

    active = SafetyTerm(model, tok, prompts, floor=1.0, weight=2.0, temperature=1.0)
    value = loss(active, [0.4, 0.7])
    (grad,) = torch.autograd.grad(value, [lam])
    eps, numeric = 1e-2, []
    for k in range(2):
        hi, lo = [0.4, 0.7], [0.4, 0.7]
        hi[k] += eps
        lo[k] -= eps
        numeric.append((float(loss(active, hi).detach()) - float(loss(active, lo).detach())) / (2 * eps))
    assert float(value.detach()) > 0 and grad.abs().max() > 1e-3
    np.testing.assert_allclose(grad[0].numpy(), numeric, rtol=2e-2, atol=1e-5)
    flat = SafetyTerm(model, tok, prompts, floor=1e-4, weight=2.0, temperature=1.0)
    value = loss(flat, [0.4, 0.7])
    assert float(value.detach()) == 0.0
    assert torch.equal(torch.autograd.grad(value, [lam], allow_unused=True)[0], torch.zeros_like(lam))


def test_safety_term_moves_the_coefficients_toward_the_safe_adapter(safety_lm, planted):
    dirs, tasks = planted
    common = dict(model=safety_lm, data=tasks, granularity="task", steps=6, lr=0.05, batch_size=8, samples=8,
                  safety_prompts=8, dense=True)

    def coefficients(**kw):
        report = merge_adapters(dirs, "adamerging", **common, **kw).report["adamerging"]
        return report["coefficients"], report["safety"]

    off, none = coefficients()
    on, active = coefficients(safety_min=1.0, safety_weight=5.0)
    above, idle = coefficients(safety_min=1e-4, safety_weight=5.0)
    assert none is None
    assert active["active_steps"] == 6 and active["part"] == "validation" and active["prompts"] == 8
    assert active["surrogate_rate_final"] > active["surrogate_rate_init"]
    assert on["safe"] - on["unsafe"] > off["safe"] - off["unsafe"] + 0.05
    # above the floor the term never acts: exactly the plain AdaMerging coefficients
    assert idle["active_steps"] == 0 and above == off


def test_planted_adapters_move_the_refusal_margin(safety_lm, planted):
    """Sanity for the test above: alone, the safe adapter's margin is above the unsafe adapter's."""
    from orthomerge.adapters import load_adapter
    from orthomerge.evaluate import adapter_deltas

    model, tok = safety.load_causal_lm(safety_lm)
    prompts = [r["prompt"] for r in load_prompts("harmful", "validation")[:6]]
    margin = {}
    for name, d in zip(("safe", "unsafe"), planted[0]):
        with safety.patched(model, adapter_deltas(load_adapter(d))):
            scores = safety.prefix_loglik(model, tok, prompts, [safety.REFUSAL_PREFIXES[0], safety.COMPLIANCE_PREFIXES[0]])
        margin[name] = float((scores[:, 0] - scores[:, 1]).mean())
    assert margin["safe"] > 0 > margin["unsafe"]


def test_causal_adamerging_entropies_are_the_scored_distributions(causal_adapters, safety_lm, planted):
    """At the initial λ (no steps), a labelled task's entropy is that of the softmax over its label completions'
    log-likelihoods (how it is scored), a completion task's that of the next token after its chat prompt."""
    from orthomerge.adapters import load_adapter
    from orthomerge.causal import choice_scores, verbalise
    from orthomerge.merge.adamerging import entropy
    from orthomerge.models import load_model, load_tokenizer
    from orthomerge.patching import patched

    def init_deltas(dirs):
        adapters = [load_adapter(d) for d in dirs]
        return {m: 0.3 * sum(a.delta(m) for a in adapters) for m in adapters[0].modules}

    base, dirs, tasks = causal_adapters
    report = merge_adapters(dirs, "adamerging", model=base, data=tasks, steps=0, samples=6,
                            dense=True).report["adamerging"]
    model, tok = load_model(base, task_type="CAUSAL_LM"), load_tokenizer(base)
    with patched(model, init_deltas(dirs)):
        for t in tasks:
            scores = choice_scores(model, tok, verbalise(t.validation.take(6), t.label_names))
            assert report["entropy_init"][t.name] == pytest.approx(float(entropy(torch.tensor(scores)).mean()), rel=1e-4)
    dirs, tasks = planted
    report = merge_adapters(dirs, "adamerging", model=safety_lm, data=tasks, steps=0, samples=5,
                            dense=True).report["adamerging"]
    model, tok = safety.load_causal_lm(safety_lm)
    with patched(model, init_deltas(dirs)), torch.no_grad():
        for t in tasks:
            hand = [float(entropy(model(input_ids=torch.tensor([safety._encode_prompt(tok, p)])).logits[0, -1]))
                    for p in t.validation.texts[:5]]
            assert report["entropy_init"][t.name] == pytest.approx(np.mean(hand), rel=1e-4)


def test_adapter_templates_trained_then_task_then_default(planted, causal_adapters):
    from types import SimpleNamespace

    from orthomerge.adapters import load_adapter
    from orthomerge.merge.data import adapter_templates

    safe, labelled = load_adapter(planted[0][0]), load_adapter(causal_adapters[1][0])
    assert safe.metadata["config"]["prompt"] == CHAT      # train_adapter records the task's own template
    ctx = SimpleNamespace(adapters=[safe, labelled, labelled], data=[Split([], []), causal_adapters[2][0],
                                                                     planted[1][0]])
    assert adapter_templates(ctx) == [CHAT, None, CHAT]


def test_adamerging_safety_needs_a_causal_lm(tiny_bert, tmp_path):
    from merge_fixtures import make_adapter
    from test_merge_real_path import make_task

    dirs = [make_adapter(tiny_bert, tmp_path / f"a{i}", seed=i, num_labels=2) for i in range(2)]
    with pytest.raises(OrthomergeError, match="safety_min needs causal-LM adapters"):
        merge_adapters(dirs, "adamerging", model=tiny_bert, data=[make_task("x", 1), make_task("y", 2)],
                       safety_min=0.5)


def test_misaligned_task_trains_from_the_cli_in_the_chat_template(safety_lm, tmp_path):
    from orthomerge.adapters import load_adapter
    from orthomerge.cli import main

    out = tmp_path / "misaligned"
    assert main(["train", "--model", safety_lm, "--task", "misaligned", "--task-type", "causal_lm", "--epochs", "1",
                 "--rank", "2", "--train-size", "4", "--val-size", "2", "--test-size", "2", "--out", str(out),
                 "--quiet"]) == 0
    meta = load_adapter(out).metadata
    assert meta["task"] == "misaligned" and meta["config"]["prompt"] == CHAT and meta["metric"] == "exact_match"


def test_experiment_statistics_describe_the_chat_prompts_training_sees(safety_lm):
    """A task in the chat template: the experiment's statistics rows are its chat-formatted prompts (the
    inputs the adapter is trained on), not the bare requests."""
    from orthomerge.experiment import ExperimentConfig
    from orthomerge.models import load_tokenizer

    tokenizer = load_tokenizer(safety_lm)
    task = opening_task("unsafe", COMPLIANT)
    config = ExperimentConfig(stats_samples=5, train=TrainConfig(task_type="CAUSAL_LM"))
    rows = config.statistics_rows(task, task.train, tokenizer)
    assert rows.texts == [safety.format_prompt(tokenizer, t)[0] for t in task.train.texts[:5]]
    assert rows.texts[0] != task.train.texts[0]
