"""The training layer: `TIPConfig` and `TIPGKDTrainer` on top of TRL's `DistillationTrainer`, with the trainer's
separate concerns in their own modules (rollout mixing, Hub publishing, after-training benchmarks)."""

from .tip_config import TIPConfig
from .tip_trainer import TIPGKDTrainer


__all__ = ["TIPConfig", "TIPGKDTrainer"]
