"""Evaluation: perplexity and bits per byte on held-out data, compressor baselines,
multiple-choice accuracy, pairwise win rate and the n-gram contamination check."""

from llmcore.evaluation.contamination import check_contamination
from llmcore.evaluation.multiple_choice import (
    MCItem,
    evaluate_multiple_choice,
    loglikelihoods,
    read_items,
)
from llmcore.evaluation.perplexity import evaluate_split, xz_bits_per_byte
from llmcore.evaluation.win_rate import (
    LogprobPairwiseJudge,
    PairwiseJudge,
    PointwisePairwise,
    win_rate,
)

__all__ = ["LogprobPairwiseJudge", "MCItem", "PairwiseJudge", "PointwisePairwise",
           "check_contamination", "evaluate_multiple_choice", "evaluate_split",
           "loglikelihoods", "read_items", "win_rate", "xz_bits_per_byte"]
