"""Multiple-choice evaluation by log-likelihood (the lm-evaluation-harness way), and a
multiple-choice set built from held-out standard-library files.

An item is a question, two or more choices and the index of the right one. Each choice is
scored as a continuation of the prompt: the sum of its tokens' log-probabilities given the
prompt (and any few-shot examples before it). ``acc`` counts the items whose right choice
has the highest sum; ``acc_norm`` divides each sum by the choice's length in characters
first (the harness's ``acc_norm``), so long choices are not penalised for having more
tokens. All (prompt, choice) sequences are scored in packed batches: several sequences
share one forward pass through ``model(ids[1, total], cu_seqlens=cu)``, each attending only
to itself.

Input rows (JSONL): ``question``, ``choices`` (a list of strings) and ``answer`` (the
index, or a letter ``"A"``, ``"B"``, ... as in MMLU's files), with an optional ``subject``;
MMLU's CSV-style rows with the choices in fields ``A``, ``B``, ``C``, ``D`` are accepted
too. Prompt templates:

- ``"cloze"``: ``Question: {question}\\nAnswer:`` and the continuation `` {choice}``;
- ``"letters"``: MMLU's own format, the choices listed as ``A. ...`` and the continuation
  the letter (`` A``); acc_norm then equals acc in all but ties;
- ``"plain"``: the question text as is, the choice appended as is (for the stdlib set,
  whose question is code and whose choices are its possible next lines).

Few-shot examples come from a dev split: the first ``shots`` dev items of the same subject
(the harness's ``first_n`` sampler), topped up from the other subjects in file order, each
rendered with its right answer and separated by a blank line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmcore.data.jsonl import iter_jsonl
from llmcore.training.losses import packed_sequence_logprobs

TEMPLATES = ("cloze", "letters", "plain")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question; ``answer`` indexes ``choices``."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = "all"
    source: str = ""


# ----------------------------------------------------------------------------- reading

def item_from_row(row: dict, where: str = "row") -> MCItem:
    """An :class:`MCItem` from one JSON object (see the module docstring for the fields);
    a ValueError naming ``where`` and the field for anything else."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    q = row.get("question")
    if not isinstance(q, str) or not q.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string")
    choices = row.get("choices")
    if choices is None and all(k in row for k in "ABCD"):
        choices = [row[k] for k in LETTERS if k in row]
    if not isinstance(choices, list) or len(choices) < 2 or not all(
            isinstance(c, str) and c for c in choices):
        raise ValueError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
    if len(choices) > len(LETTERS):
        raise ValueError(f"{where}: at most {len(LETTERS)} choices, got {len(choices)}")
    ans = row.get("answer")
    if isinstance(ans, str) and len(ans.strip()) == 1 and ans.strip().upper() in LETTERS:
        ans = LETTERS.index(ans.strip().upper())
    elif isinstance(ans, str) and ans.strip().isdigit():
        ans = int(ans)
    if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
        raise ValueError(f"{where}: 'answer' must be a choice index 0..{len(choices) - 1} or a "
                         f"letter A..{LETTERS[len(choices) - 1]}, got {row.get('answer')!r}")
    subject = row.get("subject", "all")
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"{where}: 'subject' must be a non-empty string")
    return MCItem(q, tuple(choices), ans, subject, str(row.get("source", where)))


def read_items(path: str | os.PathLike) -> list[MCItem]:
    """The items of a JSONL file (blank lines skipped)."""
    path = Path(path)
    items = []
    for i, row in iter_jsonl(path, objects=False):
        items.append(item_from_row(row, f"{path}:{i}"))
    if not items:
        raise ValueError(f"{path}: no items")
    return items


# ----------------------------------------------------------------------------- prompts

def _header(subject: str, template: str) -> str:
    if template != "letters" or subject == "all":
        return ""
    return (f"The following are multiple choice questions (with answers) about "
            f"{subject.replace('_', ' ')}.\n\n")


def _question(item: MCItem, template: str) -> str:
    if template == "plain":
        return item.question
    if template == "cloze":
        return f"Question: {item.question}\nAnswer:"
    lines = [item.question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices)]
    return "\n".join(lines) + "\nAnswer:"


def continuations(item: MCItem, template: str) -> list[str]:
    """What is scored after the prompt, one per choice."""
    if template == "plain":
        return list(item.choices)
    if template == "cloze":
        return [f" {c}" for c in item.choices]
    return [f" {LETTERS[i]}" for i in range(len(item.choices))]


def pick_shots(item: MCItem, dev: Sequence[MCItem], k: int) -> list[MCItem]:
    """The first ``k`` dev items of the item's subject, then others in file order (never the
    item itself)."""
    same = [d for d in dev if d.subject == item.subject and d != item]
    other = [d for d in dev if d.subject != item.subject and d != item]
    return (same + other)[:k]


def build_prompt(item: MCItem, shots: Sequence[MCItem] = (), template: str = "cloze") -> str:
    """The prompt for ``item``: a subject header (``letters``), each shot with its answer
    and a blank line, then the item's question."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    sep = "\n\n"
    parts = [_question(s, template) + continuations(s, template)[s.answer] for s in shots]
    return _header(item.subject, template) + "".join(p + sep for p in parts) + \
        _question(item, template)


# ----------------------------------------------------------------------------- scoring

def _encode(tok, text: str) -> list[int]:
    try:
        return list(tok.encode(text, add_special_tokens=False))
    except TypeError:  # ByteTokenizer and other plain encoders
        return list(tok.encode(text))


@torch.no_grad()
def loglikelihoods(model, tok, requests: Sequence[tuple[str, str]], max_tokens: int = 4096,
                   max_len: int | None = None) -> list[tuple[float, int]]:
    """(sum of log p(continuation tokens | context), number of those tokens) per
    (context, continuation) pair.

    Context and continuation are encoded apart (whitespace at the end of the context moved
    to the continuation, as the harness does), so the split falls on a token boundary. A
    sequence longer than ``max_len`` (default the model's ``max_seq_len``) loses tokens from
    the left of its context. Sequences are packed, longest first, into forward passes of
    at most ``max_tokens`` tokens.
    """
    max_len = max_len or model.config.max_seq_len
    device = next(model.parameters()).device
    seqs = []
    for ctx, cont in requests:
        if not cont:
            raise ValueError("an empty continuation has no log-likelihood")
        stripped = ctx.rstrip(" ")
        cont = ctx[len(stripped):] + cont
        c_ids, t_ids = _encode(tok, stripped), _encode(tok, cont)
        if not t_ids:
            raise ValueError(f"continuation {cont!r} encodes to no tokens")
        if not c_ids:
            eos = getattr(tok, "eos_token_id", None)
            c_ids = [eos if eos is not None else 0]
        ids = (c_ids + t_ids)[-max_len:]
        n_ctx = len(ids) - len(t_ids)
        if n_ctx < 1:
            raise ValueError(f"a continuation of {len(t_ids)} tokens leaves no context within "
                             f"{max_len} tokens")
        seqs.append((ids, n_ctx))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    i = 0
    while i < len(order):
        group, total = [], 0
        while i < len(order) and (not group or total + len(seqs[order[i]][0]) <= max_tokens):
            group.append(order[i])
            total += len(seqs[order[i]][0])
            i += 1
        ids, labels, cu = [], [], [0]
        for j in group:
            s, n_ctx = seqs[j]
            ids += s
            labels += [-100] * (n_ctx - 1) + s[n_ctx:] + [-100]
            cu.append(cu[-1] + len(s))
        x = torch.tensor([ids], dtype=torch.int64, device=device)
        y = torch.tensor([labels], dtype=torch.int64, device=device)
        cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
        sums, counts = packed_sequence_logprobs(model(x, cu_seqlens=cu_t), y, cu_t)
        for j, s, c in zip(group, sums.tolist(), counts.tolist(), strict=True):
            out[j] = (float(s), int(c))
    return out


@dataclass
class MCResult:
    """Accuracy figures; ``rows`` holds each item's choice log-likelihoods and picks."""

    acc: float
    acc_norm: float
    acc_stderr: float
    acc_norm_stderr: float
    n: int
    subjects: dict[str, dict] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    def to_dict(self, rows: bool = False) -> dict:
        d = {"acc": self.acc, "acc_norm": self.acc_norm, "acc_stderr": self.acc_stderr,
             "acc_norm_stderr": self.acc_norm_stderr, "n": self.n, "subjects": self.subjects}
        if rows:
            d["rows"] = self.rows
        return d

    def table(self) -> str:
        """Per-subject accuracy as a plain-text table, the overall row last."""
        width = max([len("overall")] + [len(s) for s in self.subjects])
        lines = [f"{'subject':{width}}  {'n':>6}  {'acc':>6}  {'acc_norm':>8}"]
        for s, r in sorted(self.subjects.items()):
            lines.append(f"{s:{width}}  {r['n']:>6}  {r['acc']:>6.3f}  {r['acc_norm']:>8.3f}")
        lines.append(f"{'overall':{width}}  {self.n:>6}  {self.acc:>6.3f}  {self.acc_norm:>8.3f}")
        return "\n".join(lines)


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan


def evaluate_multiple_choice(model, tok, items: Sequence[MCItem], dev: Sequence[MCItem] = (),
                             shots: int = 0, template: str = "cloze", max_tokens: int = 4096,
                             ) -> MCResult:
    """acc and acc_norm of ``model`` on ``items`` with ``shots`` examples from ``dev``."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if not items:
        raise ValueError("no items to evaluate")
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if shots and len(dev) < shots:
        raise ValueError(f"{shots} shots need a dev set of at least {shots} items, got "
                         f"{len(dev)}")
    requests, spans = [], []
    for item in items:
        prompt = build_prompt(item, pick_shots(item, dev, shots), template)
        conts = continuations(item, template)
        spans.append((len(requests), conts))
        requests += [(prompt, c) for c in conts]
    scores = loglikelihoods(model, tok, requests, max_tokens)
    rows, per = [], defaultdict(lambda: [0, 0, 0])
    for item, (start, conts) in zip(items, spans, strict=True):
        ll = [scores[start + k][0] for k in range(len(conts))]
        norm = [v / len(c) for v, c in zip(ll, conts, strict=True)]
        pred = max(range(len(ll)), key=ll.__getitem__)
        pred_norm = max(range(len(norm)), key=norm.__getitem__)
        rows.append({"source": item.source, "subject": item.subject, "answer": item.answer,
                     "pred": pred, "pred_norm": pred_norm, "loglikelihoods": ll})
        r = per[item.subject]
        r[0] += 1
        r[1] += pred == item.answer
        r[2] += pred_norm == item.answer
    n = len(items)
    acc = sum(r[1] for r in per.values()) / n
    acc_norm = sum(r[2] for r in per.values()) / n
    subjects = {s: {"n": r[0], "acc": r[1] / r[0], "acc_norm": r[2] / r[0]}
                for s, r in per.items()}
    return MCResult(acc, acc_norm, _stderr(acc, n), _stderr(acc_norm, n), n, subjects, rows)


# ----------------------------------------------------------------------------- stdlib set

_MIN_LINE = 8   # characters (stripped) for a line to be a target or a distractor


def _candidate(line: str) -> bool:
    s = line.strip()
    return len(s) >= _MIN_LINE and not s.startswith(("#", '"""', "'''")) and s not in (
        "else:", "try:", "finally:", "return None")


def stdlib_mc_items(documents: Iterable, context_lines: int = 12, per_file: int = 8,
                    n_choices: int = 4) -> list[MCItem]:
    """Items "which line comes next?" from source documents (``.source``, ``.text``).

    In each document, up to ``per_file`` target lines are drawn (by a generator seeded by a
    hash of the source, so the set is the same on every run) among lines of at least 8
    characters that are not comments or docstring quotes and that follow at least
    ``context_lines`` lines. The question is the ``context_lines`` lines before the target;
    the choices are the real line and ``n_choices - 1`` other candidate lines of the same
    file (different text, length within half to twice the real one's where the file has
    enough), each given the real line's indentation so indentation gives nothing away. The
    right answer's position is drawn too. Subject: the top-level package or module.
    """
    items = []
    for doc in documents:
        lines = doc.text.splitlines()
        pool = sorted({ln.strip() for ln in lines if _candidate(ln)})
        targets = [i for i in range(context_lines, len(lines)) if _candidate(lines[i])]
        if len(pool) < n_choices or not targets:
            continue
        rng = random.Random(int.from_bytes(hashlib.sha256(doc.source.encode()).digest()[:8],
                                           "big"))
        for i in sorted(rng.sample(targets, min(per_file, len(targets)))):
            real = lines[i].strip()
            indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
            near = [p for p in pool if p != real and len(real) / 2 <= len(p) <= 2 * len(real)]
            rest = [p for p in pool if p != real and p not in near]
            if len(near) + len(rest) < n_choices - 1:
                continue
            others = rng.sample(near, min(n_choices - 1, len(near)))
            others += rng.sample(rest, n_choices - 1 - len(others))
            answer = rng.randrange(n_choices)
            choices = others[:answer] + [real] + others[answer:]
            question = "\n".join(lines[i - context_lines:i]) + "\n"
            subject = re.split(r"[/.]", doc.source, maxsplit=1)[0]
            items.append(MCItem(question, tuple(indent + c for c in choices), answer,
                                subject, f"{doc.source}:{i + 1}"))
    return items


def write_stdlib_mc(out_dir: str | os.PathLike, val_fraction: float = 0.05,
                    context_lines: int = 12, per_file: int = 8, dev_items: int = 32,
                    root: str | os.PathLike | None = None) -> dict:
    """Write ``test.jsonl`` (items from the held-out ``val`` files of the pretraining
    split), ``dev.jsonl`` (the first ``dev_items`` items from ``train`` files, for few-shot
    prompts) and ``stats.json`` into ``out_dir``; returns the stats. Use the ``plain``
    template with these files."""
    from llmcore.data.corpus import stdlib_documents

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    test = stdlib_mc_items(stdlib_documents("val", val_fraction, root), context_lines,
                           per_file)
    dev = []
    for doc in stdlib_documents("train", val_fraction, root):
        dev += stdlib_mc_items([doc], context_lines, 2)
        if len(dev) >= dev_items:
            break
    dev = dev[:dev_items]
    if not test:
        raise ValueError("no items: the val split has no file long enough")
    for name, rows in (("test", test), ("dev", dev)):
        tmp = out_dir / f".{name}.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for it in rows:
                f.write(json.dumps({"question": it.question, "choices": list(it.choices),
                                    "answer": it.answer, "subject": it.subject,
                                    "source": it.source}, ensure_ascii=False) + "\n")
        os.replace(tmp, out_dir / f"{name}.jsonl")
    stats = {"val_fraction": val_fraction, "context_lines": context_lines,
             "per_file": per_file, "template": "plain", "test": len(test), "dev": len(dev),
             "subjects": len({it.subject for it in test})}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    return stats


__all__ = ["MCItem", "MCResult", "TEMPLATES", "build_prompt", "continuations",
           "evaluate_multiple_choice", "item_from_row", "loglikelihoods", "pick_shots",
           "read_items", "stdlib_mc_items", "write_stdlib_mc"]
