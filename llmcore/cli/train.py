"""``llmcore train RECIPE``: a training run into a run directory.

  llmcore train pretrain --config stdlib --out runs/stdlib
  llmcore train pretrain --set steps=200 --set model.dim=128 --out runs/small
  llmcore train pretrain --out runs/stdlib --resume        # continue where it stopped
  llmcore train doremi --config stdlib --out runs/doremi   # domain weights (DoReMi)
  llmcore train pretrain --domain-weights runs/doremi/domain_weights.json --out runs/mix

Under torchrun (``torchrun --nproc-per-node N -m llmcore.cli train ...``) the run is
data-parallel (``--set parallel=fsdp`` for FSDP2); only rank 0 writes.
"""

from __future__ import annotations

import json

from llmcore.cli._common import CLIError, new_run_dir


def add_parser(subparsers):
    from llmcore.training.recipes import RECIPES

    p = subparsers.add_parser("train", help="train a model (pretrain, sft, reward, dpo, ppo, doremi) into a run "
                              "folder",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", choices=sorted(RECIPES), help="what to train")
    p.add_argument("--config", metavar="NAME|FILE.toml",
                   help="a named config (see --list-configs) or a TOML file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable; model.KEY for model shape)")
    p.add_argument("--preset", help="model preset (tiny, 124M, 1B, 7B); same as --set preset=")
    p.add_argument("--data", nargs="+", metavar="stdlib|PATH",
                   help="training data: stdlib (default) or files/folders")
    p.add_argument("--out", help="run directory (default: a new folder under ./llmcore-runs)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run directory's last checkpoint")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="post-training: skip (and count) unusable rows instead of stopping at "
                   "the first; same as --set skip_bad_rows=true")
    p.add_argument("--domain-weights", metavar="FILE.json|natural|uniform",
                   help="pretrain on a domain mixture (e.g. a doremi run's "
                   "domain_weights.json); same as --set domain_weights=...")
    p.add_argument("--list-configs", action="store_true", help="print the named configs")
    return p


def run(args) -> int:
    from llmcore.training.config import TrainConfig, load_config
    from llmcore.training.recipes import RECIPES

    recipe = RECIPES[args.recipe]
    if args.list_configs:
        print(json.dumps(recipe.NAMED_CONFIGS, indent=2))
        return 0
    sets = list(args.sets)
    if args.preset:
        sets.insert(0, f"preset={json.dumps(args.preset)}")
    if args.domain_weights:
        sets.append(f"domain_weights={json.dumps(args.domain_weights)}")
    if args.skip_bad_rows:
        sets.append("skip_bad_rows=true")
    if args.data:
        data = "stdlib" if args.data == ["stdlib"] else list(args.data)
        sets.insert(0, f"data={json.dumps(data)}")
    cfg = load_config(TrainConfig(recipe=args.recipe), args.config, recipe.NAMED_CONFIGS, sets)
    if args.resume and not args.out:
        raise CLIError("--resume needs --out RUN_DIR (the run to continue)")
    out = args.out or new_run_dir(f"train-{args.recipe}")
    from llmcore.training.loop import TrainingError

    try:
        result = recipe.run(cfg, out, resume=args.resume)
    except TrainingError as e:  # a run that cannot start or go on: one line, no traceback
        raise CLIError(str(e)) from None
    if result.get("stage") in ("reference", "proxy"):
        print(f"stopped in the {result['stage']} stage: continue with --resume --out {out}")
        return 0
    if args.recipe == "doremi":
        w = ", ".join(f"{k} {v:.3f}" for k, v in result.get("weights", {}).items())
        print(f"done: {out}/domain_weights.json  ({w})")
        return 0
    val = result.get("val") or {}
    tail = ", ".join(f"{k} {v:.4f}" for k, v in val.items() if k.startswith("val_")
                     and isinstance(v, float))
    print(f"done: {out}/final  ({tail})")
    return 0
