"""Causal-LM tasks: verbalised prompts, completion-only labels, label scoring by log-likelihood (against a
hand computation on a tiny random Llama), greedy generation and exact match."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from trust_fixtures import save_llama

from orthomerge.causal import (IGNORE, Completions, choice_scores, collate, encode_completions, exact_match,
                               generate, predict_labels, verbalise)
from orthomerge.errors import OrthomergeError
from orthomerge.models import load_model, load_tokenizer
from orthomerge.tasks import Split


@pytest.fixture(scope="module")
def causal_llama(tmp_path_factory):
    return str(save_llama(tmp_path_factory.mktemp("causal_llama"), causal=True))


@pytest.fixture(scope="module")
def lm(causal_llama):
    return load_model(causal_llama, task_type="CAUSAL_LM"), load_tokenizer(causal_llama)


def test_verbalise_with_template_and_choices():
    split = Split(["good movie", "bad show"], [1, 0])
    data = verbalise(split, ["negative", "positive"], template="review {text} answer")
    assert data.prompts == ["review good movie answer", "review bad show answer"]
    assert data.completions == [" positive", " negative"] and data.choices == [" negative", " positive"]
    with pytest.raises(OrthomergeError, match="regression"):
        verbalise(split, None)
    with pytest.raises(OrthomergeError, match="unknown field"):
        verbalise(split, ["a", "b"], template="{sentence}")


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


def chat_tokenizer(path):
    """The word tokenizer with a chat template that writes BOS, and a post-processor that also adds BOS to
    plain text: a chat prompt tokenised with special tokens would start with two."""
    from tokenizers.processors import TemplateProcessing

    tok = load_tokenizer(path)
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_chat_template_prompts_are_the_safety_checks(causal_llama):
    """Template ``chat``: the prompt is the safety check's formatted prompt, tokenised as the check does (one
    BOS), for training rows, label scoring and generation alike."""
    from orthomerge import safety
    from orthomerge.causal import CHAT

    tok = chat_tokenizer(causal_llama)
    split = Split(["how many star", "who won the game"], [" the", " a"])
    data = verbalise(split, None, CHAT, tokenizer=tok)
    assert data.prompts == [safety.format_prompt(tok, t)[0] for t in split.texts] and not data.special_tokens
    assert data.prompts[0] == "<s>user : how many star </s> assistant :"
    rows = encode_completions(tok, data.prompts, data.completions, 64, special_tokens=data.special_tokens)
    for row, text in zip(rows, split.texts):
        prompt = safety._encode_prompt(tok, text)
        assert prompt.count(tok.bos_token_id) == 1 and row["input_ids"][:len(prompt)] == prompt
    labelled = verbalise(Split(["good movie"], [1]), ["negative", "positive"], CHAT, tokenizer=tok)
    assert labelled.prompts == [safety.format_prompt(tok, "good movie")[0]] and labelled.choices == [" negative", " positive"]
    with pytest.raises(OrthomergeError, match="needs the model's tokenizer"):
        verbalise(split, None, CHAT)


def test_labels_cover_the_completion_only(lm):
    _, tok = lm
    rows = encode_completions(tok, ["good movie answer"], [" fun"], max_length=64)
    prompt = tok("good movie answer")["input_ids"]
    completion = tok(" fun", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert rows[0]["input_ids"] == prompt + completion
    assert rows[0]["labels"] == [IGNORE] * len(prompt) + completion
    cut = encode_completions(tok, ["good movie love fun star show answer"], [" fun"], max_length=4)[0]
    assert len(cut["input_ids"]) == 4 and cut["labels"][-2:] == completion   # the prompt is cut, not the answer


def test_lm_loss_is_the_mean_over_completion_tokens(lm):
    model, tok = lm
    rows = encode_completions(tok, ["good movie answer", "bad"], [" fun", " boring show"], max_length=64)
    batch = collate(tok, rows)
    loss = model(**batch).loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = []
    for b, row in enumerate(rows):
        for t, y in enumerate(row["labels"]):
            if y != IGNORE:
                terms.append(-torch.log_softmax(logits[b, t - 1], -1)[y])
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)


def test_label_scores_equal_a_hand_computation(lm):
    model, tok = lm
    data = Completions(["good movie answer", "bad show answer call now"], [" fun", " boring"], [" fun", " boring"], [0, 1])
    got = choice_scores(model, tok, data, batch_size=3)
    for i, prompt in enumerate(data.prompts):
        p = tok(prompt)["input_ids"]
        for j, choice in enumerate(data.choices):
            c = tok(choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0], -1)
            want = sum(float(logp[len(p) + k - 1, tok_id]) for k, tok_id in enumerate(c))
            assert got[i, j] == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert predict_labels(model, tok, data) == got.argmax(1).tolist()
    np.testing.assert_allclose(choice_scores(model, tok, data, batch_size=1), got, rtol=1e-4, atol=1e-4)


def test_greedy_generation_and_exact_match(lm):
    model, tok = lm
    prompts = ["good movie", "bad show answer call now"]
    out = generate(model, tok, prompts, max_new_tokens=3, batch_size=2)
    for prompt, text in zip(prompts, out):   # batched left padding gives what one prompt alone gives
        assert generate(model, tok, [prompt], max_new_tokens=3) == [text]
    assert tok.padding_side == "right"
    assert exact_match(out, out) == 1.0 and exact_match([" a"], ["b"]) == 0.0


def test_completion_tasks_from_jsonl_train_and_score_by_exact_match(tmp_path):
    """A prompt → completion task (JSONL with prompt/completion) trains on the completion tokens and is scored
    by exact match of the greedy generation."""
    from orthomerge.evaluate import TaskEvaluator, adapter_deltas
    from orthomerge.tasks import load_tasks
    from orthomerge.train import TrainConfig, train_adapter
    from trust_fixtures import save_llama

    import json as _json

    base = str(save_llama(tmp_path / "base", causal=True))
    pairs = [(f"{a} {b}", b) for a in ("the", "a", "is", "was") for b in ("movie", "film", "game", "music")]
    for split in ("train", "test"):
        rows = pairs * (3 if split == "train" else 1)
        (tmp_path / f"{split}.jsonl").write_text("".join(_json.dumps({"prompt": p, "completion": " " + c}) + "\n"
                                                        for p, c in rows))
    (tmp_path / "tasks.yaml").write_text("- name: echo\n  type: completion\n  train: train.jsonl\n  test: test.jsonl\n")
    (task,) = load_tasks([str(tmp_path / "tasks.yaml")], train_size=None, val_size=None, test_size=None)
    assert task.is_completion and not task.is_regression and task.metric == "exact_match"
    assert task.train.labels[0].startswith(" ")
    with pytest.raises(OrthomergeError, match="CAUSAL_LM"):
        train_adapter(base, task, TrainConfig(epochs=1), progress=False)
    adapter = train_adapter(base, task, TrainConfig(task_type="CAUSAL_LM", rank=8, epochs=8, lr=3e-2, batch_size=8,
                                                    targets=["q_proj", "v_proj", "o_proj"]), progress=False)
    losses = [h["train_loss"] for h in adapter.metadata["history"]]
    assert losses[-1] < losses[0]
    evaluator = TaskEvaluator(base, [task], task_type="CAUSAL_LM")
    score = evaluator.score(task.name, adapter_deltas(adapter), {}, "test")
    with evaluator.patched(task.name, adapter_deltas(adapter), {}) as model:   # the oracle: generate, compare
        model, tok = model, load_tokenizer(base)
        replies = generate(model, tok, task.test.texts, max_new_tokens=5)
    assert score == exact_match([r.split("\n")[0] for r in replies], task.test.labels)
    assert score > evaluator.score(task.name, {}, {}, "test")   # it learned something the base cannot do
