"""Training recipes: each a config, a batch source and a step function on the one loop."""

from llmcore.training.recipes import pretrain

RECIPES = {"pretrain": pretrain}

__all__ = ["RECIPES", "pretrain"]
