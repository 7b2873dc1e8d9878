"""Safety-aware merging: search on causal-LM adapters keeps only merges whose refusal rate on harmful
prompts stays at or above ``safety_min``; the refusal rate is the real generation path with a stubbed
judge (a tiny random LM refuses nothing, so the judge reads the merge's size instead)."""
from __future__ import annotations

import pytest
import torch
from test_real_models import sentiment, topic
from trust_fixtures import save_llama

import orthomerge.safety as safety
from orthomerge.adapters import save_adapter
from orthomerge.errors import OrthomergeError
from orthomerge.merge import merge_adapters
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
