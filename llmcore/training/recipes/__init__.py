"""Training recipes: each a config, a batch source and a step function on the one loop."""

from llmcore.training.recipes import dpo, pretrain, reward, sft

RECIPES = {"pretrain": pretrain, "sft": sft, "reward": reward, "dpo": dpo}

__all__ = ["RECIPES", "dpo", "pretrain", "reward", "sft"]
