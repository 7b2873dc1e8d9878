"""Layer-wise merges and their RMM-style search: layer parsing, a planted best plan found by the policy (on a
synthetic reward and on a tiny model), and the written per-layer recipe replaying the searched model exactly."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from conftest import TEXTS
from merge_fixtures import make_adapter

from orthomerge.adapters import load_adapter, save_adapter
from orthomerge.encoding import batches
from orthomerge.errors import OrthomergeError
from orthomerge.evaluate import predict
from orthomerge.merge import merge_adapters
from orthomerge.merge.layerwise import layer_groups, layer_of, layerwise_search
from orthomerge.models import load_model, load_tokenizer
from orthomerge.patching import patched
from orthomerge.tasks import Split, Task


@pytest.mark.parametrize("name, layer", [
    ("bert.encoder.layer.3.attention.self.query", "3"), ("model.layers.12.self_attn.q_proj", "12"),
    ("transformer.h.0.attn.c_attn", "0"), ("vision.blocks.7.mlp.fc1", "7"), ("bert.pooler.dense", "other"),
    ("model.layers.2", "2"),
])
def test_layer_of(name, layer):
    assert layer_of(name) == layer


def test_groups_are_in_layer_order():
    mods = ["m.layers.10.q", "m.layers.2.q", "m.pool", "m.layers.2.v"]
    assert list(layer_groups(mods)) == ["2", "10", "other"]


def test_policy_finds_a_planted_plan_on_a_synthetic_reward():
    """Reward = share of blocks whose λ equals a hidden target; 6 layers × 4 actions (4096 plans)."""
    modules = [f"m.layers.{i}.q" for i in range(6)]
    target = [3, 0, 2, 1, 3, 0]
    lams = [0.5, 1.0, 1.5, 2.0]
    ctx = dataclasses.make_dataclass("Ctx", ["modules", "merge_dense"])(
        modules, lambda method, params: {m: torch.ones(1) for m in modules})

    def scorer(deltas, n):
        return sum(float(deltas[f"m.layers.{i}.q"]) == lams[t] for i, t in enumerate(target)) / len(target)

    candidates = [("task_arithmetic", {}, lam) for lam in lams]
    found = layerwise_search(ctx, candidates, scorer, [4, 8, 16], eta=2, block=1, episodes=20, explore=1.0, seed=0)
    assert found.score == 1.0
    assert [found.plan[str(i)]["scale"] for i in range(6)] == [lams[t] for t in target]
    assert len(found.episodes) == 3 * 20 + 1   # the budget: episodes per phase, plus the greedy plan


@pytest.fixture(scope="module")
def planted(tiny_bert, tmp_path_factory):
    """A "good" adapter that only touches layer 0 and a "noise" adapter, 10× larger, that only touches layer 1;
    both tasks are labelled by base + good, so the best plan is λ = 1 in layer 0 and λ = 0 in layer 1."""
    root = tmp_path_factory.mktemp("planted")
    good = load_adapter(make_adapter(tiny_bert, root / "made_good", r=4, alpha=32, seed=31, num_labels=2))
    noise = load_adapter(make_adapter(tiny_bert, root / "made_noise", r=4, alpha=32, seed=32, num_labels=2))
    for m in good.modules:
        if layer_of(m) == "1":
            good.B[m] = torch.zeros_like(good.B[m])
        else:
            noise.B[m] = torch.zeros_like(noise.B[m])
        noise.B[m] = noise.B[m] * 10
    model = load_model(tiny_bert)
    tok = load_tokenizer(tiny_bert)
    texts = [f"{a} {b}" for a in TEXTS for b in TEXTS[:3]][:48]
    heads = {k: v.clone() for k, v in good.heads.items()}
    model.load_state_dict({**model.state_dict(), **heads})
    with patched(model, {m: good.delta(m) for m in good.modules}), torch.no_grad():
        logits = torch.cat([model(**batch).logits for _, batch in batches(tok, Split(texts, [0] * 48), 64, 16)])
    heads["classifier.bias"][1] -= float((logits[:, 1] - logits[:, 0]).median())   # balanced labels
    good, noise = dataclasses.replace(good, heads=heads), dataclasses.replace(noise, heads=dict(heads))
    good_dir, noise_dir = save_adapter(good, root / "good"), save_adapter(noise, root / "noise")
    model.load_state_dict({**model.state_dict(), **heads})
    with patched(model, {m: good.delta(m) for m in good.modules}):
        labels = predict(model, tok, Split(texts, [0] * 48))
    assert 0 < sum(labels) < len(labels)
    data = Split(texts, labels)
    tasks = [Task(n, ["a", "b"], "accuracy", data, data, data) for n in ("good", "noise")]
    return [good_dir, noise_dir], tasks


def test_search_finds_the_planted_plan_on_a_tiny_model(planted, tiny_bert, tmp_path):
    dirs, tasks = planted
    result = merge_adapters(dirs, "search", model=tiny_bert, data=tasks, strategy="layerwise",
                            methods="task_arithmetic", lambdas="0,1", min_samples=12, eta=2, episodes=6,
                            objective="raw", dense=True)
    search = result.report["search"]
    plan = search["best"]["plan"]
    assert {g: c["scale"] for g, c in plan.items()} == {"0": 1.0, "1": 0.0}
    assert search["best"]["score"] == 1.0 and search["rows_evaluated"] > 0
    scores = {tuple(e["plan"]): e["score"] for e in search["trials"]}
    assert min(scores.values()) < 1.0   # the plans really differ: a wrong choice costs accuracy

    # the recipe replays the searched model exactly (same bits, so the same logits)
    result.save(tmp_path / "out")
    recipe = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert recipe["method"] == "layerwise" and recipe["parameters"]["plan"] == plan
    replay = merge_adapters([a["path"] for a in recipe["adapters"]], "layerwise", model=tiny_bert, dense=True,
                            **recipe["parameters"])
    for m in result.dense[""]:
        assert torch.equal(replay.delta(m), result.delta(m)), m


def test_layerwise_plan_is_checked(planted, tiny_bert):
    dirs, _ = planted
    with pytest.raises(OrthomergeError, match="no entry for layer '1'"):
        merge_adapters(dirs, "layerwise", model=tiny_bert, plan={"0": {"method": "task_arithmetic", "scale": 1.0}})
    with pytest.raises(OrthomergeError, match="cannot be chosen per layer"):
        merge_adapters(dirs, "layerwise", model=tiny_bert, plan={"*": {"method": "fisher"}})
    default = merge_adapters(dirs, "layerwise", model=tiny_bert, dense=True,
                             plan={"*": {"method": "task_arithmetic", "scale": 0.5}})
    ta = merge_adapters(dirs, "task_arithmetic", model=tiny_bert, dense=True, scale=0.5)
    for m in ta.dense[""]:
        torch.testing.assert_close(default.delta(m), ta.delta(m))
