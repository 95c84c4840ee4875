"""Model options shared by the commands that run a model (generate, chat): loading from
a checkpoint or a random preset, sampling, the KV cache, assisted generation."""

from __future__ import annotations

import math
import sys

import torch

from llmcore.cli._common import (
    CLIError,
    add_device_arg,
    device_from_args,
    float_in,
    int_at_least,
)
from llmcore.generation import assisted_generate, generate
from llmcore.generation.drafters import PROMPT_LOOKUP, SELF_DRAFTS, named_draft
from llmcore.generation.streaming import per_token
from llmcore.models import Transformer, TransformerConfig
from llmcore.models.kv_cache import STORAGES

DTYPES = ("bfloat16", "float16", "float32")


def add_model_args(p, chat: bool) -> None:
    p.add_argument("--model", required=chat, help="a local Hugging Face model directory")
    if not chat:
        p.add_argument("--preset", help="a TransformerConfig preset (with --random)")
        p.add_argument("--random", action="store_true", help="random weights (no checkpoint; "
                       "prints token ids)")
        p.add_argument("--prompt", default="Hello", help="the prompt text")
    else:
        p.add_argument("--system", help="a system message")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=128 if not chat else 512)
    p.add_argument("--temperature", type=float_in(0.0, math.inf, hi_open=True), default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int_at_least(1))
    p.add_argument("--top-p", type=float_in(0.0, 1.0, lo_open=True))
    p.add_argument("--seed", type=int)
    p.add_argument("--quantize", choices=["mxint8", "mxint4"], help="BFP weights")
    p.add_argument("--kv-cache", choices=list(STORAGES), default="native",
                   help="KV cache storage: the model's dtype (native), a float dtype, or "
                        "mxint8")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--backend", choices=["llmcore", "torch"], default="llmcore")
    add_device_arg(p)
    a = p.add_argument_group("assisted generation (speculative decoding)")
    a.add_argument("--draft", help="a draft model directory sharing the tokenizer, or "
                   f"{' / '.join(SELF_DRAFTS)} (the model itself with BFP weights)")
    a.add_argument("--prompt-lookup", action="store_true",
                   help="draft by n-gram lookup in the prompt and the text so far")
    a.add_argument("--num-draft-tokens", type=int_at_least(1), default=5, help="proposals per step (1..15)")
    a.add_argument("--schedule", choices=["heuristic", "constant"], default="heuristic")
    a.add_argument("--stats", action="store_true", help="print acceptance statistics to stderr")


def load_model(args):
    """(model, tokenizer or None) from --model DIR or --preset NAME --random."""
    dtype = getattr(torch, args.dtype)
    device = device_from_args(args)
    if args.model:
        from llmcore.tokenizer import load_tokenizer

        model = Transformer.from_pretrained(args.model, dtype=dtype, device=device,
                                            quantize=args.quantize, backend=args.backend)
        tok = load_tokenizer(args.model)
    else:
        torch.manual_seed(args.seed if args.seed is not None else 0)
        model = Transformer(TransformerConfig.from_name(args.preset), backend=args.backend,
                            device=device, dtype=dtype)
        if args.quantize:
            model.quantize(args.quantize)
        tok = None
    return model.eval(), tok


def eos_ids(tok) -> list[int] | None:
    if tok is None or tok.eos_token_id is None:
        return None
    return [tok.eos_token_id]


def make_draft(args, model):
    """(draft, its KV cache storage) for assisted generation, or (None, None) for plain
    generation."""
    draft = getattr(args, "draft", None)
    if draft and args.prompt_lookup:
        raise CLIError("give --draft or --prompt-lookup, not both")
    if args.prompt_lookup:
        draft = PROMPT_LOOKUP
    if not draft:
        return None, None
    if draft in SELF_DRAFTS and args.quantize:
        raise CLIError("--draft self-...: the target is already quantised (--quantize); "
                       "self-drafting quantises a copy of a full-precision target")
    try:
        return named_draft(draft, model, cache_storage=args.kv_cache)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(f"--draft: {e}") from e


def run_generation(args, model, input_ids, max_new, stream, eos, draft) -> torch.Tensor:
    """Plain or assisted generation with the command's options; with --stats, the
    assisted statistics go to stderr."""
    kw = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
          "seed": args.seed, "cache_storage": args.kv_cache, "eos_token_id": eos}
    draft, draft_kv = draft
    if draft is None:
        return generate(model, input_ids, max_new, stream=stream, **kw)
    out, st = assisted_generate(model, draft, input_ids, max_new,
                                num_draft_tokens=args.num_draft_tokens, schedule=args.schedule,
                                draft_cache_storage=draft_kv, stream=per_token(stream), **kw)
    if args.stats:
        print(f"\n[assisted] {st.summary()}", file=sys.stderr)
    return out
