"""The ``llmcore`` command: one module per subcommand.

  llmcore info                  the build: extension, kernels, devices
  llmcore demo [--quick]        the library end to end on the stdlib (no download)
  llmcore bench [SUITE ...]     benchmark suites against their baselines
  llmcore generate ...          text from a prompt, streamed
  llmcore chat --model DIR      interactive chat
  llmcore tokenizer train ...   a byte-level BPE tokenizer from a corpus
  llmcore data prepare ...      token shards from text/JSONL/Parquet or the stdlib
  llmcore data sft-stdlib ...   instruction set from the stdlib's functions (JSONL)
  llmcore data preferences-stdlib ...  preference pairs (real vs corrupted function)
  llmcore data mc-stdlib ...    multiple-choice set: the real next line of held-out files
  llmcore data clean ...        extract, filter, deduplicate, redact (JSONL + report)
  llmcore data quality-train ...  the hashed n-gram quality classifier
  llmcore train RECIPE ...      training runs (pretrain, sft, reward, dpo, ppo) into a run folder
  llmcore eval perplexity ...   held-out loss, perplexity, bits per byte (and xz's)
  llmcore eval multiple-choice  accuracy by log-likelihood (acc, acc_norm, per subject)
  llmcore eval win-rate ...     pairwise win rate of two models (both orders, CI, LC)
  llmcore eval contamination    n-gram overlap of an evaluation set with training data
  llmcore scaling fit|sweep|plan  scaling laws: Chinchilla fit, our sweep, compute plan
  llmcore plot RUN_DIR          PNG curves of a run

Run ``llmcore COMMAND --help`` for a command's options.

A command is a module ``llmcore/cli/<name>.py`` with ``add_parser(subparsers)`` (adds
and returns its argparse sub-parser) and ``run(args) -> int`` (the exit status), listed
in ``COMMANDS``. Modules whose names start with ``_`` hold shared pieces. User errors
(:class:`CLIError`, ``ValueError``, ``OSError`` (``FileNotFoundError`` among them),
``ImportError``, and a bad command line) print one line and exit with status 2; set
``LLMCORE_TRACEBACK=1`` to see the traceback instead. Anything else is a bug: its
traceback is printed with a request to report it, and the status is 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from llmcore.cli._common import CLIError

# In the order `llmcore --help` lists them.
COMMANDS = ("info", "demo", "bench", "generate", "chat", "tokenizer", "data", "train", "eval",
            "scaling", "plot")

USER_ERRORS = (CLIError, ValueError, OSError, ImportError)
BUG_HINT = ("llmcore: this is a bug in llmcore, not in your input; please report it with "
            "the command line and the traceback above")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``llmcore bench: error: argument --threads: must
    be >= 1, got -1 (see --help)``, status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

__all__ = ["COMMANDS", "CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="llmcore", description="BFP GEMM, fused attention and KV-cached decoding "
        "kernels: benchmarks, text generation and training.",
        epilog="Run `llmcore COMMAND --help` for a command's options. Errors in the input "
        "print one line; LLMCORE_TRACEBACK=1 prints the traceback instead.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"llmcore.cli.{name}")
        module.add_parser(sub).set_defaults(run=module.run)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as e:
        if os.environ.get("LLMCORE_TRACEBACK"):
            raise
        print(f"llmcore {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception:
        if os.environ.get("LLMCORE_TRACEBACK"):
            raise
        traceback.print_exc()
        print(BUG_HINT, file=sys.stderr)
        return 1
