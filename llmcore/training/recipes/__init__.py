"""Training recipes: each a config, a batch source and a step function on the one loop."""

from llmcore.training.recipes import dpo, ppo, pretrain, reward, sft

RECIPES = {"pretrain": pretrain, "sft": sft, "reward": reward, "dpo": dpo, "ppo": ppo}

__all__ = ["RECIPES", "dpo", "ppo", "pretrain", "reward", "sft"]
