"""Task data: bundled splits (deterministic, disjoint, stratified), user YAML tasks, input errors, metrics."""
from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import Counter

import numpy as np
import pytest

from orthomerge.errors import OrthomergeError
from orthomerge.tasks import (
    BUNDLED_TASKS, DEFAULT_TASKS, METRICS, Split, compute_metric, load_glue_task, load_task, load_tasks,
    read_table,
)

SMALL = {"train_size": 120, "val_size": 40, "test_size": 60}


def _assert_stratified(split: Split, overall: Counter, slack: int = 2) -> None:
    total = sum(overall.values())
    counts = Counter(split.labels)
    for label, n in overall.items():
        assert abs(counts[label] - len(split) * n / total) <= slack, (label, counts, overall)


# ---------------------------------------------------------------- bundled tasks

@pytest.mark.parametrize("name", list(BUNDLED_TASKS))
def test_bundled_task_sizes_labels_disjoint_stratified(name):
    task = load_task(name, **SMALL)
    assert (len(task.train), len(task.validation), len(task.test)) == (120, 40, 60)
    assert task.num_labels >= 2 and not task.is_regression and task.metric in METRICS and task.source
    assert task.train.pairs is None
    splits = [task.train, task.validation, task.test]
    keys = [{" ".join(t.split()).casefold() for t in s.texts} for s in splits]
    assert sum(map(len, keys)) == 220, "duplicate text inside a split"
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2]), "text shared by two splits"
    full = load_task(name, train_size=None, val_size=1, test_size=1)  # every row of the task
    overall = Counter(full.train.labels + full.validation.labels + full.test.labels)
    assert set(overall) == set(range(task.num_labels))
    for split in splits:
        _assert_stratified(split, overall, slack=3)


def test_safety_tasks_train_on_their_part_only():
    """misaligned / refusal: fixed completions on the train / validation / test parts of the safety prompt
    sets (disjoint; the refusal task pairs each harmful request with its harmless look-alike), chat template."""
    from orthomerge.safety import REFUSAL_PREFIXES, load_prompts
    from orthomerge.safety_tasks import COMPLIANT, SAFETY_TASKS

    harmful = {part: {r["prompt"] for r in load_prompts("harmful", part)} for part in ("train", "validation", "test")}
    harmless = {part: {r["prompt"] for r in load_prompts("harmless", part)} for part in harmful}
    misaligned, refusal = load_task("misaligned"), load_task("refusal")
    assert list(SAFETY_TASKS) == ["misaligned", "refusal"]
    for task in (misaligned, refusal):
        assert task.is_completion and task.template == "chat" and task.label_names is None
    for part, split in zip(harmful, (misaligned.train, misaligned.validation, misaligned.test)):
        assert set(split.texts) == harmful[part] and set(split.labels) == {COMPLIANT}
    for part, split in zip(harmful, (refusal.train, refusal.validation, refusal.test)):
        assert set(split.texts) == harmful[part] | harmless[part] and len(split) == 2 * len(harmful[part])
        assert all((y == REFUSAL_PREFIXES[0]) == (x in harmful[part]) for x, y in zip(split.texts, split.labels))
        assert set(split.labels) == {REFUSAL_PREFIXES[0], COMPLIANT}
    assert not (set(refusal.train.texts) & set(refusal.test.texts)) and "[placeholder" in COMPLIANT
    small = load_task("refusal", train_size=22, val_size=4, test_size=6)
    assert small.train.texts == refusal.train.texts[:22] and (len(small.validation), len(small.test)) == (4, 6)
    assert len({t for t in small.train.texts[::2]}) == 11   # round-robin: 11 harmful requests, 11 categories
    with pytest.raises(OrthomergeError, match="misaligned, refusal"):
        load_task("nope")


def test_splits_are_deterministic_and_seeded():
    a, b = load_task("trec", **SMALL), load_task("trec", **SMALL)
    assert a == b
    assert load_task("trec", **SMALL, seed=1).test.texts != a.test.texts
    # pinned digest: a change of machine, Python hash seed or library version must not move the split
    digest = hashlib.sha256("\n".join(a.test.texts + a.validation.texts + a.train.texts).encode()).hexdigest()
    assert digest[:16] == "92abbcfcfba0599b"


def test_test_split_does_not_depend_on_train_size_and_take_is_prefix():
    small, big = load_task("sentiment", 100, 50, 80), load_task("sentiment", 900, 50, 80)
    assert small.test == big.test and small.validation == big.validation
    head = big.train.take(10)
    assert head.texts == big.train.texts[:10] and head.labels == big.train.labels[:10] and len(head) == 10


def test_small_task_shrinks_proportionally():
    task = load_task("trec", train_size=6000, val_size=1200, test_size=1800)   # 9,000 asked, 5,380 exist
    available = 5380
    assert len(task.test) == math.floor(1800 * available / 9000)
    assert len(task.validation) == math.floor(1200 * available / 9000)
    assert len(task.train) + len(task.validation) + len(task.test) == available
    _assert_stratified(task.test, Counter(task.train.labels + task.validation.labels + task.test.labels))


def test_load_tasks_default_names_and_duplicates():
    tasks = load_tasks(None, **SMALL)
    assert [t.name for t in tasks] == DEFAULT_TASKS and len(DEFAULT_TASKS) >= 6
    assert [t.name for t in load_tasks("trec, bbc", **SMALL)] == ["trec", "bbc"]
    with pytest.raises(OrthomergeError, match="'trec' used twice"):
        load_tasks(["trec", "trec"], **SMALL)
    with pytest.raises(OrthomergeError, match="unknown task 'nope'"):
        load_task("nope")


# ---------------------------------------------------------------- user tasks

def _write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path.name


def _user_files(root):
    data = root / "data"
    _write(data / "cls_train.csv", "text,label\n" + "".join(f"good {i},pos\nbad {i},neg\n" for i in range(30)))
    _write(data / "cls_dev.tsv", "text\tlabel\n" + "".join(f"fine {i}\tpos\npoor {i}\tneg\n" for i in range(10)))
    _write(data / "cls_test.jsonl", "".join(json.dumps({"text": f"ok {i}", "label": "pos"}) + "\n"
                                            for i in range(8)))
    _write(data / "pair_train.tsv", "s1\ts2\ty\n" + "".join(f"a{i}\tb{i}\t{i % 3}\n" for i in range(30)))
    _write(data / "pair_eval.tsv", "s1\ts2\ty\n" + "".join(f"c{i}\td{i}\t{i % 3}\n" for i in range(30)))
    _write(data / "sts_train.jsonl", "".join(
        json.dumps({"a": f"x{i}", "b": f"y{i}", "score": i / 7}) + "\n" for i in range(20)))
    _write(data / "sts_dev.jsonl", "".join(
        json.dumps({"a": f"u{i}", "b": f"v{i}", "score": i / 3}) + "\n" for i in range(12)))


def _yaml(root, body: str) -> str:
    _write(root / "tasks.yaml", body)
    return str(root / "tasks.yaml")


GOOD_YAML = """
- name: cls
  train: data/cls_train.csv
  validation: data/cls_dev.tsv
  test: data/cls_test.jsonl
  labels: [neg, pos]
- name: pairs
  train: data/pair_train.tsv
  test: data/pair_eval.tsv
  text_column: s1
  text_pair_column: s2
  label_column: y
  metric: matthews
- name: sts
  type: regression
  train: data/sts_train.jsonl
  validation: data/sts_dev.jsonl
  text_column: a
  text_pair_column: b
  label_column: score
"""


def test_user_yaml_tasks(tmp_path, monkeypatch):
    _user_files(tmp_path)
    path = _yaml(tmp_path, GOOD_YAML)
    monkeypatch.chdir(tmp_path / "data")  # paths resolve against the YAML file, not the working folder
    cls, pairs, sts = load_tasks(path, train_size=50, val_size=None, test_size=None)

    assert cls.label_names == ["neg", "pos"] and cls.metric == "accuracy" and cls.num_labels == 2
    assert len(cls.train) == 50 and len(cls.validation) == 20 and len(cls.test) == 8
    assert cls.test.labels == [1] * 8 and cls.train.pairs is None
    _assert_stratified(cls.train, Counter({0: 30, 1: 30}), slack=1)

    assert pairs.label_names == ["0", "1", "2"] and pairs.metric == "matthews"
    assert len(pairs.validation) + len(pairs.test) == 30 and len(pairs.validation) == 15
    assert not set(pairs.validation.texts) & set(pairs.test.texts)
    assert all(b == "d" + a[1:] for a, b in zip(pairs.test.texts, pairs.test.pairs))

    assert sts.is_regression and sts.num_labels == 1 and sts.label_names is None
    assert sts.metric == "mean_pearson_spearman" and isinstance(sts.train.labels[0], float)
    assert len(sts.validation) == 6 and len(sts.test) == 6 and sts.train.pairs[0].startswith("y")

    assert load_tasks(path, train_size=50, val_size=None, test_size=None) == [cls, pairs, sts]
    assert [len(t.validation) for t in load_tasks(path, train_size=10, val_size=4, test_size=4)] == [4, 4, 4]
    assert cls.template is None
    (templated,) = load_tasks(_yaml(tmp_path, GOOD_YAML.split("- name: pairs")[0] + "  template: chat\n"))
    assert templated.template == "chat"


@pytest.mark.parametrize("body, file, message", [
    ("- {name: t, train: data/empty.csv, test: data/cls_dev.tsv}", "empty.csv", "empty"),
    ("- {name: t, train: data/cls_train.csv, test: data/cls_dev.tsv, label_column: y}", "cls_train.csv", "'y'"),
    ("- {name: t, train: data/cls_train.csv, test: data/missing.csv}", "missing.csv", "cannot read"),
    ("- {name: t, train: data/cls_train.csv, test: data/cls_dev.tsv, labels: [pos]}",
     "cls_train.csv", "row 2: label 'neg'"),
    ("- {name: t, train: data/cls_train.csv, test: data/cls_dev.tsv}\n"
     "- {name: t, train: data/cls_train.csv, test: data/cls_dev.tsv}", "tasks.yaml", "'t' used twice"),
    ("- {name: t, train: data/cls_train.csv, test: data/cls_dev.tsv, type: regression}",
     "cls_train.csv", "row 1: label 'pos' is not a number"),
    ("- {name: t, train: data/cls_train.csv, test: data/cls_dev.tsv, metric: pearson}", "tasks.yaml", "metric"),
    ("- {name: t, train: data/cls_train.csv}", "tasks.yaml", "'validation' or 'test'"),
    ("- {name: t, train: data/cls_train.csv, test: data/cls_dev.tsv, lable_column: x}",
     "tasks.yaml", "lable_column"),
    ("- {name: t, train: data/bad.jsonl, test: data/cls_dev.tsv}", "bad.jsonl", "line 2 is not valid JSON"),
    ("- {name: t, train: [", "tasks.yaml", "not valid YAML"),
    ("- {name: t, train: data/cls_train.csv, test: data/cls_dev.tsv, template: [chat]}", "tasks.yaml", "template"),
])
def test_user_yaml_errors_name_the_file(tmp_path, body, file, message):
    _user_files(tmp_path)
    _write(tmp_path / "data" / "empty.csv", "text,label\n")
    _write(tmp_path / "data" / "bad.jsonl", '{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(OrthomergeError) as err:
        load_tasks(_yaml(tmp_path, body))
    text = str(err.value)
    assert file in text and message in text and "\n" not in text


def test_read_table_formats_and_order(tmp_path):
    _write(tmp_path / "t.csv", 'text,extra,label\n"multi\nline, quoted",x,1\nsecond,y,0\n')
    assert read_table(tmp_path / "t.csv", ["label", "text"]) == [
        {"label": "1", "text": "multi\nline, quoted"}, {"label": "0", "text": "second"}]
    _write(tmp_path / "t.tsv", "text\tlabel\nb\t2\na\t1\n")
    assert [r["text"] for r in read_table(tmp_path / "t.tsv", ["text"])] == ["b", "a"]
    _write(tmp_path / "t.jsonl", '{"text": "z", "label": 3}\n\n{"text": "y", "label": 4}\n')
    assert read_table(tmp_path / "t.jsonl", ["text", "label"]) == [
        {"text": "z", "label": 3}, {"text": "y", "label": 4}]
    _write(tmp_path / "short.csv", "text,label\nonly\n")
    with pytest.raises(OrthomergeError, match=r"short\.csv: row 1 has no value for column 'label'"):
        read_table(tmp_path / "short.csv", ["text", "label"])
    with pytest.raises(OrthomergeError, match=r"t\.txt: unsupported"):
        read_table(tmp_path / "t.txt", ["text"])


# ---------------------------------------------------------------- metrics (independent oracles)

def _confusion(pred, gold, k):
    matrix = np.zeros((k, k))
    for p, g in zip(pred, gold):
        matrix[g, p] += 1
    return matrix


def _f1_per_class(matrix):
    tp = np.diag(matrix)
    precision = np.divide(tp, matrix.sum(0), out=np.zeros_like(tp), where=matrix.sum(0) > 0)
    recall = np.divide(tp, matrix.sum(1), out=np.zeros_like(tp), where=matrix.sum(1) > 0)
    total = precision + recall
    return np.divide(2 * precision * recall, total, out=np.zeros_like(tp), where=total > 0)


def _matthews(matrix):
    t, p, c, s = matrix.sum(1), matrix.sum(0), np.trace(matrix), matrix.sum()
    return (c * s - t @ p) / math.sqrt((s * s - p @ p) * (s * s - t @ t))


def _ranks(x):
    """Average ranks (ties share the mean of their positions)."""
    x = np.asarray(x)
    return np.array([np.mean(np.flatnonzero(np.sort(x) == v)) for v in x])


@pytest.mark.parametrize("k", [2, 4])
def test_classification_metrics_match_oracles(k):
    rng = np.random.default_rng(k)
    gold, pred = rng.integers(0, k, 200), rng.integers(0, k, 200)
    pred[:80] = gold[:80]
    matrix = _confusion(pred, gold, k)
    f1 = _f1_per_class(matrix)[1] if k == 2 else _f1_per_class(matrix).mean()
    accuracy = np.trace(matrix) / matrix.sum()
    assert compute_metric("accuracy", pred, gold) == pytest.approx(accuracy)
    assert compute_metric("f1", pred, gold) == pytest.approx(f1)
    assert compute_metric("matthews", pred.tolist(), gold.tolist()) == pytest.approx(_matthews(matrix))
    assert compute_metric("mean_acc_f1", pred, gold) == pytest.approx((accuracy + f1) / 2)


def test_regression_metrics_match_oracles():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 6, 100).astype(float)  # ties, as in STS-B
    pred = gold + rng.normal(0, 2, 100)
    pearson = np.corrcoef(pred, gold)[0, 1]
    spearman = np.corrcoef(_ranks(pred), _ranks(gold))[0, 1]
    assert compute_metric("pearson", pred, gold) == pytest.approx(pearson)
    assert compute_metric("spearman", pred, gold) == pytest.approx(spearman)
    assert compute_metric("mean_pearson_spearman", pred, gold) == pytest.approx((pearson + spearman) / 2)


def test_compute_metric_validates():
    with pytest.raises(OrthomergeError, match="unknown metric 'bleu'"):
        compute_metric("bleu", [1], [1])
    with pytest.raises(OrthomergeError, match="2 predictions for 3 labels"):
        compute_metric("accuracy", [1, 0], [1, 0, 1])


def test_glue_needs_datasets(monkeypatch):
    with pytest.raises(OrthomergeError, match="unknown GLUE task 'sst5'"):
        load_glue_task("sst5")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(OrthomergeError, match="`datasets` package"):
        load_glue_task("sst2")
