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

INITS = ("lora", "osrm", "orthogonal", "lora-unit")
FREEZE = ("A", "B", "none")
OSRM_VARIANTS = ("paper", "official", "selective")


def option(help: str, default=MISSING, *, factory=MISSING, choices: tuple | None = None, parse=None):
    """A dataclass field that also describes its command-line option: ``help``, ``choices`` and ``parse``
    (how the option's text becomes the value, e.g. ``str.upper``; default the default's type)."""
    metadata = {"help": help, **({"choices": tuple(choices)} if choices else {}), **({"parse": parse} if parse else {})}
    return field(default=default, default_factory=factory, metadata=metadata)


@dataclass
class TrainConfig:
    """Hyper-parameters of one LoRA fine-tune (recorded in the adapter's ``orthomerge.json``)."""

    init: str = option("how A starts (B = 0): PEFT's default, OSRM, a random orthonormal A, or PEFT's default "
                       "rescaled to unit rows", "lora", choices=INITS)
    rank: int = option("LoRA rank r", 8)
    alpha: float = option("LoRA alpha (ΔW = alpha/r · B A)", 16.0)
    targets: list[str] = option("target modules (last name components, comma-separated; auto: PEFT's default "
                                "for the architecture, e.g. query,value or q_proj,v_proj)",
                                factory=lambda: list(TARGETS))
    lr: float = option("AdamW learning rate (LoRA factors and head)", 5e-3)
    epochs: int = option("passes over the training split", 2)
    batch_size: int = option("training batch size", 32)
    max_length: int = option("tokens per row (longer rows are truncated)", MAX_LENGTH)
    seed: int = option("seed of the head init, PEFT's A init and the data order", 0)
    freeze: str = option("keep A or B at its init while training", "none", choices=FREEZE)
    warmup: float = option("fraction of the steps with a linear learning-rate warm-up", 0.06)
    weight_decay: float = option("AdamW weight decay", 0.0)
    variant: str = option("OSRM variant (official: the released code's init)", "paper", choices=OSRM_VARIANTS)
    beta: float = option("OSRM own-task tie-break: minimise tr(A(S_other − β S_own)Aᵀ); 0 = the paper", 0.0)
    subspace_k: int = option("> 0: A may rotate only within the k lowest-interference directions (k ≥ rank)", 0)
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
        for name in ("lr", "epochs", "batch_size", "max_length", "rank"):
            if getattr(self, name) <= 0:
                raise OrthomergeError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def needs_stats(self) -> bool:
        return self.init == "osrm" or self.subspace_k > 0 or self.interference_weight > 0
