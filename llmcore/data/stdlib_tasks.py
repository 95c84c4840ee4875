"""Instruction and preference sets made with ``ast`` from the standard library's functions.

Every function (methods and nested functions included) that has a docstring and a body of
at least ``min_statements`` statements becomes

- an **instruction** row: ``prompt`` = "Write a Python function `name(args)` that:
  <docstring>" (the signature is ``ast.unparse`` of the arguments and return annotation,
  as written; methods and nested functions say whose they are), ``response`` = the real
  body after the docstring, cut from the file by line ranges so its formatting and
  comments are kept, with the indentation of its first statement removed from every line
  (lines inside multi-line strings are left alone, so string values do not change);
- a **preference** row: ``chosen`` = the whole definition (decorators included, dedented
  the same way), ``rejected`` = a copy with one corruption of a labelled type
  (:data:`CORRUPTIONS`). A corruption is an edit of the source text, so chosen and rejected
  differ only where the corruption is, never in formatting or comments. Each edit is
  checked: the rejected text must parse to exactly the tree the corruption describes.

Everything is deterministic: files in sorted order, functions in source order, and each
function's choices drawn from a generator seeded by a hash of ``path::qualname``. The
corruption type is the one least used so far in the split among those that apply to the
function (ties broken by that generator), so the types stay balanced where they apply.
Splits are by source file with :func:`llmcore.data.corpus.split_of`, the same as the
pretraining split, so no file gives rows to both splits. A row whose prompt and answer
already came from an earlier file is dropped as a duplicate.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import random
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmcore.data.corpus import SPLITS, split_of, stdlib_documents

CORRUPTIONS = ("swap_statements", "flip_operator", "drop_return", "rename_variable", "truncate")
MAX_CHARS = 1500
MIN_STATEMENTS = 2
_TRIES = 8  # candidates tried per corruption type before it counts as not applicable

_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


@dataclass(frozen=True)
class Function:
    """One ``def`` of a source file, with the texts the rows are made from."""

    path: str
    qualname: str          # Python's __qualname__: C.meth, outer.<locals>.inner
    signature: str         # name(args) -> returns, from ast.unparse
    owner: str | None      # the enclosing class (methods) or function (nested functions)
    owner_kind: str | None  # "class", "function" or None
    is_async: bool
    docstring: str | None  # cleaned (inspect.cleandoc); None without one
    body: str | None       # the statements after the docstring, dedented; None if not cut
    code: str | None       # the whole definition with its decorators, dedented
    statements: int        # statements after the docstring, nested ones counted
    trivial: bool          # only pass / ... / a constant / raise NotImplementedError

    @property
    def source(self) -> str:
        return f"{self.path}::{self.qualname}"


# --- extraction -------------------------------------------------------------------------

def _docstring_expr(node: ast.AST) -> ast.Expr | None:
    body = getattr(node, "body", None)
    if (isinstance(node, (ast.Module, ast.ClassDef, *_DEFS)) and body
            and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        return body[0]
    return None


def _statements(tree: ast.AST) -> Iterator[ast.AST]:
    """``tree`` and every statement in it (expressions hold no statements or docstrings)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            sub = getattr(node, field, None)
            if isinstance(sub, list):
                todo += sub


def _dump(tree: ast.AST) -> str:
    """``ast.dump`` with every docstring cleaned, so re-indented docstrings compare equal."""
    saved = []
    for node in _statements(tree):
        doc = _docstring_expr(node)
        if doc is not None:
            saved.append((doc.value, doc.value.value))
            doc.value.value = inspect.cleandoc(doc.value.value)
    try:
        return ast.dump(tree)
    finally:
        for const, value in saved:
            const.value = value


def _first_line(stmt: ast.stmt) -> int:
    return min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])


def _indent(line: str) -> str:
    return line[:len(line) - len(line.lstrip(" \t\f"))]


def _cut(lines: list[str], first: int, last: int, prefix: str, keep: set[int]) -> str:
    """Lines ``first..last`` (1-based) with ``prefix`` removed where present, except the
    lines in ``keep`` (inside multi-line strings); leading blank lines dropped."""
    out = []
    for n in range(first, last + 1):
        s = lines[n - 1]
        if n not in keep:
            if s.startswith(prefix):
                s = s[len(prefix):]
            elif not s.strip():
                s = ""
        if out or s.strip():
            out.append(s)
    return "\n".join(out) + "\n"


def _is_trivial(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr)
                                      and isinstance(stmt.value, ast.Constant)):
        return True
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    sig = f"{node.name}({ast.unparse(node.args)})"
    return sig + (f" -> {ast.unparse(node.returns)}" if node.returns is not None else "")


def _function(node, path, qualname, owner, owner_kind, lines, strings, docstrings) -> Function:
    doc = ast.get_docstring(node)
    if doc is not None and not doc.strip():
        doc = None
    stmts = node.body[1:] if doc is not None else node.body
    body = code = None
    if doc is None:  # no row comes of it: spare the work
        return Function(path, qualname, _signature(node), owner, owner_kind,
                        isinstance(node, ast.AsyncFunctionDef), None, None, None, 0, False)
    count = sum(isinstance(n, ast.stmt) for s in stmts for n in ast.walk(s))
    if stmts and stmts[0].lineno > node.body[0].end_lineno:
        # Two tries: docstrings re-indented with the code, then left as they were.
        for keep in (strings, strings | docstrings):
            b = _cut(lines, node.body[0].end_lineno + 1, stmts[-1].end_lineno,
                     _indent(lines[stmts[0].lineno - 1]), keep)
            c = _cut(lines, _first_line(node), node.end_lineno,
                     _indent(lines[_first_line(node) - 1]), keep)
            try:
                ok = (_dump(ast.parse(b)) == _dump(ast.Module(body=stmts, type_ignores=[]))
                      and _dump(ast.parse(c).body[0]) == _dump(node))
            except (SyntaxError, ValueError, IndexError):
                ok = False
            if ok:
                body, code = b, c
                break
    return Function(path, qualname, _signature(node), owner, owner_kind,
                    isinstance(node, ast.AsyncFunctionDef), doc, body, code, count,
                    all(map(_is_trivial, stmts)))


def extract_functions(source: str, path: str) -> list[Function]:
    """Every function of ``source`` (a module's text; ``path`` names it in the rows), in
    source order, nested functions and methods included. Raises ``SyntaxError`` (or
    ``ValueError`` for null bytes) when the source does not parse."""
    source = source.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old test files
        tree = ast.parse(source)
    lines = source.split("\n")
    doc_ids, multiline = set(), []
    for n in ast.walk(tree):
        if isinstance(n, (ast.Module, ast.ClassDef, *_DEFS)):
            if (d := _docstring_expr(n)) is not None:
                doc_ids.add(id(d.value))
        elif (isinstance(n, ast.JoinedStr) or isinstance(n, ast.Constant)
              and isinstance(n.value, (str, bytes))) and n.end_lineno > n.lineno:
            multiline.append(n)
    strings: set[int] = set()  # lines inside multi-line strings: never re-indented
    docstrings: set[int] = set()  # the same inside docstrings: re-indented if that is exact
    for n in multiline:
        (docstrings if id(n) in doc_ids else strings).update(range(n.lineno + 1,
                                                                   n.end_lineno + 1))
    out: list[Function] = []

    def visit(node, prefix, owner, owner_kind):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, _DEFS):
                qual = prefix + child.name
                out.append(_function(child, path, qual, owner, owner_kind, lines, strings,
                                     docstrings))
                visit(child, qual + ".<locals>.", child.name, "function")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".", child.name, "class")
            elif isinstance(child, ast.stmt) or isinstance(child, ast.excepthandler) or \
                    isinstance(child, ast.match_case):
                visit(child, prefix, owner, owner_kind)

    visit(tree, "", None, None)
    return out


def skip_reason(fn: Function, max_chars: int = MAX_CHARS,
                min_statements: int = MIN_STATEMENTS) -> str | None:
    """Why ``fn`` gives no row (None when it gives one)."""
    if fn.docstring is None:
        return "no docstring"
    if fn.statements < min_statements or fn.trivial:
        return "trivial body"
    if fn.body is None:
        return "layout"  # body on the docstring's line, or not cut back to the same tree
    if len(fn.body) > max_chars:
        return "too long"
    return None


def prompt_of(fn: Function) -> str:
    what = "Python async function" if fn.is_async else "Python function"
    where = ""
    if fn.owner_kind == "class":
        where = f", a method of class `{fn.owner}`,"
    elif fn.owner_kind == "function":
        where = f", nested in function `{fn.owner}`,"
    return f"Write a {what} `{fn.signature}`{where} that: {fn.docstring}"


def instruction_examples(functions: Iterable[Function], max_chars: int = MAX_CHARS,
                         min_statements: int = MIN_STATEMENTS) -> Iterator[dict]:
    """``{"prompt", "response", "source"}`` for each function that gives a row."""
    for fn in functions:
        if skip_reason(fn, max_chars, min_statements) is None:
            yield {"prompt": prompt_of(fn), "response": fn.body, "source": fn.source}


# --- corruptions ------------------------------------------------------------------------

_FLIP = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.GtE, ast.GtE: ast.Lt,
         ast.Gt: ast.LtE, ast.LtE: ast.Gt, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
         ast.In: ast.NotIn, ast.NotIn: ast.In}
_OP_TEXT = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">",
            ast.GtE: ">=", ast.Is: "is", ast.IsNot: "is not", ast.In: "in",
            ast.NotIn: "not in"}
_OP_RE = re.compile(r"is\s+not\b|not\s+in\b|==|!=|<=|>=|<|>|\bis\b|\bin\b")
_BOOL_RE = re.compile(r"\b(?:and|or)\b")
_JUMPS = (ast.Return, ast.Raise, ast.Break, ast.Continue)
_UNRENAMED = {"self", "cls"}


class _Text:
    """The function's source with (line, UTF-8 column) -> character offset."""

    def __init__(self, code: str):
        self.code = code
        self.lines = code.split("\n")
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line) + 1)

    def at(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1]
        if not line.isascii():
            col = len(line.encode()[:col].decode("utf-8", errors="replace"))
        return self.starts[lineno - 1] + col

    def start(self, node) -> int:
        return self.at(node.lineno, node.col_offset)

    def end(self, node) -> int:
        return self.at(node.end_lineno, node.end_col_offset)

    def replace(self, a: int, b: int, new: str) -> str:
        return self.code[:a] + new + self.code[b:]


def _has_docstring(fn) -> bool:
    return _docstring_expr(fn) is not None


def _blocks(fn) -> Iterator[list]:
    """The statement lists of ``fn``'s own code (not of nested functions or classes)."""
    todo = [fn.body]
    while todo:
        block = todo.pop(0)
        yield block
        for s in block:
            if isinstance(s, _SCOPES):
                continue
            for field in ("body", "orelse", "finalbody"):
                sub = getattr(s, field, None)
                if isinstance(sub, list) and sub and isinstance(sub[0], ast.stmt):
                    todo.append(sub)
            todo += [h.body for h in getattr(s, "handlers", ())]
            todo += [c.body for c in getattr(s, "cases", ())]


def _own_nodes(fn) -> Iterator[ast.AST]:
    """Nodes of ``fn``'s body, not descending into nested functions, classes, lambdas."""
    todo = list(fn.body)
    while todo:
        node = todo.pop(0)
        yield node
        if not isinstance(node, _SCOPES):
            todo += list(ast.iter_child_nodes(node))


def _effects(stmt) -> tuple[set, set, bool, bool]:
    """(names read, names written, has calls/yield/await, writes attributes or items)."""
    reads, writes, acts, stores = set(), set(), False, False
    for n in ast.walk(stmt):
        if isinstance(n, (ast.Name, ast.Attribute)):
            key = n.id if isinstance(n, ast.Name) else ast.unparse(n)
            (reads if isinstance(n.ctx, ast.Load) else writes).add(key)
            stores |= isinstance(n, ast.Attribute) and not isinstance(n.ctx, ast.Load)
        elif isinstance(n, ast.Subscript) and not isinstance(n.ctx, ast.Load):
            stores = True
        elif isinstance(n, (ast.Call, ast.Yield, ast.YieldFrom, ast.Await)):
            acts = True
        elif isinstance(n, _DEFS + (ast.ClassDef,)):
            writes.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            writes |= {(a.asname or a.name).split(".")[0] for a in n.names}
    return reads, writes, acts, stores


def _dependent(a, b) -> bool:
    """Whether swapping ``a`` and ``b`` likely changes what the code does."""
    if isinstance(a, (ast.Global, ast.Nonlocal)) or isinstance(b, (ast.Global, ast.Nonlocal)):
        return False
    ra, wa, acts_a, stores_a = _effects(a)
    rb, wb, acts_b, stores_b = _effects(b)
    return bool((wa & rb) or (wb & ra) or (wa & wb) or (acts_a and (acts_b or stores_b))
                or (acts_b and stores_a)
                or (isinstance(b, _JUMPS) and (acts_a or stores_a))
                or (isinstance(a, _JUMPS) and (acts_b or stores_b)))


def _candidates(fn, kind: str) -> list:
    start = 1 if _has_docstring(fn) else 0
    if kind == "swap_statements":
        return [(block, i) for block in _blocks(fn)
                for i in range(start if block is fn.body else 0, len(block) - 1)
                if _dependent(block[i], block[i + 1])]
    if kind == "flip_operator":
        out = []
        for n in _own_nodes(fn):
            if isinstance(n, ast.Compare):
                out += [(n, j) for j, op in enumerate(n.ops) if type(op) in _FLIP]
            elif isinstance(n, ast.BoolOp):
                out.append((n, None))
        return out
    if kind == "drop_return":
        rets = [(block, i) for block in _blocks(fn) for i, s in enumerate(block)
                if isinstance(s, ast.Return)]
        valued = [(b, i) for b, i in rets if b[i].value is not None
                  and not (isinstance(b[i].value, ast.Constant) and b[i].value.value is None)]
        # A bare return only changes anything when code follows it.
        return valued or [(b, i) for b, i in rets if b[i] is not fn.body[-1]]
    if kind == "rename_variable":
        a = fn.args
        names = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]
                 if x is not None}
        nodes = list(_own_nodes(fn))
        names |= {n.id for n in nodes if isinstance(n, ast.Name)
                  and isinstance(n.ctx, ast.Store)}
        names -= _UNRENAMED
        if len(names) < 2:
            return []
        return [(n, sorted(names - {n.id})) for n in nodes
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in names]
    if kind == "truncate":
        return [start] if len(fn.body) - start >= 2 else []
    raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")


def _apply(fn, kind: str, cand, text: _Text, rng: random.Random) -> str | None:
    """Edit the text for ``cand`` and make the same change to the tree of ``fn``."""
    if kind == "swap_statements":
        block, i = cand
        a, b = block[i], block[i + 1]
        a0, a1, b0, b1 = _first_line(a), a.end_lineno, _first_line(b), b.end_lineno
        if a1 >= b0:
            return None
        ls = text.lines
        new = ls[:a0 - 1] + ls[b0 - 1:b1] + ls[a1:b0 - 1] + ls[a0 - 1:a1] + ls[b1:]
        block[i], block[i + 1] = b, a
        return "\n".join(new)
    if kind == "flip_operator":
        node, j = cand
        if j is None:  # and <-> or: every operator token of the BoolOp
            out = text.code
            for k in reversed(range(len(node.values) - 1)):
                a, b = text.end(node.values[k]), text.start(node.values[k + 1])
                m = _BOOL_RE.search(out, a, b)
                if m is None:
                    return None
                out = out[:m.start()] + ("or" if m.group() == "and" else "and") + out[m.end():]
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            return out
        left = node.left if j == 0 else node.comparators[j - 1]
        a, b = text.end(left), text.start(node.comparators[j])
        m = _OP_RE.search(text.code, a, b)
        new = _FLIP[type(node.ops[j])]
        if m is None:
            return None
        node.ops[j] = new()
        return text.replace(m.start(), m.end(), _OP_TEXT[new])
    if kind == "drop_return":
        block, i = cand
        ret = block[i]
        v = ret.value
        if v is None or isinstance(v, (ast.Name, ast.Constant, ast.Attribute)):
            if len(block) == 1:  # the block needs a statement
                block[0] = ast.Pass()
                return text.replace(text.start(ret), text.end(ret), "pass")
            del block[i]
            ls = text.lines
            return "\n".join(ls[:ret.lineno - 1] + ls[ret.end_lineno:])
        block[i] = ast.Expr(value=v)
        a = text.start(ret)
        m = re.compile(r"return[ \t]*").match(text.code, a)
        return text.replace(a, m.end(), "") if m else None
    if kind == "rename_variable":
        node, others = cand
        new = rng.choice(others)
        a, b = text.start(node), text.end(node)
        node.id = new
        return text.replace(a, b, new)
    if kind == "truncate":
        n = len(fn.body) - cand
        del fn.body[cand + (n + 1) // 2:]
        return "\n".join(text.lines[:fn.body[-1].end_lineno]) + "\n"
    raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")


def corrupt(func: Function | str, kind: str, rng: random.Random) -> str | None:
    """``func`` (a :class:`Function` or the source of one ``def``) with one corruption of
    type ``kind``, as source text; None when the type does not apply.

    - ``swap_statements``: two adjacent statements of one block swapped, chosen where the
      swap likely changes behaviour (one reads what the other writes, both have effects,
      or one is a return/raise/break/continue and the other has an effect);
    - ``flip_operator``: one comparison flipped (``==``/``!=``, ``<``/``>=``, ``>``/``<=``,
      ``is``/``is not``, ``in``/``not in``) or one ``and``/``or`` swapped for the other;
    - ``drop_return``: one ``return X`` (with X not None when there is one) becomes the
      expression ``X``, or is removed when X is a name, constant or attribute;
    - ``rename_variable``: one read of a local name (an argument or an assigned name,
      not self/cls) changed to another local name;
    - ``truncate``: the function body keeps only its first ceil(n/2) of n >= 2 statements.

    The rejected text parses to exactly the corrupted tree (checked), which must differ
    from the original's (after ``ast.dump``; swapping two identical statements does not
    count), and keeps its formatting elsewhere.
    """
    code = func.code if isinstance(func, Function) else func
    if code is None:
        return None
    text = _Text(code)
    fn = ast.parse(code).body[0]
    if not isinstance(fn, _DEFS):
        raise ValueError("corrupt() needs the source of one function definition")
    original = _dump(fn)
    order = list(range(len(_candidates(fn, kind))))
    rng.shuffle(order)
    for i in order[:_TRIES]:
        tree = ast.parse(code)  # a fresh tree to change, with the same positions
        out = _apply(tree.body[0], kind, _candidates(tree.body[0], kind)[i], text, rng)
        if out is None:
            continue
        try:  # the text is the corrupted tree, and that tree is not the original (a swap
            # of two identical statements changes nothing)
            ok = (_dump(ast.parse(out)) == _dump(tree)
                  and _dump(tree.body[0]) != original)
        except SyntaxError:
            ok = False
        if ok:
            return out if out.endswith("\n") else out + "\n"
    return None


def _rng(fn: Function) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(fn.source.encode()).digest()[:8], "big"))


def preference_pairs(functions: Iterable[Function], max_chars: int = MAX_CHARS,
                     min_statements: int = MIN_STATEMENTS,
                     balance: Counter | None = None,
                     skipped: Counter | None = None) -> Iterator[dict]:
    """``{"prompt", "chosen", "rejected", "corruption", "source"}`` per usable function.

    The type is the least used so far in ``balance`` (running counts per type, updated
    here; pass one Counter across calls to balance a whole split) among those that apply,
    ties broken by the function's own seeded generator. Functions that give no pair are
    counted by reason in ``skipped`` when given.
    """
    balance = Counter() if balance is None else balance
    for fn in functions:
        reason = skip_reason(fn, max_chars, min_statements)
        if reason is None:
            rng = _rng(fn)
            for kind in sorted(CORRUPTIONS, key=lambda k: (balance[k], rng.random())):
                rejected = corrupt(fn, kind, rng)
                if rejected is not None:
                    balance[kind] += 1
                    yield {"prompt": prompt_of(fn), "chosen": fn.code, "rejected": rejected,
                           "corruption": kind, "source": fn.source}
                    break
            else:
                reason = "no corruption applies"
        if reason is not None and skipped is not None:
            skipped[reason] += 1


# --- writers ----------------------------------------------------------------------------

def _build(out_dir, what: str, val_fraction: float, max_chars: int, min_statements: int,
           root, include: Sequence[str] | None) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {"what": what, "val_fraction": val_fraction, "max_chars": max_chars,
             "min_statements": min_statements, "include": list(include) if include else None,
             "files": {"read": 0, "unparsable": 0, "unparsable_paths": []},
             "functions": 0, "skipped": Counter(),
             "splits": {s: {"rows": 0, "files": 0} for s in SPLITS}}
    if what == "preferences":
        stats["corruptions"] = {s: Counter() for s in SPLITS}
    seen: set[bytes] = set()
    tmp = {s: out_dir / f"{s}.jsonl.tmp" for s in SPLITS}
    files = {s: open(tmp[s], "w", encoding="utf-8") for s in SPLITS}
    try:
        for doc in stdlib_documents(None, val_fraction, root):
            if include and not any(doc.source.startswith(p) for p in include):
                continue
            split = split_of(doc.source, val_fraction)
            stats["files"]["read"] += 1
            try:
                functions = extract_functions(doc.text, doc.source)
            except (SyntaxError, ValueError, RecursionError):
                stats["files"]["unparsable"] += 1
                stats["files"]["unparsable_paths"].append(doc.source)
                continue
            stats["functions"] += len(functions)
            if what == "sft":
                rows = instruction_examples(functions, max_chars, min_statements)
                key_of = ("prompt", "response")
                for fn in functions:
                    reason = skip_reason(fn, max_chars, min_statements)
                    if reason is not None:
                        stats["skipped"][reason] += 1
            else:
                rows = preference_pairs(functions, max_chars, min_statements,
                                        stats["corruptions"][split], stats["skipped"])
                key_of = ("prompt", "chosen")
            written = 0
            for row in rows:
                key = hashlib.sha256(json.dumps([row[k] for k in key_of]).encode()).digest()
                if key in seen:
                    stats["skipped"]["duplicate"] += 1
                    if what == "preferences":
                        stats["corruptions"][split][row["corruption"]] -= 1
                    continue
                seen.add(key)
                files[split].write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
            stats["splits"][split]["rows"] += written
            stats["splits"][split]["files"] += written > 0
    finally:
        for f in files.values():
            f.close()
    for s in SPLITS:
        os.replace(tmp[s], out_dir / f"{s}.jsonl")
    stats["skipped"] = dict(sorted(stats["skipped"].items()))
    if what == "preferences":
        stats["corruptions"] = {s: {k: c[k] for k in CORRUPTIONS}
                                for s, c in stats["corruptions"].items()}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    return stats


def write_sft_stdlib(out_dir: str | os.PathLike, val_fraction: float = 0.05,
                     max_chars: int = MAX_CHARS, min_statements: int = MIN_STATEMENTS,
                     root: str | os.PathLike | None = None,
                     include: Sequence[str] | None = None) -> dict:
    """Write ``train.jsonl``, ``val.jsonl`` (``{"prompt", "response", "source"}``) and
    ``stats.json`` into ``out_dir`` from the standard library (or the Python files under
    ``root``; ``include`` keeps only paths starting with one of its prefixes). Returns
    the stats: files read and unparsable, functions found, skipped by reason, rows per
    split."""
    return _build(out_dir, "sft", val_fraction, max_chars, min_statements, root, include)


def write_preferences_stdlib(out_dir: str | os.PathLike, val_fraction: float = 0.05,
                             max_chars: int = MAX_CHARS, min_statements: int = MIN_STATEMENTS,
                             root: str | os.PathLike | None = None,
                             include: Sequence[str] | None = None) -> dict:
    """Like :func:`write_sft_stdlib` with ``{"prompt", "chosen", "rejected", "corruption",
    "source"}`` rows; the stats add the rows per split and corruption type."""
    return _build(out_dir, "preferences", val_fraction, max_chars, min_statements, root,
                  include)
