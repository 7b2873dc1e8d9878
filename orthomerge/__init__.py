"""orthomerge: make LoRA adapters mergeable (OSRM) and merge them exactly in low-rank form."""
__version__ = "0.1.0"
