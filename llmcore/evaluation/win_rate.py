"""Pairwise win rate of model A against model B on the same prompts.

A pairwise judge answers ``compare_many(prompts, firsts, seconds)`` with P(first answer is
better) in [0, 1] per prompt (0.5: a tie). Every pair is judged in both orders and the two
verdicts averaged, ``pref = (p(A, B) + 1 - p(B, A)) / 2``, so a judge that favours
whichever answer it reads first gains nothing: its bias cancels, and a pair it decides by
position alone counts as a tie (½). The win rate is the mean of ``pref``; with both orders,
win_rate(A, B) = 1 − win_rate(B, A) exactly.

The 95% interval is a percentile bootstrap over prompts. The **length-controlled** win
rate follows AlpacaEval 2: a logistic model of the preference,
``pref ≈ σ(θ + φ · tanh(Δlen / sd(Δlen)))`` with Δlen = len(A) − len(B) in characters,
fitted by maximum likelihood with the preferences as soft labels; the reported figure is
σ(θ), the win rate the fit predicts at equal length. Without any length difference it is
the raw win rate.

Judges: :class:`PointwisePairwise` turns any pointwise judge
(:mod:`llmcore.evaluation.judges`) into a pairwise one by comparing scores;
:class:`LogprobPairwiseJudge` asks an llmcore model which answer is better and reads the
log-probabilities of the two labels, never its free text.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from llmcore.data.jsonl import iter_jsonl
from llmcore.evaluation.judges import JudgeLike
from llmcore.evaluation.multiple_choice import loglikelihoods


class PairwiseJudge:
    """Base class: subclasses define :meth:`compare_many`."""

    name = "pairwise"

    def compare(self, prompt: str, first: str, second: str) -> float:
        return self.compare_many([prompt], [first], [second])[0]

    def compare_many(self, prompts: Sequence[str], firsts: Sequence[str],
                     seconds: Sequence[str]) -> list[float]:
        raise NotImplementedError


class PointwisePairwise(PairwiseJudge):
    """Pairwise from a pointwise judge: 1 when the first answer scores higher by more than
    ``margin``, 0 when lower by more than ``margin``, ½ otherwise. Scores are cached by
    (prompt, answer), so the swapped order costs no second scoring."""

    def __init__(self, judge: JudgeLike, margin: float = 0.0):
        if not isinstance(judge, JudgeLike):
            raise ValueError(f"judge must have score and score_many, got {type(judge).__name__}")
        if not margin >= 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.judge, self.margin = judge, margin
        self.name = f"pointwise:{getattr(judge, 'name', type(judge).__name__)}"
        self._cache: dict[tuple[str, str], float] = {}

    def compare_many(self, prompts, firsts, seconds):
        _check_lengths(prompts, firsts, seconds)
        todo = sorted({(p, r) for p, a, b in zip(prompts, firsts, seconds, strict=True)
                       for r in (a, b)} - self._cache.keys())
        if todo:
            scores = self.judge.score_many([p for p, _ in todo], [r for _, r in todo])
            self._cache.update(zip(todo, map(float, scores), strict=True))
        out = []
        for p, a, b in zip(prompts, firsts, seconds, strict=True):
            d = self._cache[(p, a)] - self._cache[(p, b)]
            out.append(1.0 if d > self.margin else 0.0 if d < -self.margin else 0.5)
        return out


JUDGE_TEMPLATE = (
    "Compare two responses to the instruction below and say which one is better: more "
    "helpful, correct and relevant.\n\n"
    "### Instruction:\n{prompt}\n\n### Response A:\n{first}\n\n### Response B:\n{second}\n\n"
    "### Better response (A or B):")


class LogprobPairwiseJudge(PairwiseJudge):
    """An llmcore model as the judge: the filled ``template`` is scored with the
    continuations `` A`` and `` B``; P(first) = softmax over the two log-likelihoods (with
    ``hard=True``: 1, 0, or ½ on an exact tie). ``template`` has the fields ``{prompt}``,
    ``{first}``, ``{second}``; a chat model can be given a tokenizer with a chat template,
    which then wraps the filled text as a user message."""

    def __init__(self, model, tokenizer, template: str = JUDGE_TEMPLATE, labels=(" A", " B"),
                 hard: bool = False, chat: bool | None = None, max_tokens: int = 4096):
        for f in ("{prompt}", "{first}", "{second}"):
            if f not in template:
                raise ValueError(f"the judge template has no {f} field")
        if len(labels) != 2 or labels[0] == labels[1] or not all(labels):
            raise ValueError(f"labels must be two different non-empty strings, got {labels!r}")
        self.model, self.tok, self.template = model, tokenizer, template
        self.labels, self.hard, self.max_tokens = tuple(labels), hard, max_tokens
        self.chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        self.name = "llm-logprob"

    def _render(self, prompt: str, first: str, second: str) -> str:
        text = self.template.format(prompt=prompt, first=first, second=second)
        if self.chat:
            return self.tok.apply_chat_template([{"role": "user", "content": text}])
        return text

    def compare_many(self, prompts, firsts, seconds):
        _check_lengths(prompts, firsts, seconds)
        reqs = []
        for p, a, b in zip(prompts, firsts, seconds, strict=True):
            ctx = self._render(p, a, b)
            reqs += [(ctx, self.labels[0]), (ctx, self.labels[1])]
        ll = loglikelihoods(self.model, self.tok, reqs, self.max_tokens)
        out = []
        for i in range(0, len(ll), 2):
            la, lb = ll[i][0], ll[i + 1][0]
            if self.hard:
                out.append(1.0 if la > lb else 0.0 if la < lb else 0.5)
            else:
                out.append(1.0 / (1.0 + math.exp(max(min(lb - la, 700.0), -700.0))))
        return out


def _check_lengths(*seqs) -> None:
    n = {len(s) for s in seqs}
    if len(n) != 1:
        raise ValueError(f"prompts and answers must have the same length, got "
                         f"{[len(s) for s in seqs]}")


# ----------------------------------------------------------------------------- statistics

def bootstrap_ci(values: torch.Tensor, resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` [n]."""
    n = values.numel()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (resamples, n), generator=g)
    means = values.double()[idx].mean(1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return lo, hi


def _logistic_fit(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-6,
                  iters: int = 50) -> torch.Tensor:
    """Newton's method for soft-label logistic regression, batched: x [B, n, k], y [B, n]
    -> coefficients [B, k]. A small ridge keeps separable data (all wins) finite."""
    b, n, k = x.shape
    w = torch.zeros(b, k, dtype=torch.float64)
    eye = torch.eye(k, dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(torch.einsum("bnk,bk->bn", x, w))
        grad = torch.einsum("bnk,bn->bk", x, y - p) / n - ridge * w
        hess = torch.einsum("bnk,bn,bnj->bkj", x, p * (1 - p), x) / n + ridge * eye
        step = torch.linalg.solve(hess, grad)
        w = w + step
        if float(step.abs().max()) < 1e-10:
            break
    return w


def length_controlled(pref: torch.Tensor, len_a: torch.Tensor, len_b: torch.Tensor,
                      resamples: int = 0, seed: int = 0) -> dict:
    """AlpacaEval-2-style length control: fit pref ≈ σ(θ + φ·tanh(Δ / sd(Δ))) and return
    {"win_rate": σ(θ), "theta", "phi"} (and a bootstrap "ci" with ``resamples``)."""
    d = (len_a - len_b).double()
    sd = float(d.std()) if d.numel() > 1 else 0.0
    feat = torch.tanh(d / sd) if sd > 0 else torch.zeros_like(d)
    x = torch.stack([torch.ones_like(feat), feat], -1)
    y = pref.double()
    theta, phi = _logistic_fit(x[None], y[None])[0].tolist()
    out = {"win_rate": 1.0 / (1.0 + math.exp(-theta)), "theta": theta, "phi": phi}
    if resamples:
        g = torch.Generator().manual_seed(seed + 1)
        idx = torch.randint(y.numel(), (resamples, y.numel()), generator=g)
        w = _logistic_fit(x[idx], y[idx])
        q = torch.tensor([0.025, 0.975], dtype=torch.float64)
        out["ci"] = torch.quantile(torch.sigmoid(w[:, 0]), q).tolist()
    return out


def win_rate(prompts: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str],
             judge: PairwiseJudge, swap: bool = True, resamples: int = 2000,
             seed: int = 0) -> dict:
    """Win rate of A over B judged by ``judge`` (both orders unless ``swap=False``).

    Returns win_rate, ci (95% bootstrap), wins / ties / losses (pref above, at, below ½),
    lc_win_rate and lc_ci (length-controlled), lc_phi (the length coefficient), the judge's
    first_position_rate (mean P(first) over both orders; ½ for a judge without position
    bias), consistency (share of pairs where both orders picked the same winner) and
    ``pref`` (per prompt)."""
    _check_lengths(prompts, answers_a, answers_b)
    if not prompts:
        raise ValueError("no prompts to judge")
    if resamples < 0:
        raise ValueError(f"resamples must be >= 0, got {resamples}")
    p_ab = torch.tensor(judge.compare_many(prompts, answers_a, answers_b), dtype=torch.float64)
    if swap:
        p_ba = torch.tensor(judge.compare_many(prompts, answers_b, answers_a),
                            dtype=torch.float64)
        pref = (p_ab + 1 - p_ba) / 2
    else:
        p_ba, pref = None, p_ab
    for p in (p_ab, p_ba):
        if p is not None and not bool(((p >= 0) & (p <= 1)).all()):
            raise ValueError("the judge returned preferences outside [0, 1] (or NaN)")
    tie = (pref - 0.5).abs() <= 1e-9  # (p + 1 - p) / 2 is not always exactly 0.5
    len_a = torch.tensor([len(a) for a in answers_a], dtype=torch.float64)
    len_b = torch.tensor([len(b) for b in answers_b], dtype=torch.float64)
    lc = length_controlled(pref, len_a, len_b, resamples, seed)
    out = {"judge": getattr(judge, "name", type(judge).__name__), "n": len(prompts),
           "swap": swap, "win_rate": float(pref.mean()),
           "ci": list(bootstrap_ci(pref, resamples, seed)) if resamples else None,
           "wins": int(((pref > 0.5) & ~tie).sum()), "ties": int(tie.sum()),
           "losses": int(((pref < 0.5) & ~tie).sum()),
           "lc_win_rate": lc["win_rate"], "lc_ci": lc.get("ci"), "lc_phi": lc["phi"],
           "mean_len_a": float(len_a.mean()), "mean_len_b": float(len_b.mean())}
    if p_ba is not None:
        out["first_position_rate"] = float((p_ab.mean() + p_ba.mean()) / 2)
        out["consistency"] = float((((p_ab > 0.5) & (p_ba < 0.5)) |
                                    ((p_ab < 0.5) & (p_ba > 0.5))).double().mean())
    out["pref"] = pref.tolist()
    return out


def format_table(result: dict, name_a: str = "A", name_b: str = "B") -> str:
    """The figures of :func:`win_rate` as a few aligned lines."""
    def ci(c):
        return f"[{c[0]:.3f}, {c[1]:.3f}]" if c else ""
    r = result
    rows = [("pairs", f"{r['n']}" + (" (both orders)" if r["swap"] else "")),
            ("wins / ties / losses", f"{r['wins']} / {r['ties']} / {r['losses']}"),
            ("win rate", f"{r['win_rate']:.3f} {ci(r['ci'])}"),
            ("length-controlled", f"{r['lc_win_rate']:.3f} {ci(r['lc_ci'])}"),
            ("mean length (chars)", f"{r['mean_len_a']:.0f} vs {r['mean_len_b']:.0f}")]
    if "first_position_rate" in r:
        rows += [("judge picks first", f"{r['first_position_rate']:.3f}"),
                 ("order-consistent", f"{r['consistency']:.3f}")]
    width = max(len(k) for k, _ in rows)
    head = f"{name_a} vs {name_b}, judge {r['judge']}"
    return "\n".join([head] + [f"  {k:{width}}  {v}" for k, v in rows])


# ----------------------------------------------------------------------------- answers

PROMPT_KEYS = ("prompt", "instruction", "question")
ANSWER_KEYS = ("response", "output", "answer", "completion")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from JSONL (the first of the fields ``prompt``, ``instruction``,
    ``question``) or a text file (one prompt per non-blank line)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        prompts = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    else:
        prompts = [p for p, _ in _rows(path, need_answer=False)]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def read_answers(path: str | os.PathLike) -> dict[str, str]:
    """{prompt: answer} from JSONL rows with a prompt field (as :func:`read_prompts`) and
    an answer field (``response``, ``output``, ``answer`` or ``completion``)."""
    return dict(_rows(Path(path), need_answer=True))


def _rows(path: Path, need_answer: bool):
    for i, row in iter_jsonl(path):
        p = next((row[k] for k in PROMPT_KEYS if isinstance(row.get(k), str)), None)
        if p is None:
            raise ValueError(f"{path}:{i}: no prompt field (one of {PROMPT_KEYS})")
        a = next((row[k] for k in ANSWER_KEYS if isinstance(row.get(k), str)), None)
        if need_answer and a is None:
            raise ValueError(f"{path}:{i}: no answer field (one of {ANSWER_KEYS})")
        yield p, a


@torch.no_grad()
def generate_answers(model, tok, prompts: Sequence[str], max_new_tokens: int = 256,
                     batch_size: int = 8, chat: bool | None = None, **sampling) -> list[str]:
    """Each prompt's answer from ``model`` (greedy unless ``sampling`` says otherwise),
    batched with left padding; a chat template wraps the prompt as a user turn when the
    tokenizer has one (``chat=None``) or when asked."""
    from llmcore.generation import generate

    chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
    eos = getattr(tok, "eos_token_id", None)
    device = next(model.parameters()).device
    limit = model.config.max_seq_len - max_new_tokens
    if limit < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in "
                         f"max_seq_len {model.config.max_seq_len}")
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = []
        for p in prompts[i:i + batch_size]:
            text = tok.apply_chat_template([{"role": "user", "content": p}]) if chat else p
            enc.append(tok.encode(text)[-limit:] or [eos or 0])
        width = max(map(len, enc))
        ids = torch.zeros(len(enc), width, dtype=torch.int64)
        mask = torch.zeros(len(enc), width, dtype=torch.int64)
        for r, e in enumerate(enc):
            ids[r, width - len(e):] = torch.tensor(e)
            mask[r, width - len(e):] = 1
        new = generate(model, ids.to(device), max_new_tokens, eos_token_id=eos,
                       attention_mask=mask.to(device), **sampling)[:, width:]
        for row in new.tolist():
            if eos is not None and eos in row:
                row = row[:row.index(eos)]
            out.append(tok.decode(row))
    return out


__all__ = ["JUDGE_TEMPLATE", "LogprobPairwiseJudge", "PairwiseJudge", "PointwisePairwise",
           "bootstrap_ci", "format_table", "generate_answers", "length_controlled",
           "read_answers", "read_prompts", "win_rate"]
