"""Tokenise a split once and pad batches dynamically: what training, evaluation and the data-driven
merges all feed the model."""
from __future__ import annotations

import numpy as np


def encode(tokenizer, split, max_length: int) -> list[dict]:
    """One unpadded encoding per row (``split.texts``, with ``split.pairs`` as second segments)."""
    enc = tokenizer(split.texts, split.pairs, truncation=True, max_length=max_length)
    return [{k: enc[k][i] for k in enc} for i in range(len(split))]


def pad(tokenizer, encodings: list[dict], indices, device=None) -> dict:
    """The rows ``indices`` of ``encodings`` padded to their longest, as tensors (on ``device``, if given)."""
    batch = tokenizer.pad([encodings[i] for i in indices], return_tensors="pt")
    return batch.to(device) if device is not None else batch


def batches(tokenizer, split, max_length: int, batch_size: int, by_length: bool = False, device=None):
    """``(row indices, padded batch)`` over a split: in order, or (``by_length``) shortest rows first so
    that a batch carries little padding."""
    encodings = encode(tokenizer, split, max_length)
    order = (np.argsort([len(e["input_ids"]) for e in encodings], kind="stable").tolist() if by_length
             else list(range(len(encodings))))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, pad(tokenizer, encodings, idx, device)
