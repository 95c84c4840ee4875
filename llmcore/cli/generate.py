"""``llmcore generate``: text from a prompt, streamed to stdout as it is generated."""

from __future__ import annotations

import torch

from llmcore.cli._common import CLIError
from llmcore.cli._model import add_model_args, eos_ids, load_model, make_draft, run_generation
from llmcore.generation.streaming import TextStreamer, TokenIdStreamer
from llmcore.tokenizer import ByteTokenizer


def add_parser(subparsers):
    p = subparsers.add_parser("generate", help="generate text from a prompt (streams to stdout)",
                              description=__doc__)
    add_model_args(p, chat=False)
    return p


def run(args) -> int:
    if not args.model and not (args.preset and args.random):
        raise CLIError("give --model DIR (a Hugging Face directory) or --preset NAME --random")
    model, tok = load_model(args)
    draft = make_draft(args, model)
    if tok is None:  # random weights: the prompt's bytes in, token ids out
        ids = ByteTokenizer(model.config.vocab_size).encode(args.prompt)
        stream = TokenIdStreamer()
    else:
        ids = tok.encode(args.prompt)
        stream = TextStreamer(tok, eos_ids(tok))
    input_ids = torch.tensor([ids], dtype=torch.int64, device=model.device)
    run_generation(args, model, input_ids, args.max_new_tokens, stream, eos_ids(tok), draft)
    print()
    return 0
