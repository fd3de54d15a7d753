"""The thin GRPO trainer: ``GRPOTrainer`` + ``GRPOConfig`` (and ``pyfastrl train`` on the command line)."""
from pyfastrl.trainer.config import GRPOConfig, load_config_file
from pyfastrl.trainer.trainer import GRPOTrainer, Rollout

__all__ = ["GRPOConfig", "GRPOTrainer", "Rollout", "load_config_file"]
