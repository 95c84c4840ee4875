"""Judges: something that scores a response to a prompt.

A judge is any object with ``score(prompt, response) -> float`` (higher is better) and
``score_many(prompts, responses) -> list[float]`` (:class:`Judge` gives the loop; a model
judge batches). Implementations live here (a reward model, an LLM grading with the
log-probabilities of grade tokens, verifiable code checks); the evaluation commands
(win rate, data filtering, best-of-N) take any of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class JudgeLike(Protocol):
    def score(self, prompt: str, response: str) -> float: ...

    def score_many(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


class Judge:
    """Base class: subclasses define :meth:`score` (or :meth:`score_many`)."""

    name = "judge"

    def score(self, prompt: str, response: str) -> float:
        return self.score_many([prompt], [response])[0]

    def score_many(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) "
                             "must have the same length")
        if type(self).score is Judge.score:
            raise NotImplementedError(f"{type(self).__name__} defines neither score nor "
                                      "score_many")
        return [float(self.score(p, r)) for p, r in zip(prompts, responses, strict=True)]


__all__ = ["Judge", "JudgeLike"]
