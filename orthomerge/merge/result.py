"""What a merge produced and how it is written: a PEFT folder (merged LoRA + one per task with its head),
or dense model folders, plus ``merge_report.json`` and any files the method asked for.

Output layout (:meth:`MergeResult.save`)::

    OUT/                      merged LoRA, no head (PEFT folder)  |  dense: base + merged ΔW (model folder)
    OUT/tasks/<adapter name>/ merged LoRA + that task's head       |  dense: that task's full model
    OUT/merge_report.json     method, params, per-module and total re-compression error, timings

For methods with one update per task (``per_task``) OUT/ holds no single model: each ``tasks/<name>``
has its own update.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import LoraAdapter, save_adapter
from ..errors import OrthomergeError
from ..models import model_for_heads
from ..outputs import atomic_dir, check_output
from ..patching import patched_state

REPORT_NAME = "merge_report.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "merges.txt", "vocab.json", "tokenizer.model")
HEAD_POLICY = "task heads (modules_to_save) are not merged: OUT/tasks/<name>/ carries each task's own head"


@dataclass
class MergeResult:
    """What :func:`~orthomerge.merge.engine.merge_adapters` produced; :meth:`save` writes it.

    ``merged``: the merged LoRA without heads (scaling 1; ``None`` for per-task methods and dense output).
    ``tasks``: per task name, the merged LoRA plus that task's head (per-task methods: the task's own update).
    ``dense``: with ``dense=True``, per output (``""`` = merged, else a task name) the merged ΔW per module.
    ``files``: extra files (name → text) the method asked to write into the output folder.
    """

    method: str
    params: dict
    names: list[str]
    adapters: list[LoraAdapter]
    merged: LoraAdapter | None
    tasks: dict[str, LoraAdapter]
    dense: dict[str, dict[str, torch.Tensor]] | None
    report: dict
    model: object = None
    path: Path | None = None
    bias_delta: dict[str, torch.Tensor] = field(default_factory=dict)   # model bias name -> additive change
    files: dict[str, str] = field(default_factory=dict)

    def input_paths(self) -> list[Path]:
        return [a.path for a in self.adapters if a.path is not None]

    def delta(self, module: str, task: str | None = None) -> torch.Tensor:
        """The merged ΔW of ``module`` (for ``task``'s output where updates differ per task)."""
        if self.dense is not None:
            return self.dense[task or ""][module]
        adapter = self.tasks[task] if task else self.merged
        if adapter is None:
            raise OrthomergeError(f"{self.method}: one update per task; name the task")
        return adapter.delta(module)

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write the output folder atomically (nothing is left behind on failure). An existing non-empty
        ``out`` is replaced only with ``overwrite``, and never one that holds an input adapter."""
        start = time.perf_counter()
        out = check_output(out, overwrite=overwrite, inputs=self.input_paths())
        with atomic_dir(out) as tmp:
            if self.dense is not None:
                self._save_dense(tmp)
            else:
                if self.merged is not None:
                    save_adapter(self.merged, tmp)
                for name, adapter in self.tasks.items():
                    save_adapter(adapter, tmp / "tasks" / name)
            for name, text in self.files.items():
                (tmp / name).write_text(text)
            self.report["timing"]["save_s"] = time.perf_counter() - start
            (tmp / REPORT_NAME).write_text(json.dumps(self.report, indent=2, sort_keys=True, default=str) + "\n")
        self.path = out
        return out

    def _save_dense(self, tmp: Path) -> None:
        if self.model is None:
            raise OrthomergeError("dense output needs the base model")
        base_state = self.model.state_dict()
        src = Path(getattr(self.model.config, "_name_or_path", "") or "")
        outputs = ([("", tmp, {})] if "" in self.dense else []) + [
            (name, tmp / "tasks" / name, a.heads) for name, a in zip(self.names, self.adapters)]
        for key, folder, heads in outputs:
            state = patched_state(base_state, self.dense[key] if key in self.dense else self.dense[""])
            for name, delta in self.bias_delta.items():
                state[name] = (base_state[name].to(torch.float32) + delta).to(base_state[name].dtype)
            model = model_for_heads(self.model, heads, folder)
            state.update(heads)
            model.load_state_dict(state, strict=True)
            folder.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(str(folder))
            for name in TOKENIZER_FILES:
                if src.is_dir() and (src / name).exists():
                    shutil.copy(src / name, folder / name)
