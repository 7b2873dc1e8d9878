"""PEFT folder round trips with PEFT's own forward as the oracle; validation errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import TEXTS
from orthomerge.adapters import (LoraAdapter, load_adapter, new_peft_model, from_peft_model, save_adapter,
                                 validate_adapter)
from orthomerge.errors import OrthomergeError
from orthomerge.models import load_model, load_tokenizer
from peft_oracle import merged_state_dict, to_peft_model


def trained_like(path, seed=0, rank=4, alpha=8, rslora=False, rank_pattern=None, alpha_pattern=None):
    """A PEFT-saved adapter with random non-zero B (as after training)."""
    from peft import LoraConfig, get_peft_model

    model = load_model(path, num_labels=3, seed=seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["query", "value"], task_type="SEQ_CLS",
                     use_rslora=rslora, rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    return peft_model.eval()


def logits(model, path):
    batch = load_tokenizer(path)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("kwargs", [
    {},
    {"rslora": True},
    {"rank_pattern": {"layer.1.attention.self.value": 2}, "alpha_pattern": {"query": 3}},
])
def test_round_trip_matches_peft_forward(tiny_bert, tmp_path, kwargs):
    from peft import PeftModel

    peft_model = trained_like(tiny_bert, **kwargs)
    peft_model.save_pretrained(tmp_path / "peft")
    expected = logits(peft_model, tiny_bert)
    adapter = load_adapter(tmp_path / "peft")
    validate_adapter(adapter, load_model(tiny_bert, num_labels=3))
    save_adapter(adapter, tmp_path / "ours")  # re-written by orthomerge, read back by plain PEFT
    reloaded = PeftModel.from_pretrained(load_model(tiny_bert, num_labels=3, seed=7), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(reloaded, tiny_bert), expected, rtol=1e-5, atol=1e-6)
    in_memory = to_peft_model(load_model(tiny_bert, num_labels=3, seed=8), adapter)
    torch.testing.assert_close(logits(in_memory, tiny_bert), expected, rtol=1e-5, atol=1e-6)
    snapshot = from_peft_model(peft_model)
    for m in adapter.modules:
        torch.testing.assert_close(snapshot.delta(m), adapter.delta(m))


def test_dense_merge_equals_adapter_forward(tiny_bert, tmp_path):
    peft_model = trained_like(tiny_bert, rslora=True)
    adapter = from_peft_model(peft_model)
    dense = load_model(tiny_bert, num_labels=3)
    dense.load_state_dict(merged_state_dict(load_model(tiny_bert, num_labels=3), adapter))
    torch.testing.assert_close(logits(dense.eval(), tiny_bert), logits(peft_model, tiny_bert), rtol=1e-5,
                               atol=1e-5)


def test_scaling_convention_of_from_factors(tiny_bert, tmp_path):
    from peft import PeftModel

    source = from_peft_model(trained_like(tiny_bert))
    B = {m: source.factors(m)[0] for m in source.modules}
    merged = LoraAdapter.from_factors(B, source.A, heads=source.heads, base=source)
    save_adapter(merged, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4  # scaling 1, the merged-adapter convention
    loaded = PeftModel.from_pretrained(load_model(tiny_bert, num_labels=3), tmp_path / "m").eval()
    torch.testing.assert_close(logits(loaded, tiny_bert), logits(to_peft_model(load_model(tiny_bert, num_labels=3),
                               source), tiny_bert), rtol=1e-5, atol=1e-6)


def test_bad_adapters_are_refused(tiny_bert, tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    peft_model = trained_like(tiny_bert)
    good = tmp_path / "good"
    peft_model.save_pretrained(good)

    def variant(name, edit_tensors=None, edit_config=None):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        if edit_tensors:
            tensors = load_file(folder / "adapter_model.safetensors")
            edit_tensors(tensors)
            save_file(tensors, folder / "adapter_model.safetensors")
        if edit_config:
            cfg = json.loads((folder / "adapter_config.json").read_text())
            edit_config(cfg)
            (folder / "adapter_config.json").write_text(json.dumps(cfg))
        return folder

    key = next(k for k in load_file(good / "adapter_model.safetensors") if "lora_A" in k)
    nan = variant("nan", lambda t: t[key].fill_(float("nan")))
    with pytest.raises(OrthomergeError, match="nan.*NaN"):
        load_adapter(nan)
    wrong_rank = variant("rank", edit_config=lambda c: c.update(r=8))
    with pytest.raises(OrthomergeError, match="rank 8"):
        load_adapter(wrong_rank)
    stray = variant("stray", lambda t: t.update({"base_model.model.something.weight": torch.zeros(2)}))
    with pytest.raises(OrthomergeError, match="something"):
        load_adapter(stray)
    pickle = tmp_path / "pickle"
    pickle.mkdir()
    shutil.copy(good / "adapter_config.json", pickle)
    (pickle / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(OrthomergeError, match="pickle"):
        load_adapter(pickle)
    corrupt = variant("corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(OrthomergeError, match="corrupt"):
        load_adapter(corrupt)
    with pytest.raises(OrthomergeError, match="no such module"):
        validate_adapter(load_adapter(good), load_model(tiny_llama, num_labels=3))
    with pytest.raises(OrthomergeError, match="head tensor"):
        validate_adapter(load_adapter(good), load_model(tiny_bert, num_labels=5))


def test_save_is_atomic(tiny_bert, tmp_path):
    adapter = from_peft_model(trained_like(tiny_bert))
    adapter.A[adapter.modules[0]] = "not a tensor"  # makes the write fail midway
    with pytest.raises(Exception):
        save_adapter(adapter, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_new_peft_model_records_base(tiny_bert):
    peft_model = new_peft_model(load_model(tiny_bert), ["query"], rank=2)
    assert from_peft_model(peft_model).config["base_model_name_or_path"] == tiny_bert
