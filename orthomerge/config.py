"""Defaults shared by the library and the CLI, each defined once, and :class:`TrainConfig`.

This module imports nothing heavy (no torch), so the CLI builds its options from it at start-up: the
``orthomerge train`` options are derived from :class:`TrainConfig`'s fields (type and default from the
field, help text and choices from its metadata), and the task-size options from the constants here.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field

from .errors import OrthomergeError

MODEL = "minilm"       # the base model when none is named (a bundled alias, see models.ALIASES)
# Rows of a task's splits when none are asked for (tasks.load_task / load_tasks, orthomerge train / eval).
# The experiment sizes its own splits to its time budget (ExperimentConfig).
TRAIN_SIZE = 1000
VAL_SIZE = 300
TEST_SIZE = 500
MAX_LENGTH = 64        # tokens per row (longer rows are truncated) for training and evaluation
STATS_SAMPLES = 100    # rows per task for OSRM / RegMean statistics and the interference diagnostics
STATS_MAX_LENGTH = 128  # tokens per row when collecting statistics (orthomerge stats, collect_stats)
STATS_BATCH_SIZE = 32   # rows per forward pass when collecting statistics
# LoRA target modules when none are named: "auto" = PEFT's default for the architecture (query,value for
# BERT-like encoders, q_proj,v_proj for Llama-like decoders: the paper's q, v)
TARGETS = ("auto",)

DEFAULT_DEVICE = "auto"   # cuda if available, else mps, else cpu (models.resolve_device)
DEFAULT_DTYPE = "auto"    # the checkpoint's own dtype: float32 for the bundled models (models.resolve_dtype)
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
TRAIN_TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM")   # how a labelled task is learned: a head, or label completions

INITS = ("lora", "osrm", "orthogonal", "lora-unit", "gaussian")
FREEZE = ("A", "B", "none")
PRECISIONS = ("no", "bf16", "fp16")   # Trainer mixed precision (autocast); "no": the model's own dtype
OSRM_VARIANTS = ("paper", "official", "selective")


def option(help: str, default=MISSING, *, factory=MISSING, choices: tuple | None = None, parse=None):
    """A dataclass field that also describes its command-line option: ``help``, ``choices`` and ``parse``
    (how the option's text becomes the value, e.g. ``str.upper``; default the default's type)."""
    metadata = {"help": help, **({"choices": tuple(choices)} if choices else {}), **({"parse": parse} if parse else {})}
    return field(default=default, default_factory=factory, metadata=metadata)


@dataclass
class TrainConfig:
    """Hyper-parameters of one LoRA fine-tune (recorded in the adapter's ``orthomerge.json``)."""

    init: str = option("how A starts (B = 0): PEFT's default, OSRM, a random orthonormal A, PEFT's default "
                       "rescaled to unit rows, or PEFT's gaussian A ~ N(0, 1/r²) (the paper's baseline)", "lora",
                       choices=INITS)
    rank: int = option("LoRA rank r", 8)
    alpha: float = option("LoRA alpha (ΔW = alpha/r · B A)", 16.0)
    targets: list[str] = option("target modules (last name components, comma-separated; auto: PEFT's default "
                                "for the architecture, e.g. query,value or q_proj,v_proj; all-linear: every linear "
                                "module but the head)",
                                factory=lambda: list(TARGETS))
    lr: float = option("AdamW learning rate (LoRA factors and head)", 5e-3)
    epochs: int = option("passes over the training split", 2)
    batch_size: int = option("rows per optimiser step and accumulation step, across all processes "
                             "(torchrun / accelerate split it)", 32)
    gradient_accumulation: int = option("batches accumulated per optimiser step (effective batch: "
                                        "batch_size × this)", 1)
    max_length: int = option("tokens per row (longer rows are truncated)", MAX_LENGTH)
    seed: int = option("seed of the head init, PEFT's A init and the data order", 0)
    freeze: str = option("keep A or B at its init while training", "none", choices=FREEZE)
    warmup: float = option("fraction of the steps with a linear learning-rate warm-up", 0.06)
    weight_decay: float = option("AdamW weight decay", 0.0)
    max_grad_norm: float = option("clip the gradient norm to this; 0 = no clipping", 0.0)
    precision: str = option("mixed precision of the Trainer (autocast): no, bf16, fp16 (fp16 needs CUDA)", "no",
                            choices=PRECISIONS)
    gradient_checkpointing: bool = option("recompute activations in the backward pass (less memory, slower)",
                                          False)
    keep_best: bool = option("keep the epoch with the best validation score (the paper's code), not the last",
                             False)
    variant: str = option("OSRM variant (official: the released code's init)", "paper", choices=OSRM_VARIANTS)
    beta: float = option("OSRM own-task tie-break: minimise tr(A(S_other − β S_own)Aᵀ); 0 = the paper", 0.0)
    subspace_k: int = option("> 0: A may rotate only within the k lowest-interference directions (k ≥ rank)", 0)
    compensate: bool = option("scale the initial A so that the task's own inputs pass as much energy through "
                              "it as through a random A of its norm (an A kept in the other tasks' least-used "
                              "directions otherwise starves; needs the task's statistics)", False)
    interference_weight: float = option("μ of the interference regulariser", 0.0)
    task_type: str = option("SEQ_CLS: a classification head; CAUSAL_LM: the label's words as a completion of a "
                            "prompt (LM loss on the completion only, scored by log-likelihood)", "SEQ_CLS",
                            choices=TRAIN_TASK_TYPES, parse=str.upper)
    prompt: str = option("causal-LM prompt template over {text} (and {pair}); empty: "
                         "'{text}\nAnswer:' (pairs: '{text}\n{pair}\nAnswer:')", "")

    def check(self) -> None:
        self.task_type = str(self.task_type).upper()
        if self.task_type not in TRAIN_TASK_TYPES:
            raise OrthomergeError(f"task type {self.task_type!r}: training supports {', '.join(TRAIN_TASK_TYPES)}")
        if self.init not in INITS:
            raise OrthomergeError(f"unknown init {self.init!r} (choose from {', '.join(INITS)})")
        if self.freeze not in FREEZE:
            raise OrthomergeError(f"freeze must be A, B or none, got {self.freeze!r}")
        if self.subspace_k and self.subspace_k < self.rank:
            raise OrthomergeError(f"subspace k={self.subspace_k} must be ≥ rank {self.rank}")
        if self.precision not in PRECISIONS:
            raise OrthomergeError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.max_grad_norm < 0 or self.weight_decay < 0 or not 0 <= self.warmup < 1:
            raise OrthomergeError("max_grad_norm and weight_decay must be ≥ 0 and warmup in [0, 1)")
        for name in ("lr", "epochs", "batch_size", "gradient_accumulation", "max_length", "rank"):
            if getattr(self, name) <= 0:
                raise OrthomergeError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def needs_stats(self) -> bool:
        return self.init == "osrm" or self.subspace_k > 0 or self.interference_weight > 0

    @classmethod
    def protocol(cls, name: str, **overrides) -> "TrainConfig":
        """The preset ``name`` of :data:`PROTOCOLS` (``overrides`` win over it): e.g. ``protocol("paper",
        epochs=3)``."""
        if name not in PROTOCOLS:
            raise OrthomergeError(f"unknown protocol {name!r} (choose from {', '.join(PROTOCOLS)})")
        return cls(**{**PROTOCOLS[name], **overrides})


# The official OSRM code's training recipe (RoBERTa-large on GLUE: a transformers Trainer run): what
# protocol_deviations compares a config with. batch = batch_size × gradient_accumulation (64 = 32 × 2 too).
PAPER_RECIPE = {"lr": 4e-4, "warmup": 0.06, "weight_decay": 0.0, "batch": 64, "max_length": 128, "keep_best": True,
                "rank": 8, "alpha": 16.0, "targets": ["auto"], "max_grad_norm": 1.0, "epochs": 10,
                "precision": "bf16"}
# Named presets of TrainConfig (``orthomerge train --protocol NAME``; explicit options override them).
# "paper": the official recipe but for what depends on the machine: epochs (the caller's) and precision.
PROTOCOLS = {
    "default": {},
    "paper": {k: v for k, v in PAPER_RECIPE.items() if k not in ("batch", "epochs", "precision")}
             | {"batch_size": 64, "gradient_accumulation": 1},
}


def protocol_deviations(config: TrainConfig, recipe: dict | None = None) -> list[str]:
    """Where ``config`` departs from the official recipe (default :data:`PAPER_RECIPE`), one line each,
    e.g. ``"epochs: 2 (official: 10)"``: what a report lists under the paper protocol."""
    recipe = PAPER_RECIPE if recipe is None else recipe
    out = []
    for key, official in recipe.items():
        value = (config.batch_size * config.gradient_accumulation if key == "batch" else getattr(config, key))
        if value != official:
            shown = (f"{config.batch_size} × {config.gradient_accumulation} accumulation" if key == "batch"
                     else value)
            out.append(f"{key}: {shown} (official: {official})")
    return out
