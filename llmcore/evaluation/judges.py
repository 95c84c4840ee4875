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

import torch


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


class CodeJudge(Judge):
    """Verifiable checks, no model: ``parse_weight`` × (the answer parses) +
    ``doctest_weight`` × (share of the prompt's doctest examples that pass; 0 without
    examples). See :mod:`llmcore.evaluation.verify`."""

    name = "code"

    def __init__(self, parse_weight: float = 1.0, doctest_weight: float = 1.0,
                 run_doctests: bool = True, timeout: float = 5.0):
        self.parse_weight, self.doctest_weight = float(parse_weight), float(doctest_weight)
        self.run_doctests, self.timeout = run_doctests, timeout

    def score(self, prompt: str, response: str) -> float:
        from llmcore.evaluation.verify import check_code

        c = check_code(prompt, response, self.run_doctests and self.doctest_weight != 0,
                       self.timeout)
        return self.parse_weight * c.parses + self.doctest_weight * (c.doctest_rate or 0.0)

    def feedback(self, prompt: str, response: str) -> str:
        """Words for a revision round (:func:`llmcore.generation.self_correct`)."""
        import ast
        import warnings

        from llmcore.evaluation.verify import assemble, check_code

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ast.parse(assemble(prompt, response)[0])
        except SyntaxError as e:
            return f"it is not valid Python: {e.msg} on line {e.lineno}."
        c = check_code(prompt, response, self.run_doctests, self.timeout)
        if c.doctests and c.passed < c.doctests:
            return f"it parses, but {c.doctests - c.passed} of {c.doctests} doctests fail."
        return "it parses" + (" and passes its doctests." if c.doctests else ".")


class RewardModelJudge(Judge):
    """A reward model's score of the conversation [user: prompt, assistant: response],
    rendered with the tokenizer's chat template as in training."""

    name = "reward-model"

    def __init__(self, model, tokenizer, max_len: int | None = None, batch_size: int = 16):
        from llmcore.data.examples import Renderer

        self.model = model.eval()
        self.renderer = Renderer(tokenizer, max_len or model.config.max_seq_len)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, path: str, device=None, **kw) -> RewardModelJudge:
        from llmcore.models import RewardModel
        from llmcore.tokenizer import load_tokenizer

        return cls(RewardModel.from_pretrained(path, device=device), load_tokenizer(path), **kw)

    def _encode(self, prompt: str, response: str):
        """The conversation's ids cut to ``max_len``: from the right as in training, or,
        when the prompt alone fills ``max_len``, from the left, so the scored last token
        still follows the response."""
        from llmcore.data.examples import BadRowError, Encoded, Renderer

        conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        try:
            return self.renderer.encode(conv, "judge")
        except BadRowError:
            e = Renderer(self.renderer.tok, 1 << 62).encode(conv, "judge")
            n = self.renderer.max_len
            return Encoded(e.ids[-n:], e.mask[-n:], True)

    @torch.no_grad()
    def score_many(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        from llmcore.training.batching import packed_batch

        if len(prompts) != len(responses):
            raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) "
                             "must have the same length")
        seqs = [self._encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        out: list[float] = []
        dev = next(self.model.parameters()).device
        for i in range(0, len(seqs), self.batch_size):
            b = packed_batch(seqs[i:i + self.batch_size])
            out += self.model(b["input_ids"].to(dev),
                              cu_seqlens=b["cu_seqlens"].to(dev)).float().cpu().tolist()
        return out


# AlpaGasus (Chen et al., 2023): the grading prompt, asking for a 0-5 accuracy score.
ALPAGASUS_PROMPT = (
    "We would like to request your feedback on the performance of AI assistant in response "
    "to the instruction and the given input displayed following.\n\n"
    "Instruction: {prompt}\nResponse: {response}\n\n"
    "Please rate according to the accuracy of the response to the instruction and the input. "
    "Each assistant receives a score on a scale of 0 to 5, where a higher score indicates "
    "higher level of the accuracy. Please first output a single line containing the value "
    "indicating the scores.\nScore: ")


class LLMJudge(Judge):
    """Any llmcore language model as a grader: the AlpaGasus grading prompt, and the grade
    read from the next-token probabilities of the grade tokens "0" … "5" (renormalised
    over those six): the expected grade Σ g·p(g). Nothing is parsed from free text, so
    every answer gets a score, and close calls keep their uncertainty."""

    name = "llm"

    def __init__(self, model, tokenizer, template: str = ALPAGASUS_PROMPT,
                 grades: Sequence[str] = ("0", "1", "2", "3", "4", "5"), batch_size: int = 8):
        self.model, self.tok, self.template = model.eval(), tokenizer, template
        ids = [tokenizer.encode(g, add_special_tokens=False) for g in grades]
        bad = [g for g, i in zip(grades, ids, strict=True) if len(i) != 1]
        if bad:
            raise ValueError(f"grade tokens must each be one token of the tokenizer; "
                             f"{bad} are not")
        self.grade_ids = torch.tensor([i[0] for i in ids])
        self.values = torch.tensor([float(g) for g in grades])
        self.batch_size = batch_size

    def prompt_ids(self, prompt: str, response: str) -> list[int]:
        text = self.template.format(prompt=prompt, response=response)
        ids = self.tok.encode(text, add_special_tokens=False)
        room = self.model.config.max_seq_len
        return ids[-room:]  # keep the end: the question about the grade

    @torch.no_grad()
    def grade_probs(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """[n, len(grades)] probabilities of each grade (renormalised)."""
        from llmcore.data.examples import Encoded
        from llmcore.training.batching import packed_batch

        seqs = [self.prompt_ids(p, r) for p, r in zip(prompts, responses, strict=True)]
        out = []
        dev = next(self.model.parameters()).device
        for i in range(0, len(seqs), self.batch_size):
            part = [Encoded(s, [0] * len(s)) for s in seqs[i:i + self.batch_size]]
            b = packed_batch(part)
            cu = b["cu_seqlens"].to(dev)
            logits = self.model(b["input_ids"].to(dev), cu_seqlens=cu)[0]
            last = logits[cu[1:].long() - 1].float()  # [n, vocab]: the next token's logits
            out.append(torch.softmax(last[:, self.grade_ids.to(dev)], -1).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.values))

    def score_many(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) "
                             "must have the same length")
        return (self.grade_probs(prompts, responses) @ self.values).tolist()


def make_judge(spec: str, device=None) -> Judge:
    """A judge from a command-line spec: ``code`` (parse + doctests), ``rm:DIR`` (a reward
    model directory) or ``llm:DIR`` (a language model directory, AlpaGasus grading)."""
    kind, _, path = spec.partition(":")
    if kind == "code" and not path:
        return CodeJudge()
    if kind in ("rm", "llm") and path:
        from llmcore.tokenizer import load_tokenizer

        if kind == "rm":
            return RewardModelJudge.from_pretrained(path, device=device)
        from llmcore.models import Transformer

        return LLMJudge(Transformer.from_pretrained(path, device=device), load_tokenizer(path))
    raise ValueError(f"judge {spec!r}: expected 'code', 'rm:DIR' or 'llm:DIR'")


__all__ = ["ALPAGASUS_PROMPT", "CodeJudge", "Judge", "JudgeLike", "LLMJudge",
           "RewardModelJudge", "make_judge"]
