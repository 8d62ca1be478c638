"""The fine-tune engine: any registered spec, layers frozen by name, a new head, Keras fit.

One module a concern: config (every option, declared once: the CLI is derived from it), plan (every
check, before the run folder exists), caching (the frozen part computed once), checkpoints (slot files
and resume), callbacks (progress, metrics, histograms, checkpoints), engine (the run itself).

A run folder holds config.json, checkpoints/ (state.json and a last-a/b.npz slot each epoch, a
best-a/b.npz slot on each new best validation accuracy, best.safetensors at the end), metrics.csv,
tensorboard/, and at the end weights.safetensors (verified, the new head included) and classes.txt.
"""

from zoo.finetune.config import FinetuneConfig, FinetuneResult
from zoo.finetune.engine import finetune

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune"]
