"""Reference trainer for residual contrastive learning (RCL): pre-training on noisy images and
proxy evaluation (Sec. 4 of the paper). Command line: ``rcl-train`` or ``python -m rcl_ops.train``.

Python use::

    from rcl_ops.train import build_config, run_experiment
    summary = run_experiment(build_config("quick", methods=["rcl-emd", "n2n"]))
"""

from .config import TrainConfig, build_config
from .images import DataError
from .presets import PRESETS
from .trainer import run_experiment

__all__ = ["PRESETS", "DataError", "TrainConfig", "build_config", "run_experiment"]
