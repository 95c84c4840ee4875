"""Spending more samples at inference: best-of-N reranking and self-correction.

* :func:`best_of_n` samples ``n`` answers to a prompt and returns them ranked by a judge
  (anything with ``score_many(prompts, answers)``: a reward model, the code checks, an
  LLM grader — :mod:`llmcore.evaluation.judges`).
* :func:`self_correct` drafts an answer, asks a critic for a score (and, when the critic
  has ``feedback(prompt, answer) -> str``, for words), and puts the draft and the feedback
  back into the prompt for a revision, ``rounds`` times. The final answer is the best
  scored of the drafts, so a revision that scores worse never replaces a better one.

Prompts are rendered with the tokenizer's chat template when it has one (as the
post-training recipes render them), else used as plain text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

REVISION_PROMPT = ("{prompt}\n\nA previous answer was:\n{answer}\n\nFeedback on it: "
                   "{feedback}\n\nWrite an improved answer.")


def _answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, temperature: float,
             top_k: int | None, seed: int | None) -> list[str]:
    from llmcore.data.examples import Renderer
    from llmcore.generation.generate import generate

    r = Renderer(tokenizer, model.config.max_seq_len)
    ids = [r.prompt_ids(p) for p in prompts]
    room = model.config.max_seq_len - max_new_tokens
    if any(len(x) > room for x in ids):
        raise ValueError(f"a prompt is longer than max_seq_len - max_new_tokens = {room} tokens")
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = torch.full((len(ids), width), pad, dtype=torch.int64)
    mask = torch.zeros_like(batch)
    for i, x in enumerate(ids):  # left padding
        batch[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    out = generate(model, batch.to(model.device), max_new_tokens, temperature=temperature,
                   top_k=top_k, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                   attention_mask=mask.to(model.device), seed=seed)
    eos = tokenizer.eos_token_id
    texts = []
    for row in out[:, width:].tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        texts.append(tokenizer.decode(row))
    return texts


@torch.no_grad()
def best_of_n(model, tokenizer, prompt: str, n: int, judge, max_new_tokens: int = 128,
              temperature: float = 0.8, top_k: int | None = None, seed: int | None = None
              ) -> dict:
    """``n`` sampled answers to ``prompt``, scored by ``judge``: {"best", "best_score",
    "answers", "scores"} with the answers sorted best first."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if temperature <= 0 and n > 1:
        raise ValueError("best_of_n needs sampling (temperature > 0) for n > 1")
    answers = _answers(model, tokenizer, [prompt] * n, max_new_tokens, temperature, top_k, seed)
    scores = [float(s) for s in judge.score_many([prompt] * n, answers)]
    order = sorted(range(n), key=lambda i: -scores[i])
    return {"best": answers[order[0]], "best_score": scores[order[0]],
            "answers": [answers[i] for i in order], "scores": [scores[i] for i in order]}


@torch.no_grad()
def self_correct(model, tokenizer, prompt: str, critic, rounds: int = 1,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
                 seed: int | None = None, template: str = REVISION_PROMPT) -> dict:
    """Draft, critique, revise ``rounds`` times: {"final", "final_score", "drafts",
    "scores", "feedback"} (``drafts[0]`` the first answer; ``final`` the best scored)."""
    if not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
    drafts, scores, notes = [], [], []
    current = prompt
    for k in range(rounds + 1):
        answer = _answers(model, tokenizer, [current], max_new_tokens, temperature, top_k,
                          None if seed is None else seed + k)[0]
        score = float(critic.score_many([prompt], [answer])[0])
        words = critic.feedback(prompt, answer) if hasattr(critic, "feedback") else \
            f"it scored {score:.3f}; make it better."
        drafts.append(answer)
        scores.append(score)
        notes.append(words)
        current = template.format(prompt=prompt, answer=answer, feedback=words)
    best = max(range(len(drafts)), key=lambda i: scores[i])
    return {"final": drafts[best], "final_score": scores[best], "drafts": drafts,
            "scores": scores, "feedback": notes}


__all__ = ["REVISION_PROMPT", "best_of_n", "self_correct"]
