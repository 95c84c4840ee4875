"""The `llmcore` command.

  llmcore bench [SUITE ...] [--device cpu|cuda] [--quick] [--out DIR] [--no-plot]
  llmcore info
  llmcore generate (--model DIR | --preset NAME --random) --prompt TEXT [--max-new-tokens N]
                   [--temperature T] [--top-k K] [--top-p P] [--seed S]
                   [--quantize mxint8|mxint4] [--kv-cache native|mxint8]
                   [--dtype float32|bfloat16] [--backend llmcore|torch]
                   [--draft DIR|self-mxint8|self-mxint4 | --prompt-lookup]
                   [--num-draft-tokens G] [--schedule heuristic|constant] [--stats]
  llmcore chat --model DIR [same sampling and model options]
"""

from __future__ import annotations

import argparse
import sys


def _cmd_bench(args) -> int:
    import torch

    from llmcore.bench import DEFAULT_OUT, SUITES, run_suites

    if args.list:
        print("\n".join(sorted(SUITES)))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("llmcore bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run_suites(args.suites, device, quick=args.quick,
                   out_dir=None if args.no_save else (args.out or DEFAULT_OUT),
                   plot=not args.no_plot, progress=not args.no_progress)
    except ValueError as e:
        print(f"llmcore bench: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_info(args) -> int:
    import torch

    import llmcore
    from llmcore import _ext

    print(f"llmcore {llmcore.__version__}, torch {torch.__version__}")
    print(f"extension loaded: {_ext.available()}"
          + ("" if _ext.available() else f" ({_ext.LOAD_ERROR})"))
    for dev in ("cpu", "cuda"):
        ops = [op for op in _ext.OPS if _ext.has_kernel(op, torch.device(dev))]
        print(f"{dev} kernels: {', '.join(ops) or 'none'}")
    print(f"cuda available: {torch.cuda.is_available()}")
    return 0


_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _load_model(args):
    """(model, tokenizer or None) from --model DIR or --preset NAME --random."""
    import torch

    from llmcore.models import Transformer, TransformerConfig

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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


def _gen_kwargs(args, eos):
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "seed": args.seed, "cache_storage": args.kv_cache, "eos_token_id": eos}


class _TextStreamer:
    """Prints the decoded text of the new tokens as they arrive (decoding the whole
    completion each time and printing what was added, so multi-token characters come out
    whole)."""

    def __init__(self, tok, eos):
        self.tok, self.eos, self.ids, self.printed = tok, set(eos or []), [], ""

    def __call__(self, new):
        t = int(new[0])
        if t in self.eos:
            return
        self.ids.append(t)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more
            return
        sys.stdout.write(text[len(self.printed):])
        sys.stdout.flush()
        self.printed = text


def _eos_ids(tok):
    if tok is None or tok.eos_token_id is None:
        return None
    return [tok.eos_token_id]


_SELF_DRAFTS = {"self-mxint8": "mxint8", "self-mxint4": "mxint4"}


def _drafter(args, model):
    """The draft for assisted generation: None (plain generation), a model, or
    "prompt_lookup"."""
    draft = getattr(args, "draft", None)
    if draft and args.prompt_lookup:
        raise ValueError("give --draft or --prompt-lookup, not both")
    if args.prompt_lookup:
        return "prompt_lookup"
    if not draft:
        return None
    if draft.startswith("self-"):
        if draft not in _SELF_DRAFTS:
            raise ValueError(f"--draft {draft!r}: self-drafts are {', '.join(_SELF_DRAFTS)}")
        from llmcore.generation import self_draft

        if args.quantize:
            raise ValueError("--draft self-...: the target is already quantised (--quantize); "
                             "self-drafting quantises a copy of a full-precision target")
        return self_draft(model, _SELF_DRAFTS[draft])
    from llmcore.models import Transformer

    return Transformer.from_pretrained(draft, dtype=model.dtype, device=model.device,
                                       backend=args.backend).eval()


def _run_generation(args, model, input_ids, max_new, stream, eos, draft):
    """Plain or assisted generation with the CLI's options; prints the assisted stats to
    stderr with --stats."""
    from llmcore.generation import assisted_generate, generate

    kw = _gen_kwargs(args, eos)
    if draft is None:
        return generate(model, input_ids, max_new, stream=stream, **kw)
    kv = kw.pop("cache_storage")
    draft_kv = "mxint8" if args.draft in _SELF_DRAFTS else kv
    out, st = assisted_generate(model, draft, input_ids, max_new,
                                num_draft_tokens=args.num_draft_tokens, schedule=args.schedule,
                                cache_storage=kv, draft_cache_storage=draft_kv,
                                stream=lambda rows: [stream(t[None]) for t in rows[0]],
                                **kw)
    if args.stats:
        print(f"\n[assisted] {st.summary()}", file=sys.stderr)
    return out


def _cmd_generate(args) -> int:
    import torch

    if not args.model and not (args.preset and args.random):
        print("llmcore generate: give --model DIR (a Hugging Face directory) or --preset NAME "
              "--random", file=sys.stderr)
        return 2
    try:
        model, tok = _load_model(args)
        draft = _drafter(args, model)
        if tok is None:  # random weights: the prompt's UTF-8 bytes as token ids
            ids = [b % model.config.vocab_size for b in args.prompt.encode()] or [0]
        else:
            ids = tok.encode(args.prompt)
        input_ids = torch.tensor([ids], dtype=torch.int64, device=model.device)
        eos = _eos_ids(tok)
        if tok is None:
            stream = lambda new: print(int(new[0]), end=" ", flush=True)  # noqa: E731
        else:
            stream = _TextStreamer(tok, eos)
        _run_generation(args, model, input_ids, args.max_new_tokens, stream, eos, draft)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"llmcore generate: {e}", file=sys.stderr)
        return 2
    print()
    return 0


def _cmd_chat(args) -> int:
    import torch

    try:
        model, tok = _load_model(args)
        draft = _drafter(args, model)
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"{args.model} has no chat template (tokenizer_config.json "
                             "'chat_template'); use `llmcore generate` instead")
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"llmcore chat: {e}", file=sys.stderr)
        return 2
    eos = _eos_ids(tok)
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
            streamer = _TextStreamer(tok, eos)
            _run_generation(args, model, torch.tensor([ids], device=model.device),
                            min(args.max_new_tokens, room), streamer, eos, draft)
        except ValueError as e:
            print(f"llmcore chat: {e}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": streamer.printed})
    return 0


def _add_model_args(g, chat: bool) -> None:
    g.add_argument("--model", required=chat, help="a local Hugging Face model directory")
    if not chat:
        g.add_argument("--preset", help="a TransformerConfig preset (with --random)")
        g.add_argument("--random", action="store_true", help="random weights (no checkpoint; "
                       "prints token ids)")
        g.add_argument("--prompt", default="Hello", help="the prompt text")
    else:
        g.add_argument("--system", help="a system message")
    g.add_argument("--max-new-tokens", type=int, default=128 if not chat else 512)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--quantize", choices=["mxint8", "mxint4"], help="BFP weights")
    g.add_argument("--kv-cache", choices=["native", "mxint8"], default="native")
    g.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    g.add_argument("--backend", choices=["llmcore", "torch"], default="llmcore")
    g.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    a = g.add_argument_group("assisted generation (speculative decoding)")
    a.add_argument("--draft", help="a draft model directory sharing the tokenizer, or "
                   "self-mxint8 / self-mxint4 (the model itself with BFP weights)")
    a.add_argument("--prompt-lookup", action="store_true",
                   help="draft by n-gram lookup in the prompt and the text so far")
    a.add_argument("--num-draft-tokens", type=int, default=5, help="proposals per step (1..15)")
    a.add_argument("--schedule", choices=["heuristic", "constant"], default="heuristic")
    a.add_argument("--stats", action="store_true", help="print acceptance statistics to stderr")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llmcore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("bench", help="run benchmark suites against their baselines")
    b.add_argument("suites", nargs="*", help="suites to run (default: all)")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    b.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    b.add_argument("--out", help="results folder (default: benchmarks/results)")
    b.add_argument("--no-save", action="store_true", help="print only, write no files")
    b.add_argument("--no-plot", action="store_true", help="write no PNG")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs")
    b.add_argument("--list", action="store_true", help="list the suites and exit")
    b.set_defaults(fn=_cmd_bench)

    i = sub.add_parser("info", help="show the build: extension, kernels, devices")
    i.set_defaults(fn=_cmd_info)

    g = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    _add_model_args(g, chat=False)
    g.set_defaults(fn=_cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with a model that has a chat template")
    _add_model_args(c, chat=True)
    c.set_defaults(fn=_cmd_chat)

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
