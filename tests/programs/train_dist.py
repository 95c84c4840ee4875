"""Run the pretrain recipe under torchrun (or alone) for the distributed tests.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/programs/train_dist.py OUT_DIR CONFIG_JSON

CONFIG_JSON is a JSON object of TrainConfig keys.
"""

import json
import sys

from llmcore.training.config import TrainConfig, apply
from llmcore.training.recipes import pretrain


def main() -> None:
    out, values = sys.argv[1], json.loads(sys.argv[2])
    cfg = apply(TrainConfig(), values).validate()
    pretrain.run(cfg, out)


if __name__ == "__main__":
    main()
