"""Evaluation: perplexity and bits per byte on held-out data, and compressor baselines."""

from llmcore.evaluation.perplexity import evaluate_split, xz_bits_per_byte

__all__ = ["evaluate_split", "xz_bits_per_byte"]
