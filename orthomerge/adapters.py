"""PEFT LoRA adapter folders: read, validate against a base model, write, and convert to factors.

An adapter folder is ``adapter_config.json`` + ``adapter_model.safetensors`` exactly as PEFT writes it,
so plain ``peft.PeftModel.from_pretrained`` loads what orthomerge writes. orthomerge's own metadata
(how an adapter was initialised or merged) goes to ``orthomerge.json``, which PEFT ignores.

Per module the update is ``ΔW = s · B @ A`` with ``A`` [r, n], ``B`` [m, r] and ``s = α/r``
(``α/√r`` with rsLoRA), ``r``/``α`` resolved through ``rank_pattern``/``alpha_pattern``. Biases: with
``lora_bias=True`` the update adds ``s · b`` (``lora_B.bias``); with ``bias='lora_only'|'all'`` the adapter
stores trained absolute biases, whose change against the base is the update.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import OrthomergeError
from .linalg import all_finite
from .outputs import atomic_dir, check_output

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
META_NAME = "orthomerge.json"
INIT_NAME = "orthomerge_init.safetensors"  # initial A per module, for drift diagnostics; PEFT ignores it
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_LORA_BIAS_KEY = re.compile(r"^(?P<module>.+)\.lora_B(?:\.[^.]+)?\.bias$")
_UNSUPPORTED = ("lora_embedding_", "lora_magnitude_vector")
# Inits that change the base weights (the adapter is relative to W₀ − ΔW₀, not W₀); PEFT converts them.
RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# adapter_config keys written for a LoRA adapter; unknown keys break older PEFT versions.
_CONFIG_KEYS = (
    "peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout", "use_rslora",
    "rank_pattern", "alpha_pattern", "target_modules", "modules_to_save", "bias", "fan_in_fan_out",
    "init_lora_weights", "inference_mode", "lora_bias",
)


def pattern_value(patterns: dict, module: str, default):
    """PEFT's pattern lookup: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclass
class LoraAdapter:
    """LoRA factors per module (full module names of the base model), task heads and config.

    ``heads`` holds ``modules_to_save`` tensors under model-relative names such as
    ``classifier.weight``; they are task-specific and never merged.
    """

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    scaling: dict[str, float]
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    path: Path | None = None
    initial_A: dict[str, torch.Tensor] | None = None  # A at initialisation (drift diagnostics)
    lora_bias: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> lora_B bias (times s)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)     # model bias name -> trained value

    @property
    def task_type(self) -> str | None:
        """PEFT's task type (``SEQ_CLS``, ``CAUSAL_LM``, …; ``None`` for a bare model)."""
        return self.config.get("task_type")

    @property
    def has_biases(self) -> bool:
        return bool(self.lora_bias or self.biases)

    @property
    def modules(self) -> list[str]:
        return list(self.A)

    @property
    def name(self) -> str:
        return self.path.name if self.path else "adapter"

    def rank(self, module: str) -> int:
        return self.A[module].shape[0]

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s·B, A)``: the scale folded into B, so ``ΔW = B' @ A`` (stored dtype)."""
        return self.B[module] * self.scaling[module], self.A[module]

    def scaled_factors(self, module: str, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w·s·B, A)`` in float32: what every merge rule computes with."""
        return self.B[module].to(torch.float32) * (self.scaling[module] * weight), self.A[module].to(torch.float32)

    def delta(self, module: str) -> torch.Tensor:
        """Dense ``ΔW = s·B@A`` (float32 at least)."""
        b, a = self.factors(module)
        dtype = torch.promote_types(b.dtype, torch.float32)
        return b.to(dtype) @ a.to(dtype)

    def num_labels(self) -> int | None:
        """Output size of the saved head, if any (classifier/score weight rows)."""
        for key, value in self.heads.items():
            if key.endswith(("out_proj.weight", "score.weight")) or key == "classifier.weight":
                return value.shape[0]
        return None

    @classmethod
    def from_factors(cls, B: dict, A: dict, heads: dict | None = None, base: "LoraAdapter | None" = None,
                     metadata: dict | None = None, lora_bias: dict | None = None,
                     biases: dict | None = None) -> "LoraAdapter":
        """A scaling-1 adapter (``r = lora_alpha`` per module, the merged-adapter convention)."""
        config = {k: v for k, v in (base.config if base else {}).items()
                  if k in ("task_type", "base_model_name_or_path", "modules_to_save", "bias")}
        config["use_rslora"] = False
        return cls(A=dict(A), B=dict(B), scaling={m: 1.0 for m in A}, heads=dict(heads or {}),
                   config=config, metadata=dict(metadata or {}), lora_bias=dict(lora_bias or {}),
                   biases=dict(biases or {}))


# ---------------------------------------------------------------- reading


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise OrthomergeError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise OrthomergeError(f"{path}: not valid JSON ({err})") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; refuse pickles and report corruption in one line."""
    path = Path(path)
    if path.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
        raise OrthomergeError(f"{path}: pickle files are refused (unsafe to load); convert it to safetensors")
    if not path.exists():
        raise OrthomergeError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise OrthomergeError(f"{path}: not a readable safetensors file ({err})") from None


def load_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA folder (local, or a Hub repo id). Embedding LoRA and DoRA are refused, not silently dropped."""
    spec, path = str(path), Path(path)
    if path.exists() and not path.is_dir():
        raise OrthomergeError(f"{path}: not an adapter folder (a PEFT adapter is a folder)")
    if not path.is_dir():
        from .hub import ADAPTER_FILES, snapshot

        path = snapshot(spec, ADAPTER_FILES)
        if path is None:
            raise OrthomergeError(f"{spec}: not an adapter folder (nor a Hugging Face Hub repo id)")
    weights = path / WEIGHTS_NAME
    if not weights.exists() and (path / PICKLE_NAME).exists():
        raise OrthomergeError(f"{path / PICKLE_NAME}: pickle adapters are refused; re-save with safetensors")
    config = _read_json(path / CONFIG_NAME)
    if config.get("peft_type", "LORA").upper() != "LORA":
        raise OrthomergeError(f"{path / CONFIG_NAME}: peft_type {config['peft_type']!r} is not LORA")
    if config.get("use_dora"):
        raise OrthomergeError(f"{path / CONFIG_NAME}: DoRA adapters are not supported")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(RESIDUAL_INITS):
        raise OrthomergeError(
            f"{path / CONFIG_NAME}: init_lora_weights={config['init_lora_weights']!r} changed the base weights, "
            "so this adapter is not relative to the original model; convert it to a standard LoRA with PEFT's "
            "save_pretrained(..., path_initial_model_for_weight_conversion=<initial adapter>) and merge that")
    if "r" not in config or "lora_alpha" not in config:
        raise OrthomergeError(f"{path / CONFIG_NAME}: needs 'r' and 'lora_alpha'")
    tensors = read_safetensors(weights)
    heads_names = list(config.get("modules_to_save") or [])
    bias_mode = config.get("bias", "none") or "none"
    A, B, heads, lora_bias, biases = {}, {}, {}, {}, {}
    for key, value in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if any(tag in name for tag in _UNSUPPORTED):
            raise OrthomergeError(f"{weights}: key {key!r} is an unsupported LoRA variant (embedding/DoRA)")
        match = _LORA_KEY.match(name)
        bias_match = _LORA_BIAS_KEY.match(name)
        if match:
            (A if match["which"] == "A" else B)[match["module"]] = value
        elif bias_match:
            lora_bias[bias_match["module"]] = value
        elif ".original_module." in name or ".modules_to_save." in name:
            continue   # bias='all' also saves the wrapped head's copies; the head itself is kept below
        elif any(name == h or name.startswith(h + ".") or f".{h}." in f".{name}" for h in heads_names):
            heads[name] = value
        elif bias_mode != "none" and name.endswith(".bias"):
            biases[name.replace(".base_layer.", ".")] = value
        else:
            raise OrthomergeError(f"{weights}: key {key!r} is neither a LoRA factor, a bias of bias={bias_mode!r} "
                                  "nor in modules_to_save")
    stray = sorted(set(lora_bias) - set(B))
    if stray:
        raise OrthomergeError(f"{weights}: {stray[0]}.lora_B.bias has no lora_B weight")
    if set(A) != set(B):
        odd = sorted(set(A) ^ set(B))[0]
        raise OrthomergeError(f"{weights}: module {odd!r} has only one of lora_A/lora_B")
    if not A:
        raise OrthomergeError(f"{weights}: no LoRA factors")
    scaling = {}
    for module in A:
        r = pattern_value(config.get("rank_pattern"), module, config["r"])
        alpha = pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
        if A[module].ndim != 2 or B[module].ndim != 2 or A[module].shape[0] != r or B[module].shape[1] != r:
            raise OrthomergeError(
                f"{weights}: {module}: lora_A {tuple(A[module].shape)} / lora_B {tuple(B[module].shape)} "
                f"do not match rank {r} from {CONFIG_NAME}"
            )
        scaling[module] = lora_scaling(alpha, r, bool(config.get("use_rslora")))
    for m, b in lora_bias.items():
        if b.shape != (B[m].shape[0],):
            raise OrthomergeError(f"{weights}: {m}.lora_B.bias is {tuple(b.shape)}, lora_B has "
                                  f"{B[m].shape[0]} outputs")
    for name, t in {**{f"{m}.lora_A": v for m, v in A.items()}, **{f"{m}.lora_B": v for m, v in B.items()},
                    **{f"{m}.lora_B.bias": v for m, v in lora_bias.items()}, **biases, **heads}.items():
        if not all_finite(t):
            raise OrthomergeError(f"{weights}: {name} contains NaN or Inf")
    meta_path = path / META_NAME
    metadata = _read_json(meta_path) if meta_path.exists() else {}
    initial_A = read_safetensors(path / INIT_NAME) if (path / INIT_NAME).exists() else None
    return LoraAdapter(A=A, B=B, scaling=scaling, heads=heads, config=config, metadata=metadata, path=path,
                       initial_A=initial_A, lora_bias=lora_bias, biases=biases)


def validate_adapter(adapter: LoraAdapter, model: nn.Module, where: str | Path | None = None,
                     heads: bool = True) -> None:
    """Every key maps to a linear module of ``model`` with matching shapes; heads match the model's."""
    where = where or (adapter.path / WEIGHTS_NAME if adapter.path else "adapter")
    for name in adapter.modules:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise OrthomergeError(f"{where}: {name}: no such module in the base model") from None
        if not isinstance(module, nn.Linear):
            raise OrthomergeError(f"{where}: {name}: base module is {type(module).__name__}, not Linear")
        a, b = adapter.A[name], adapter.B[name]
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            raise OrthomergeError(
                f"{where}: {name}: factors give {b.shape[0]}×{a.shape[1]} but the base module is "
                f"{module.out_features}×{module.in_features}"
            )
    heads = adapter.heads if heads else {}
    state = model.state_dict() if adapter.biases or heads else {}   # (a walk of the whole model: only if needed)
    for key, value in adapter.biases.items():
        if key not in state or state[key].shape != value.shape:
            raise OrthomergeError(f"{where}: bias {key!r} {tuple(value.shape)} has no counterpart of that shape "
                                  "in the base model")
    for key, value in heads.items():
        if key not in state:
            raise OrthomergeError(f"{where}: head tensor {key!r} has no counterpart in the base model")
        if state[key].shape != value.shape:
            raise OrthomergeError(
                f"{where}: head tensor {key!r} is {tuple(value.shape)}, the model has {tuple(state[key].shape)}"
            )


# ---------------------------------------------------------------- writing


def _rank_alpha(adapter: LoraAdapter, module: str) -> tuple[int, float]:
    r = adapter.rank(module)
    s = adapter.scaling[module]
    alpha = s * math.sqrt(r) if adapter.config.get("use_rslora") else s * r
    return r, float(alpha)


def peft_config_dict(adapter: LoraAdapter) -> dict:
    """The adapter_config.json content: global r/α from the commonest pair, patterns for the rest."""
    pairs = {m: _rank_alpha(adapter, m) for m in adapter.modules}
    (r, alpha), _ = Counter(pairs.values()).most_common(1)[0]
    rank_pattern = {m: p[0] for m, p in pairs.items() if p[0] != r}
    alpha_pattern = {m: p[1] for m, p in pairs.items() if p[1] != alpha}
    # Exactly the modules held (full names): PEFT then expects no key the adapter lacks.
    targets = sorted(adapter.modules)
    config = {
        "peft_type": "LORA",
        "task_type": adapter.config.get("task_type", "SEQ_CLS"),
        "base_model_name_or_path": adapter.config.get("base_model_name_or_path"),
        "r": int(r),
        "lora_alpha": alpha,
        "lora_dropout": float(adapter.config.get("lora_dropout", 0.0)),
        "use_rslora": bool(adapter.config.get("use_rslora", False)),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": targets,
        "modules_to_save": adapter.config.get("modules_to_save") or None,
        "bias": (adapter.config.get("bias") or "none") if adapter.biases else "none",
        "lora_bias": bool(adapter.lora_bias),
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if not adapter.heads:
        config["modules_to_save"] = None
    return config


def save_adapter(adapter: LoraAdapter, out: str | Path, overwrite: bool = False) -> Path:
    """Write a PEFT folder atomically (see :mod:`orthomerge.outputs`: an existing non-empty ``out`` is
    replaced only with ``overwrite`` and only when orthomerge wrote it). Returns the folder."""
    out = check_output(out, overwrite=overwrite)
    config = peft_config_dict(adapter)
    tensors = {}
    for m in adapter.modules:
        tensors[f"{PREFIX}{m}.lora_A.weight"] = adapter.A[m].contiguous()
        tensors[f"{PREFIX}{m}.lora_B.weight"] = adapter.B[m].contiguous()
    for m, b in adapter.lora_bias.items():
        tensors[f"{PREFIX}{m}.lora_B.bias"] = b.contiguous()
    for name, b in adapter.biases.items():
        module = name.rsplit(".", 1)[0]
        key = f"{module}.base_layer.bias" if module in adapter.A else name
        tensors[f"{PREFIX}{key}"] = b.contiguous()
    for key, value in adapter.heads.items():
        tensors[f"{PREFIX}{key}"] = value.contiguous()
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if adapter.metadata:
            (tmp / META_NAME).write_text(json.dumps(adapter.metadata, indent=2, sort_keys=True) + "\n")
        if adapter.initial_A:
            save_file({k: v.contiguous() for k, v in adapter.initial_A.items()}, str(tmp / INIT_NAME))
    adapter.path = out
    return out


# ---------------------------------------------------------------- PEFT models


def from_peft_model(peft_model, metadata: dict | None = None) -> LoraAdapter:
    """Snapshot a (trained) ``PeftModel``'s active adapter as a :class:`LoraAdapter`."""
    from peft import get_peft_model_state_dict

    name = peft_model.active_adapter
    cfg = peft_model.peft_config[name]
    state = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v.detach().cpu().clone()
             for k, v in get_peft_model_state_dict(peft_model, adapter_name=name,
                                                                 save_embedding_layers=False).items()}
    A, B, heads = {}, {}, {}
    for key, value in state.items():
        match = _LORA_KEY.match(key)
        if match:
            (A if match["which"] == "A" else B)[match["module"]] = value
        else:
            heads[key] = value
    config = {k: (list(v) if isinstance(v, set) else v) for k, v in cfg.to_dict().items() if k in _CONFIG_KEYS}
    config["task_type"] = None if cfg.task_type is None else str(getattr(cfg.task_type, "value", cfg.task_type))
    scaling = {}
    for m in A:
        r = pattern_value(cfg.rank_pattern, m, cfg.r)
        alpha = pattern_value(cfg.alpha_pattern, m, cfg.lora_alpha)
        scaling[m] = lora_scaling(alpha, r, cfg.use_rslora)
    return LoraAdapter(A=A, B=B, scaling=scaling, heads=heads, config=config, metadata=dict(metadata or {}))


def lora_layers(peft_model) -> dict:
    """Base-model module name → PEFT LoRA layer of the active adapter."""
    name = peft_model.active_adapter
    return {n[len(PREFIX):]: m for n, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and name in getattr(m, "lora_A", {})}


def set_lora_A(peft_model, bases: dict) -> None:
    """Set every LoRA layer's ``A`` to ``bases[module]`` (an array or tensor [r, n]) and its ``B`` to 0."""
    name = peft_model.active_adapter
    with torch.no_grad():
        for module, layer in lora_layers(peft_model).items():
            w = layer.lora_A[name].weight
            w.copy_(torch.as_tensor(bases[module]).to(w.dtype))
            layer.lora_B[name].weight.zero_()


def new_peft_model(model: nn.Module, targets: list[str], rank: int = 8, alpha: float = 16.0,
                   dropout: float = 0.0, rslora: bool = False, init: bool | str = True, task_type: str = "SEQ_CLS"):
    """Wrap a model with a fresh LoRA of PEFT task type ``task_type`` (SEQ_CLS: head in ``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise OrthomergeError(f"rank must be ≥ 1, got {rank}")
    from .models import resolve_targets

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=resolve_targets(model, targets),
                        use_rslora=rslora, task_type=task_type, init_lora_weights=init)
    with warnings.catch_warnings():   # PEFT reads transformers' deprecated is_gradient_checkpointing (a FutureWarning)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = model.config.name_or_path
    return peft_model
