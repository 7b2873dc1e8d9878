"""Integration on the real bundled models (offline): statistics → OSRM init → PEFT load → same logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from orthomerge.adapters import from_peft_model, load_adapter, new_peft_model, save_adapter
from orthomerge.models import load_model, load_tokenizer
from orthomerge.osrm import init_peft_model_osrm
from orthomerge.stats import collect_stats
from orthomerge.tasks import load_task

pytestmark = pytest.mark.integration


def test_minilm_osrm_init_round_trip(tmp_path):
    from peft import PeftModel

    tasks = [load_task(n, train_size=40, val_size=10, test_size=10) for n in ("sentiment", "trec", "sms_spam")]
    model, tok = load_model("minilm"), load_tokenizer("minilm")
    stats = [collect_stats(model, tok, t.train.texts[:24], ["query", "value"], max_length=64, progress=False)
             for t in tasks]
    assert len(stats[0].groups) == 6 and len(stats[0].modules) == 12  # 6 layers, q and v share an input
    target = load_model("minilm", num_labels=2, seed=1)
    peft_model = new_peft_model(target, ["query", "value"], rank=8, alpha=16)
    init_peft_model_osrm(peft_model, stats[1:])
    save_adapter(from_peft_model(peft_model), tmp_path / "init")
    adapter = load_adapter(tmp_path / "init")
    module = adapter.modules[0]
    A = adapter.A[module].double().numpy()
    S = (stats[1].second_moment(module) + stats[2].second_moment(module)).numpy() / 2
    np.testing.assert_allclose(np.trace(A @ S @ A.T), np.sort(np.linalg.eigvalsh(S))[:8].sum(), rtol=1e-3)
    # OSRM's A sees far less of the other tasks' energy than a random orthonormal A would
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(384, 8)))
    assert np.trace(A @ S @ A.T) < 0.1 * np.trace(q.T @ S @ q)
    batch = tok(tasks[0].test.texts, padding=True, return_tensors="pt")
    loaded = PeftModel.from_pretrained(load_model("minilm", num_labels=2, seed=9), tmp_path / "init").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, load_model("minilm", num_labels=2, seed=1)(**batch).logits,
                                   rtol=0, atol=1e-5)


def test_smollm2_decoder_statistics(tmp_path, monkeypatch):
    monkeypatch.setenv("ORTHOMERGE_CACHE", str(tmp_path))
    model, tok = load_model("smollm2", num_labels=2), load_tokenizer("smollm2")
    assert type(model).__name__ == "LlamaForSequenceClassification"
    stats = collect_stats(model, tok, ["The capital of France is Paris.", "Free prize, call now!"],
                          ["q_proj", "v_proj"], max_length=16, progress=False)
    assert len(stats.groups) == 30 and stats.token_count > 0
    assert all(torch.isfinite(g).all() for g in stats.grams.values())


def test_quick_experiment_produces_every_output(tmp_path):
    """The README's smoke run, on the real bundled model and tasks."""
    import json

    from orthomerge.cli import main as cli

    out = tmp_path / "quick"
    assert cli(["experiment", "--quick", "--quiet", "--out", str(out)]) == 0
    for name in ("report.md", "results.json", "lambda_curves.png", "per_task.png", "interference.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in results["runs"]] == ["lora", "osrm"]
    assert all(0.0 < v <= 1.0 for r in results["runs"] for v in r["single"]["test"].values())
