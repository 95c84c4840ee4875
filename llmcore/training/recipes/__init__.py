"""Training recipes: each a config, a batch source and a step function on the one loop."""

from llmcore.training.recipes import doremi, dpo, ppo, pretrain, reward, sft

RECIPES = {"pretrain": pretrain, "sft": sft, "reward": reward, "dpo": dpo, "ppo": ppo,
           "doremi": doremi}

__all__ = ["RECIPES", "doremi", "dpo", "ppo", "pretrain", "reward", "sft"]
