"""``llmcore chat``: an interactive chat with a model that has a chat template. Reads one
message a line from stdin (``/exit`` or end of input ends it)."""

from __future__ import annotations

import sys

import torch

from llmcore.cli._common import CLIError
from llmcore.cli._model import add_model_args, eos_ids, load_model, make_draft, run_generation
from llmcore.generation.streaming import TextStreamer


def add_parser(subparsers):
    p = subparsers.add_parser("chat", help="interactive chat with a model that has a chat "
                              "template", description=__doc__)
    add_model_args(p, chat=True)
    return p


def run(args) -> int:
    model, tok = load_model(args)
    draft = make_draft(args, model)
    if not getattr(tok, "chat_template", None):
        raise CLIError(f"{args.model} has no chat template (tokenizer_config.json "
                       "'chat_template'); use `llmcore generate` instead")
    eos = eos_ids(tok)
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
            ids = tok.encode(text, add_special_tokens=False)
            room = model.config.max_seq_len - len(ids)
            if room < 1:
                raise ValueError("the conversation is longer than the model's max_seq_len")
            streamer = TextStreamer(tok, eos)
            run_generation(args, model, torch.tensor([ids], device=model.device),
                           min(args.max_new_tokens, room), streamer, eos, draft)
        except ValueError as e:  # this message fails; the conversation goes on
            print(f"llmcore chat: {e}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": streamer.printed})
    return 0
