"""Run a training recipe under torchrun (or alone) for the distributed tests.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/programs/train_dist.py OUT_DIR CONFIG_JSON [STOP_AT|resume]

CONFIG_JSON is a JSON object of TrainConfig keys (its "recipe" picks the recipe, default
pretrain); a number stops the run after that step
(with a checkpoint), "resume" continues the run in OUT_DIR.
"""

import json
import sys

from llmcore.training.config import TrainConfig, apply
from llmcore.training.recipes import RECIPES


def main() -> None:
    out, values = sys.argv[1], json.loads(sys.argv[2])
    extra = sys.argv[3] if len(sys.argv) > 3 else None
    cfg = apply(TrainConfig(), values).validate()
    recipe = RECIPES[cfg.recipe]
    if extra == "resume":
        recipe.run(cfg, out, resume=True)
    else:
        recipe.run(cfg, out, stop_at=int(extra) if extra else None)


if __name__ == "__main__":
    main()
