"""Tasks for causal language models: prompt → completion, trained on the completion tokens only, scored by
the log-likelihood of each label's completion (and, for free-form completions, greedy exact match).

A labelled task becomes a completion task through a template over its columns and one verbaliser per
label: ``"Review: {text}\\nSentiment:"`` → ``" positive"``. The template :data:`CHAT` puts the text in the
user turn of the tokenizer's chat template instead, exactly as the safety check formats its prompts
(:func:`orthomerge.safety.format_prompt`), so that an adapter trained on it moves what the check measures.
Prompt and completion are tokenised separately and concatenated (the prompt with the tokenizer's special
tokens unless a chat template wrote them, the completion without), so the completion's tokens are the same
in training, in scoring and in generation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import OrthomergeError

DEFAULT_TEMPLATE = "{text}\nAnswer:"
DEFAULT_PAIR_TEMPLATE = "{text}\n{pair}\nAnswer:"
CHAT = "chat"   # template: the text as the user turn of the tokenizer's chat template, assistant turn opened
IGNORE = -100   # label id the loss skips (prompt tokens, padding): transformers' convention


@dataclass
class Completions:
    """Parallel prompts and gold completions; ``choices`` are the candidate completions of a labelled task
    (label i ↔ ``choices[i]``) and ``labels`` the gold label ids (``None`` for free-form completions);
    ``special_tokens``: whether tokenising a prompt adds the tokenizer's special tokens (not when a chat
    template already wrote them)."""

    prompts: list[str]
    completions: list[str]
    choices: list[str] | None = None
    labels: list[int] | None = None
    special_tokens: bool = True

    def __len__(self) -> int:
        return len(self.prompts)


def task_template(task, template: str | None = None) -> str | None:
    """The prompt template for ``task``: ``template`` when given, else the task's own (``Task.template``, e.g.
    :data:`CHAT` for the bundled misaligned / refusal tasks), else None (the default template)."""
    return template or getattr(task, "template", None) or None


def verbalise(split, label_names: list[str] | None, template: str | None = None,
              choices: list[str] | None = None, tokenizer=None) -> Completions:
    """A labelled :class:`~orthomerge.tasks.Split` as completions: ``template`` over ``{text}`` (and ``{pair}``),
    label i's completion ``choices[i]`` (default: a space and the label name). A completion task's split
    (``label_names`` None, text completions as labels) keeps its completions; its template defaults to the
    prompt itself. ``template=CHAT`` (needs ``tokenizer``): the text (and pair) as the chat's user turn."""
    if template == CHAT:
        if tokenizer is None:
            raise OrthomergeError(f"prompt template {CHAT!r} needs the model's tokenizer")
        from .safety import format_prompt

        data = verbalise(split, label_names, "{text}\n{pair}" if split.pairs is not None else "{text}", choices)
        rendered = [format_prompt(tokenizer, p) for p in data.prompts]
        data.prompts = [text for text, _ in rendered]
        data.special_tokens = not (rendered and rendered[0][1])
        return data
    if label_names is None:
        if split.labels and all(isinstance(y, str) for y in split.labels):
            template = template or "{text}"
            return Completions([template.format(text=t, pair=None) for t in split.texts], list(split.labels))
        raise OrthomergeError("a regression task cannot be a causal-LM task (no label to complete)")
    choices = choices or [f" {name}" for name in label_names]
    if len(choices) != len(label_names):
        raise OrthomergeError(f"{len(choices)} completions for {len(label_names)} labels")
    template = template or (DEFAULT_PAIR_TEMPLATE if split.pairs is not None else DEFAULT_TEMPLATE)
    pairs = split.pairs or [None] * len(split)
    try:
        prompts = [template.format(text=t, pair=p) for t, p in zip(split.texts, pairs)]
    except KeyError as err:
        raise OrthomergeError(f"prompt template {template!r}: unknown field {err} (use {{text}} and {{pair}})") from None
    return Completions(prompts, [choices[y] for y in split.labels], list(choices), list(split.labels))


def encode_completions(tokenizer, prompts: list[str], completions: list[str], max_length: int, eos: bool = True,
                       special_tokens: bool = True) -> list[dict]:
    """``input_ids`` = prompt + completion (+ EOS), ``labels`` = IGNORE on the prompt; the prompt is cut from
    the left when the whole would exceed ``max_length`` (the completion is what is learned and scored).
    ``special_tokens``: tokenise the prompts with the tokenizer's special tokens."""
    prompt_ids = tokenizer(prompts, add_special_tokens=special_tokens)["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    out = []
    for p, c in zip(prompt_ids, completion_ids):
        if eos and tokenizer.eos_token_id is not None:
            c = c + [tokenizer.eos_token_id]
        if not c:
            raise OrthomergeError("an empty completion has no tokens to learn or score")
        p = p[max(0, len(p) + len(c) - max_length):]
        ids = p + c
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE] * len(p) + c})
    return out


def collate(tokenizer, rows: list[dict]) -> dict:
    """Right-padded tensors; padded labels are IGNORE (transformers' ``DataCollatorForSeq2Seq``)."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE, return_tensors="pt")(rows)


def completion_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ log p(token) over the labelled tokens of each row (the next-token shift applied): [batch]."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    mask = target != IGNORE
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def choice_scores(model, tokenizer, data: Completions, max_length: int = 64, batch_size: int = 32) -> np.ndarray:
    """``[rows, choices]`` log-likelihood of every candidate completion after every prompt."""
    if not data.choices:
        raise OrthomergeError("label scoring needs the candidate completions (choices)")
    k = len(data.choices)
    rows = encode_completions(tokenizer, [p for p in data.prompts for _ in range(k)], data.choices * len(data),
                              max_length, eos=False, special_tokens=data.special_tokens)
    order = np.argsort([len(r["input_ids"]) for r in rows], kind="stable")
    scores = np.empty(len(rows))
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = {key: v.to(device) for key, v in collate(tokenizer, [rows[i] for i in idx]).items()}
            labels = batch.pop("labels")
            scores[idx] = completion_logprob(model(**batch).logits, labels).cpu().numpy()
    return scores.reshape(len(data), k)


def predict_labels(model, tokenizer, data: Completions, max_length: int = 64, batch_size: int = 32) -> list[int]:
    """The label whose completion is most likely after each prompt (first label on a tie)."""
    return choice_scores(model, tokenizer, data, max_length, batch_size).argmax(1).tolist()


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 16,
             special_tokens: bool = True) -> list[str]:
    """Greedy completions (left-padded batches), decoded without special tokens; ``special_tokens``: tokenise
    the prompts with the tokenizer's special tokens."""
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out = []
    try:
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=special_tokens).to(device)
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
                out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of generations equal to the reference after stripping white space."""
    if not references:
        return float("nan")
    return float(np.mean([p.strip() == r.strip() for p, r in zip(predictions, references)]))


def prompt_split(split, label_names: list[str] | None, template: str | None = None, tokenizer=None):
    """The split with its texts replaced by the prompts (no second texts): what a causal LM's target
    modules see, e.g. for OSRM statistics (a chat prompt as text: its special tokens read back as such)."""
    from .tasks import Split

    return Split(verbalise(split, label_names, template, tokenizer=tokenizer).prompts, list(split.labels))


def statistics_rows(split, label_names: list[str] | None, samples: int, task_type: str | None,
                    template: str | None = None, tokenizer=None):
    """The first ``samples`` rows whose target-module inputs statistics describe: the texts, or, for a
    ``CAUSAL_LM`` task type, the prompts (see :func:`prompt_split`)."""
    rows = split.take(samples)
    if str(task_type).upper() != "CAUSAL_LM":
        return rows
    return prompt_split(rows, label_names, template, tokenizer)


def score_split(model, tokenizer, split, label_names: list[str], metric: str, template: str | None = None,
                max_length: int = 64, batch_size: int = 32) -> float:
    """The task's metric of label scoring (each row's label is the most likely completion), or, for a
    completion task, exact match of the greedy generation (up to the longest reference's length + 4 tokens)."""
    from .tasks import compute_metric

    data = verbalise(split, label_names, template, tokenizer=tokenizer)
    if data.choices is None:
        longest = max(len(ids) for ids in tokenizer(data.completions, add_special_tokens=False)["input_ids"])
        replies = generate(model, tokenizer, data.prompts, max_new_tokens=longest + 4, batch_size=batch_size,
                           special_tokens=data.special_tokens)
        return compute_metric(metric, [r.split("\n")[0] for r in replies], data.completions)
    return compute_metric(metric, predict_labels(model, tokenizer, data, max_length, batch_size), data.labels)


def training_batches(tokenizer, split, label_names, template, max_length: int, order: list[int], batch_size: int,
                     device=None):
    """Right-padded prompt + completion batches in ``order``, labels on the completion tokens only."""
    data = verbalise(split, label_names, template, tokenizer=tokenizer)
    rows = encode_completions(tokenizer, data.prompts, data.completions, max_length,
                              special_tokens=data.special_tokens)
    for start in range(0, len(order), batch_size):
        batch = collate(tokenizer, [rows[i] for i in order[start:start + batch_size]])
        yield {k: v.to(device) for k, v in batch.items()} if device is not None else batch
