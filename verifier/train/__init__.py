"""Certified training: IBP and CROWN-IBP losses on differentiable bounds from the core engine
(``BoundedModel.bounds(..., live=True)``), losses that mix in an adversarial point (MTL-IBP,
CC-IBP, SABR: ``verifier.train.mixed``), eps schedules, data readers, a checkpointed training
loop with exact resume, and evaluation reports.

    from verifier.train import TrainConfig, run_training
    report = run_training(TrainConfig(dataset="digits", model="mlp",
                                      model_kwargs={"in_dim": 64, "hidden": [64]}, eps=0.1))

The config (``TrainConfig``, whose defaults ``verifier train --help`` states) imports no torch;
the other names are imported on first use (PEP 562), so the command line's help stays fast.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_attributes
from .config import ConfigError, TrainConfig, from_dict, load_config

_LAZY = {
    "Dataset": ".data", "load_dataset": ".data", "load_digits_split": ".data",
    "load_idx_folder": ".data", "load_npz": ".data", "read_idx": ".data",
    "evaluate": ".evaluation", "run_training": ".run", "train": ".trainer",
}

__all__ = ["ConfigError", "Dataset", "TrainConfig", "evaluate", "from_dict", "load_config",
           "load_dataset", "load_digits_split", "load_idx_folder", "load_npz", "read_idx",
           "run_training", "train"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .data import Dataset, load_dataset, load_digits_split, load_idx_folder, load_npz, read_idx
    from .evaluation import evaluate
    from .run import run_training
    from .trainer import train


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals(), __all__)
