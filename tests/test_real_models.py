"""Real-model settings on CPU: bfloat16 statistics, training, evaluation and merging on tiny random BERT and
Llama models, and causal-LM tasks end to end (train → merge → eval) on a tiny random Llama."""
from __future__ import annotations

import json

import pytest
import torch
from trust_fixtures import save_llama

from orthomerge import cli
from orthomerge.adapters import load_adapter, save_adapter
from orthomerge.causal import choice_scores, verbalise
from orthomerge.evaluate import TaskEvaluator, adapter_deltas
from orthomerge.merge import merge_adapters
from orthomerge.models import load_model, load_tokenizer, model_fingerprint
from orthomerge.stats import collect_stats
from orthomerge.tasks import Split, Task
from orthomerge.train import TrainConfig, initialised_model, train_adapter

STATS_TOL = 0.05   # relative Frobenius error of a bf16 model's Gram matrices against float32 (stated in docs)
GOOD, BAD = ["great", "good", "love", "fun"], ["awful", "bad", "hate", "boring"]
NOUNS = ["movie", "film", "show", "game", "music", "star", "plot", "actor"]


def sentiment(name: str = "sentiment", labels=("hate", "love")) -> Task:
    """``<word> <noun>`` rows, label from the word; held-out word/noun pairs for validation and test."""
    train, held = [], []
    for label, words in ((1, GOOD), (0, BAD)):
        for i, word in enumerate(words):
            for j, noun in enumerate(NOUNS):
                (held if j % len(words) == i else train).append((f"{word} {noun}", label))
    split = Split([t for t, _ in train] * 3, [y for _, y in train] * 3)
    heldout = Split([t for t, _ in held], [y for _, y in held])
    return Task(name, list(labels), "accuracy", split, heldout, heldout)


def topic(name: str = "topic") -> Task:
    rows = [(f"{w} {n}", 1) for w in ("team", "sport", "match", "game") for n in ("now", "year", "city")] + \
           [(f"{w} {n}", 0) for w in ("phone", "tech", "computer", "text") for n in ("now", "year", "city")]
    split = Split([t for t, _ in rows] * 2, [y for _, y in rows] * 2)
    return Task(name, ["tech", "sport"], "accuracy", split, Split(*zip(*rows[::3])), Split(*zip(*rows[::3])))


@pytest.fixture(scope="module")
def causal_llama(tmp_path_factory):
    return str(save_llama(tmp_path_factory.mktemp("causal"), causal=True))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("which", ["tiny_bert", "tiny_llama"])
def test_bf16_statistics_agree_with_float32(which, request):
    spec = request.getfixturevalue(which)
    tok = load_tokenizer(spec)
    texts = [f"{w} {n}" for w in GOOD + BAD for n in NOUNS]
    targets = ["query", "value"] if which == "tiny_bert" else ["q_proj", "v_proj"]
    full = collect_stats(load_model(spec, dtype="float32"), tok, texts, targets, progress=False)
    half = collect_stats(load_model(spec, dtype="bfloat16"), tok, texts, targets, progress=False)
    assert full.modules == half.modules and full.token_count == half.token_count
    assert half.meta["fingerprint"] == full.meta["fingerprint"]   # one identity, whatever the dtype
    for m in full.modules:
        assert half.gram(m).dtype == torch.float64
        assert rel(half.gram(m), full.gram(m)) < STATS_TOL, m


def test_float32_fingerprints_of_older_statistics_still_match(tiny_bert):
    model = load_model(tiny_bert)
    assert model_fingerprint(model, torch.float32) != model_fingerprint(model)   # the old identity…
    from orthomerge.stats import check_matches_model

    stats = collect_stats(model, load_tokenizer(tiny_bert), ["good movie"] * 4, ["query"], progress=False)
    stats.meta["fingerprint"] = model_fingerprint(model, torch.float32)
    check_matches_model(stats, model, stats.modules)                                 # …is accepted


@pytest.mark.parametrize("which", ["tiny_bert", "tiny_llama"])
def test_bf16_train_eval_and_merge(which, request, tmp_path):
    spec = request.getfixturevalue(which)
    targets = ["query", "value"] if which == "tiny_bert" else ["q_proj", "v_proj"]
    config = TrainConfig(rank=4, epochs=4, lr=2e-2, batch_size=8, targets=targets)
    adapter = train_adapter(spec, sentiment(), config, progress=False, dtype="bfloat16")
    assert adapter.metadata["dtype"] == "bfloat16"
    losses = [h["train_loss"] for h in adapter.metadata["history"]]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    for m in adapter.modules:   # the LoRA factors train in float32 on a bf16 base
        assert adapter.A[m].dtype == torch.float32 and adapter.B[m].abs().sum() > 0
    task = sentiment()
    scores = {dtype: TaskEvaluator(spec, [task], dtype=dtype).score(task.name, adapter_deltas(adapter),
                                                                    adapter.heads, "test")
              for dtype in ("float32", "bfloat16")}
    assert abs(scores["bfloat16"] - scores["float32"]) <= 0.15

    # bf16-stored factors merge exactly as their float32 values do (upcast first, never computed in bf16)
    half = load_adapter(save_adapter(adapter, tmp_path / "a"))
    for m in half.modules:
        half.A[m], half.B[m] = half.A[m].bfloat16(), half.B[m].bfloat16()
    half_dir = save_adapter(half, tmp_path / "half")
    upcast = load_adapter(half_dir)
    for m in upcast.modules:
        upcast.A[m], upcast.B[m] = upcast.A[m].float(), upcast.B[m].float()
    got = merge_adapters([half_dir, tmp_path / "a"], "ties", density=0.5, dense=True, model=spec)
    want = merge_adapters([upcast, load_adapter(tmp_path / "a")], "ties", density=0.5, dense=True, model=spec)
    for m in half.modules:
        assert torch.equal(got.delta(m), want.delta(m)), m


def test_osrm_init_on_a_bf16_base_uses_float32_statistics(tiny_bert):
    tok = load_tokenizer(tiny_bert)
    others = [collect_stats(load_model(tiny_bert), tok, topic().train.texts, ["query", "value"], progress=False)]
    peft_model, meta = initialised_model(tiny_bert, sentiment(), TrainConfig(init="osrm", rank=4), others=others,
                                         dtype="bfloat16")
    assert meta["init"] == "osrm"
    assert next(peft_model.get_base_model().parameters()).dtype == torch.bfloat16


# ---------------------------------------------------------------- causal-LM tasks end to end


def hand_accuracy(model, tok, task: Task, split: Split) -> float:
    """Accuracy of the most likely label completion, log-likelihoods summed token by token by hand."""
    data = verbalise(split, task.label_names)
    right = 0
    for prompt, gold in zip(data.prompts, data.labels):
        p = tok(prompt)["input_ids"]
        scores = []
        for choice in data.choices:
            c = tok(choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float(), -1)
            scores.append(sum(float(logp[len(p) + k - 1, t]) for k, t in enumerate(c)))
        right += int(max(range(len(scores)), key=lambda i: (scores[i], -i)) == gold)
    return right / len(split)


def test_causal_lm_tasks_train_merge_and_evaluate(causal_llama, tmp_path):
    from peft import PeftModel

    tasks = [sentiment(), topic()]
    config = TrainConfig(task_type="CAUSAL_LM", rank=4, epochs=5, lr=2e-2, batch_size=8,
                         targets=["q_proj", "v_proj"])
    adapters = []
    for task in tasks:
        adapter = train_adapter(causal_llama, task, config, progress=False)
        losses = [h["train_loss"] for h in adapter.metadata["history"]]
        assert losses[-1] < losses[0] - 0.1, (task.name, losses)   # the LM loss on the completions falls
        assert adapter.task_type == "CAUSAL_LM" and not adapter.heads
        adapters.append(save_adapter(adapter, tmp_path / task.name))
    result = merge_adapters(adapters, "task_arithmetic", model=causal_llama)
    out = result.save(tmp_path / "merged")
    evaluator = TaskEvaluator(causal_llama, tasks, task_type="CAUSAL_LM")
    tok = load_tokenizer(causal_llama)
    merged = PeftModel.from_pretrained(load_model(causal_llama, task_type="CAUSAL_LM"), str(out)).eval()
    for task in tasks:
        got = evaluator.score(task.name, adapter_deltas(load_adapter(out)), {}, "test")
        assert got == pytest.approx(hand_accuracy(merged, tok, task, task.test))
        own = load_adapter(tmp_path / task.name)
        assert evaluator.score(task.name, adapter_deltas(own), {}, "test") >= 0.75   # each adapter learned


def test_causal_lm_experiment_from_the_command_line(causal_llama, tmp_path, capsys):
    rows = {"sentiment": sentiment(labels=("hate", "love")), "topic": topic()}
    specs = []
    for name, task in rows.items():
        for split in ("train", "validation", "test"):
            data = getattr(task, split)
            (tmp_path / f"{name}.{split}.csv").write_text(
                "text,label\n" + "".join(f"{t},{task.label_names[y]}\n" for t, y in zip(data.texts, data.labels)))
        specs.append(f"- name: {name}\n  train: {name}.train.csv\n  validation: {name}.validation.csv\n"
                     f"  test: {name}.test.csv\n  labels: {list(task.label_names)}\n  metric: accuracy\n")
    (tmp_path / "tasks.yaml").write_text("".join(specs))
    out = tmp_path / "run"
    assert cli.main(["experiment", "--model", causal_llama, "--task-type", "causal_lm", "--tasks",
                     str(tmp_path / "tasks.yaml"), "--out", str(out), "--quiet", "--methods", "task_arithmetic,ties",
                     "--lambdas", "0.5,1", "--epochs", "3", "--lr", "0.02", "--rank", "4", "--inits", "lora,osrm",
                     "--dtype", "float32", "--safety", "3"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["train"]["task_type"] == "CAUSAL_LM"
    assert {r["arm"] for r in results["runs"]} == {"lora", "osrm"}
    for run in results["runs"]:
        assert [m["method"] for m in run["merges"]] == ["heads_only", "task_arithmetic", "ties"]
        assert all(0.0 <= v <= 1.0 for v in run["single"]["test"].values())
    safety = {m["name"]: m for m in results["safety"]["models"]}   # base, every adapter, every merge
    kinds = {kind: {n for n, m in safety.items() if m["kind"] == kind} for kind in ("base", "adapter", "merge")}
    assert kinds["base"] == {"base"}
    assert kinds["adapter"] == {f"{arm} {t}" for arm in ("lora", "osrm") for t in ("sentiment", "topic")}
    assert {n.rsplit(" λ=", 1)[0] for n in kinds["merge"]} == {f"{arm} {m}" for arm in ("lora", "osrm")
                                                                for m in ("task_arithmetic", "ties")}
    assert all(m["harmful"]["n"] == 3 and m["harmless"]["n"] == 3 for m in safety.values())
    assert "Safety" in (out / "report.md").read_text() and (out / "safety.png").exists()
