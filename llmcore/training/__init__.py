"""Training on llmcore kernels: the one loop, its config, optimizer and schedules,
checkpoints, distributed wrapping, losses, and the recipes (one module each)."""

from llmcore.training.config import TrainConfig, load_config
from llmcore.training.loop import Trainer, TrainingError

__all__ = ["TrainConfig", "Trainer", "TrainingError", "load_config"]
