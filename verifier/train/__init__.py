"""Certified training: IBP and CROWN-IBP losses on differentiable bounds from the core engine
(``BoundedModel.bounds(..., live=True)``), eps schedules, data readers, a checkpointed training
loop with exact resume, and evaluation reports.

    from verifier.train import TrainConfig, run_training
    report = run_training(TrainConfig(dataset="digits", model="mlp",
                                      model_kwargs={"in_dim": 64, "hidden": [64]}, eps=0.1))
"""
from .config import ConfigError, TrainConfig, from_dict, load_config
from .data import Dataset, load_dataset, load_digits_split, load_idx_folder, load_npz, read_idx
from .evaluate import evaluate
from .run import run_training
from .trainer import train

__all__ = ["ConfigError", "Dataset", "TrainConfig", "evaluate", "from_dict", "load_config",
           "load_dataset", "load_digits_split", "load_idx_folder", "load_npz", "read_idx",
           "run_training", "train"]
