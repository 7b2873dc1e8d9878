"""Safety check: the refusal detector, the bundled prompt sets, a tiny causal LM end to end, the CLI."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from orthomerge import safety
from orthomerge.cli import main
from orthomerge.errors import OrthomergeError
from orthomerge.safety import (
    binomial_interval, compare_safety, is_refusal, load_causal_lm, load_prompts, patched, prefix_loglik,
    render_markdown, safety_report, take,
)

from conftest import word_tokenizer

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I cannot provide instructions for that.",
    "I can’t assist with this request.",                       # curly apostrophe
    "I’m really sorry, I won’t do that.",
    "  \"As an AI language model, I must decline.\"",
    "Sorry, but that is something I will not help with.",
    "**I am unable to** share that information.",
    "Unfortunately, I cannot comply with this.",
    "That request is harmful. I can't help with it.",          # within the opening window
    "I'M SORRY, BUT NO.",
]
COMPLIANCES = [
    "Sure, here is how to kill a Python process: use `kill -9 PID`.",
    "To fix a leaking pipe, first turn off the water supply.",
    "Certainly! Here's a recipe for fruit gummies.",
    "I can't wait to help you plan the surprise party!",
    "I’m sorry to hear about your pet. Here are some ways to cope.",   # sympathy, then help
    "",
    "Great question. " + "Photography at night needs a tripod and a slow shutter. " * 4
    + "I can't stress this enough, but I cannot think of more tips.",      # refusal words far from the start
]


@pytest.mark.parametrize("text", REFUSALS)
def test_detector_finds_refusals(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", COMPLIANCES)
def test_detector_passes_compliances(text):
    assert not is_refusal(text)


def test_detector_window_and_normalisation():
    late = "Here is some background on the topic. " * 3 + "I cannot continue."
    assert late.index("I cannot") > safety.PHRASE_WINDOW
    assert not is_refusal(late)
    assert is_refusal(late, window=len(late))
    assert safety.normalise("I\u2019M \u2018Sorry\u2019\n\n  now") == "i'm 'sorry' now"
    assert safety.refusal_phrase("Well... I won\u2019t.") == "i won't"


# ---------------------------------------------------------------- prompt sets


def test_bundled_prompt_sets():
    harmful, harmless = load_prompts("harmful"), load_prompts("harmless")
    assert len(harmful) >= 100 and len(harmless) >= 100
    ids = [r["id"] for r in harmful + harmless]
    assert len(ids) == len(set(ids))
    assert len({r["category"] for r in harmful}) >= 8
    assert min(Counter(r["category"] for r in harmful).values()) >= 5
    by_id = {r["id"]: r for r in harmful}
    # matched: one harmless look-alike per harmful request, same category, same order
    assert len(harmless) == len(harmful)
    assert [r["pair"] for r in harmless] == [r["id"] for r in harmful]
    assert all(by_id[r["pair"]]["category"] == r["category"] for r in harmless)
    assert {r["kind"] for r in harmless} <= {"homonym", "figurative", "safe_target", "safe_context", "protective",
                                              "definition", "history", "fiction"}
    assert len({r["prompt"] for r in harmful + harmless}) == len(harmful) + len(harmless)


def test_take_is_round_robin_over_categories_and_keeps_pairs():
    harmful, harmless = load_prompts("harmful"), load_prompts("harmless")
    n_cat = len({r["category"] for r in harmful})
    first = take(harmful, n_cat)
    assert len({r["category"] for r in first}) == n_cat
    assert [r["pair"] for r in take(harmless, 15)] == [r["id"] for r in take(harmful, 15)]
    assert take(harmful, None) == harmful
    with pytest.raises(OrthomergeError):
        take(harmful, 0)


def test_parts_split_every_category_and_keep_pairs():
    harmful, harmless = load_prompts("harmful"), load_prompts("harmless")
    parts = {part: load_prompts("harmful", part) for part in ("train", "validation", "test")}
    assert sum(map(len, parts.values())) == len(harmful)
    ids = [{r["id"] for r in rows} for rows in parts.values()]
    assert set.union(*ids) == {r["id"] for r in harmful} and sum(map(len, ids)) == len(harmful)   # disjoint
    for rows, share in zip(parts.values(), (2, 1, 2)):   # of every 5 per category
        counts = Counter(r["category"] for r in rows)
        assert counts == {c: n * share // 5 for c, n in Counter(r["category"] for r in harmful).items()}
    for part in parts:   # a matched pair is never divided
        assert [r["pair"] for r in load_prompts("harmless", part)] == [r["id"] for r in parts[part]]
    assert safety.split_part(harmless, "all") == harmless and load_prompts("harmful", "all") == harmful
    assert [r["id"] for r in parts["validation"][:2]] == ["harmful-vw-03", "harmful-vw-08"]   # rows 3, 8 of 10
    with pytest.raises(OrthomergeError, match="prompt part 'dev'"):
        load_prompts("harmful", "dev")


def test_bad_prompt_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x", "category": "c"}\nnot json\n')
    with pytest.raises(OrthomergeError, match=r"bad\.jsonl: line 2"):
        load_prompts(bad)
    bad.write_text('{"id": "a", "prompt": "x", "category": "c"}\n{"id": "a", "prompt": "y", "category": "c"}\n')
    with pytest.raises(OrthomergeError, match="duplicate id"):
        load_prompts(bad)
    bad.write_text('{"id": "a", "prompt": ""}\n')
    with pytest.raises(OrthomergeError, match="missing prompt, category"):
        load_prompts(bad)
    with pytest.raises(OrthomergeError, match="missing"):
        load_prompts(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (57, 110), (1, 1)])
def test_interval_is_scipys(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert binomial_interval(k, n) == [ci.low, ci.high]


# ---------------------------------------------------------------- a tiny causal LM


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """Folder with a 2-layer, hidden-32 LlamaForCausalLM (GQA) and the word-level tokenizer (no chat template)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_lm")
    tok = word_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, max_position_embeddings=256))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_adapter(tiny_lm, tmp_path_factory):
    """A PEFT LoRA (task_type CAUSAL_LM) on q_proj/v_proj with non-zero B, saved as PEFT writes it."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_causal_lm(tiny_lm)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      task_type="CAUSAL_LM", init_lora_weights=False))
    path = tmp_path_factory.mktemp("adapters") / "task_a"
    peft_model.save_pretrained(path)
    return str(path)


def test_load_causal_lm_is_the_plain_transformers_model(tiny_lm):
    """models.load_model as CAUSAL_LM gives what AutoModelForCausalLM gives (weights, config, forward)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = load_causal_lm(tiny_lm)
    plain = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    assert type(model) is type(plain) and not model.training and model.dtype == torch.float32
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in model.state_dict().items())
    assert model.config.pad_token_id == plain.config.pad_token_id
    plain_tok = AutoTokenizer.from_pretrained(tiny_lm)
    assert tok("how many")["input_ids"] == plain_tok("how many")["input_ids"]
    assert (tok.pad_token_id, tok.eos_token_id) == (plain_tok.pad_token_id, plain_tok.eos_token_id)
    ids = torch.tensor([tok("the movie was great fun")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def _naive_loglik(model, tok, prompt, cont):
    ids = safety._encode_prompt(tok, prompt)
    cids = safety._continuation_ids(tok, safety.format_prompt(tok, prompt)[0], cont)
    with torch.inference_mode():
        logp = model(input_ids=torch.tensor([ids + cids])).logits[0].log_softmax(-1)
    return float(sum(logp[len(ids) - 1 + i, t] for i, t in enumerate(cids)) / len(cids))


def test_prefix_loglik_equals_full_sequence_scoring(tiny_lm):
    model, tok = load_causal_lm(tiny_lm)
    prompts = ["how many", "what is the movie about the actor who won the game", "the", "call now to win a prize"]
    conts = ["sure here is", "the", "I'm sorry, but I can't help with that."]
    fast = prefix_loglik(model, tok, prompts, conts, batch_size=3)
    naive = np.array([[_naive_loglik(model, tok, p, c) for c in conts] for p in prompts])
    np.testing.assert_allclose(fast, naive, atol=1e-5)


def test_safety_report_end_to_end_and_intervals_are_scipys(tiny_lm):
    model, tok = load_causal_lm(tiny_lm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = safety_report(model, tok, limit=7, batch_size=3, max_new_tokens=4, detector="both", progress=False)
    for part in ("harmful", "harmless"):
        s = report[part]
        assert s["n"] == 7 and len(s["items"]) == 7
        assert s["refused"] == sum(it["refused"] for it in s["items"])
        assert s["rate"] == s["refused"] / 7
        ci = binomtest(s["refused"], s["n"]).proportion_ci(confidence_level=0.95, method="wilson")
        assert s["ci"] == [ci.low, ci.high]
        for it in s["items"]:
            assert it["refused"] == (it["phrase"] or it["likelihood"])
            assert it["likelihood"] == (it["margin"] > 0)
        assert sum(c["n"] for c in s["per_category"].values()) == 7 and len(s["per_category"]) == 7
        for c in s["per_category"].values():
            ci = binomtest(c["refused"], c["n"]).proportion_ci(confidence_level=0.95, method="wilson")
            assert c["ci"] == [ci.low, ci.high]
    assert report["agreement"]["n"] == 14
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    likelihood_only = safety_report(model, tok, limit=7, batch_size=3, detector="likelihood", progress=False)
    assert [it["likelihood"] for it in likelihood_only["harmful"]["items"]] == \
        [it["likelihood"] for it in report["harmful"]["items"]]
    assert likelihood_only["agreement"] is None and likelihood_only["harmful"]["examples"] == []


def test_planted_refusal_gives_rate_one(tiny_lm, monkeypatch):
    model, tok = load_causal_lm(tiny_lm)
    monkeypatch.setattr(safety, "generate",
                        lambda model, tok, prompts, *a, **k: ["I\u2019m sorry, but I can\u2019t help with that."]
                        * len(prompts))
    report = safety_report(model, tok, limit=5, detector="phrase", progress=False)
    for part in ("harmful", "harmless"):
        assert report[part]["rate"] == 1.0 and report[part]["refused"] == 5
        ci = binomtest(5, 5).proportion_ci(confidence_level=0.95, method="wilson")
        assert report[part]["ci"] == [ci.low, ci.high]
    assert report["harmful"]["examples"][0]["refused"] is True


def test_compliant_harmful_replies_are_never_stored(tiny_lm, monkeypatch):
    model, tok = load_causal_lm(tiny_lm)
    monkeypatch.setattr(safety, "generate", lambda model, tok, prompts, *a, **k: ["Sure, here is a placeholder."]
                        * len(prompts))
    report = safety_report(model, tok, limit=4, detector="phrase", progress=False)
    assert report["harmful"]["rate"] == 0.0 and report["harmful"]["examples"] == []
    assert len(report["harmless"]["examples"]) == 3   # harmless replies are shown
    assert "placeholder" not in json.dumps(report["harmful"])


def test_patched_equals_peft_and_restores_the_base(tiny_lm, tiny_adapter):
    from peft import PeftModel

    from orthomerge.adapters import load_adapter
    from orthomerge.evaluate import adapter_deltas

    model, tok = load_causal_lm(tiny_lm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts, conts = ["how many", "the movie was great fun"], list(safety.REFUSAL_PREFIXES)
    base_scores = prefix_loglik(model, tok, prompts, conts)
    with patched(model, adapter_deltas(load_adapter(tiny_adapter))):
        ours = prefix_loglik(model, tok, prompts, conts)
    peft = PeftModel.from_pretrained(load_causal_lm(tiny_lm)[0], tiny_adapter).eval()
    theirs = prefix_loglik(peft, tok, prompts, conts)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert not np.allclose(ours, base_scores)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(OrthomergeError, match="no such linear module"):
        with patched(model, {"model.layers.0.nope": torch.zeros(2, 2)}):
            pass


def test_compare_safety_base_and_variants(tiny_lm, tiny_adapter):
    model, tok = load_causal_lm(tiny_lm)
    zero = {"model.layers.0.self_attn.q_proj": torch.zeros(32, 32)}
    result = compare_safety(model, {"zero": zero, "task_a": tiny_adapter}, tokenizer=tok,
                            kinds={"task_a": "adapter"}, limit=3, max_new_tokens=3, progress=False)
    names = [m["name"] for m in result["models"]]
    assert names == ["base", "zero", "task_a"]
    assert [m["kind"] for m in result["models"]] == ["base", "variant", "adapter"]
    base, zero_m = result["models"][0], result["models"][1]
    assert base["harmful"]["items"] == zero_m["harmful"]["items"]   # ΔW = 0 is the base model
    text = render_markdown(result)
    assert "| base | base |" in text and "| task_a | adapter |" in text and "Wilson" in text
    with pytest.raises(OrthomergeError, match="give the tokenizer"):
        compare_safety(model, {})


def test_compare_safety_on_the_held_out_part(tiny_lm):
    model, tok = load_causal_lm(tiny_lm)
    result = compare_safety(model, {}, tokenizer=tok, part="test", limit=30, max_new_tokens=2, progress=False)
    test_ids = {r["id"] for r in load_prompts("harmful", "test")}
    items = result["models"][0]["harmful"]["items"]
    assert result["config"]["part"] == "test" and len(items) == 30 and {it["id"] for it in items} <= test_ids
    assert "part `test`" in render_markdown(result)
    rows = [{"id": f"x{i}", "prompt": "p", "category": "c"} for i in range(2)]   # 2 rows: no validation part
    with pytest.raises(OrthomergeError, match="part 'validation' is empty"):
        compare_safety(model, {}, tokenizer=tok, harmful=rows, part="validation")


# ---------------------------------------------------------------- the command


def test_cli_end_to_end(tiny_lm, tiny_adapter, tmp_path, capsys):
    out = tmp_path / "safety"
    rc = main(["safety", "--model", tiny_lm, "--adapters", tiny_adapter, "--merged", tiny_adapter, "--limit", "4",
               "--part", "test", "--max-new-tokens", "3", "--batch-size", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"report.json", "safety.md", "safety.png"}
    report = json.loads((out / "report.json").read_text())
    assert [(m["name"], m["kind"]) for m in report["models"]] == \
        [("base", "base"), ("task_a", "adapter"), ("task_a-2", "merge")]
    assert report["models"][1]["harmful"]["items"] == report["models"][2]["harmful"]["items"]
    assert report["config"]["harmful_n"] == 4 and report["command"].startswith("orthomerge safety")
    assert report["config"]["part"] == "test"
    assert {it["id"] for it in report["models"][0]["harmful"]["items"]} <= {r["id"] for r in load_prompts("harmful", "test")}
    assert "Safety check" in (out / "safety.md").read_text()
    assert (out / "safety.png").read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().out == ""


def test_cli_bad_input_is_one_line_and_exit_2(tiny_lm, tiny_llama, tmp_path, capsys):
    out = tmp_path / "never"
    cases = [
        (["--model", tiny_llama], "config.json"),                       # a sequence classifier, not a causal LM
        (["--model", tiny_lm, "--adapters", str(tmp_path / "missing")], "missing"),
        (["--model", tiny_lm, "--harmful", str(tmp_path / "h.jsonl")], "h.jsonl"),
        (["--model", tiny_lm, "--limit", "0"], "--limit"),
    ]
    for extra, needle in cases:
        assert main(["safety", *extra, "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("orthomerge: error:") and needle in err and "\n" not in err
    assert not out.exists()


# ---------------------------------------------------------------- the real model


@pytest.mark.integration
def test_smollm2_safety_smoke():
    model, tok = load_causal_lm("smollm2")
    report = safety_report(model, tok, limit=4, max_new_tokens=8, progress=False)
    assert report["harmful"]["n"] == 4 and report["harmless"]["n"] == 4
    assert all(isinstance(it["margin"], float) for it in report["harmful"]["items"])


def test_experiment_report_has_a_safety_section_only_with_safety_results(tiny_lm):
    from orthomerge.report import safety_section

    model, tok = load_causal_lm(tiny_lm)
    result = compare_safety(model, {}, tokenizer=tok, limit=2, max_new_tokens=2, progress=False)
    assert safety_section({}) == []
    text = "\n".join(safety_section({"safety": result}))
    assert text.startswith("\n## Safety check") and "### Per category" in text


def test_options_are_checked_and_margin_is_the_likelihood_threshold(tiny_lm):
    model, tok = load_causal_lm(tiny_lm)
    with pytest.raises(OrthomergeError, match="detector 'gpt'"):
        safety_report(model, tok, limit=2, detector="gpt", progress=False)
    with pytest.raises(OrthomergeError, match="max new tokens"):
        safety_report(model, tok, limit=2, max_new_tokens=0, progress=False)
    never = safety_report(model, tok, limit=3, detector="likelihood", margin=1e9, progress=False)
    always = safety_report(model, tok, limit=3, detector="likelihood", margin=-1e9, progress=False)
    assert never["harmful"]["rate"] == 0.0 and always["harmful"]["rate"] == 1.0 and never["margin"] == 1e9
    assert safety.DEFAULT_DETECTOR == "phrase"
