"""Instruction and preference sets from the standard library (llmcore.data.stdlib_tasks)."""

from __future__ import annotations

import ast
import difflib
import json
import random
from collections import Counter

import pytest

from llmcore.cli import main
from llmcore.data import corpus as C
from llmcore.data import stdlib_tasks as T

SOURCE = '''\
import os


def no_doc(a):
    x = a
    return x


def add(a, b=1, *args, c: int = 2, **kw) -> int:
    """Add things.

    More detail.
    """
    # a comment kept in the body
    total = a + b  # trailing comment
    if total == 3 and c > 1:
        return total
    text = """first
second"""
    return total + len(text)


class Box:
    """A box."""

    @staticmethod
    def scale(v, k):
        """Scale v by k.

            Indented doc line.
        """
        out = v
        for i in range(k):
            out = out * i
        return out

    def stub(self):
        """Not done."""
        raise NotImplementedError("later")


async def fetch(q):
    """Await q."""
    r = await q
    return r


def outer(n):
    """Outer doc."""
    def inner(v):
        """Inner doc."""
        w = v + n
        return w
    return inner(2)


def short(x):
    """One statement."""
    return x
'''


def by_name(fns):
    return {f.qualname: f for f in fns}


def test_extraction_is_exact():
    fns = T.extract_functions(SOURCE, "pkg/m.py")
    assert [f.qualname for f in fns] == ["no_doc", "add", "Box.scale", "Box.stub", "fetch",
                                         "outer", "outer.<locals>.inner", "short"]
    f = by_name(fns)
    add = f["add"]
    assert add.source == "pkg/m.py::add" and add.owner is None and not add.is_async
    assert add.signature == "add(a, b=1, *args, c: int=2, **kw) -> int"
    assert add.docstring == "Add things.\n\nMore detail."
    assert add.body == ('# a comment kept in the body\n'
                        'total = a + b  # trailing comment\n'
                        'if total == 3 and c > 1:\n'
                        '    return total\n'
                        'text = """first\nsecond"""\n'
                        'return total + len(text)\n')
    assert add.code == SOURCE[SOURCE.index("def add"):SOURCE.index("\n\n\nclass Box")] + "\n"
    scale = f["Box.scale"]
    assert (scale.owner, scale.owner_kind) == ("Box", "class")
    assert scale.code.startswith("@staticmethod\ndef scale(v, k):\n    \"\"\"Scale v by k.\n")
    assert "\n        Indented doc line.\n" in scale.code  # docstring re-indented with the code
    assert scale.body == "out = v\nfor i in range(k):\n    out = out * i\nreturn out\n"
    assert f["fetch"].is_async and f["fetch"].body == "r = await q\nreturn r\n"
    inner = f["outer.<locals>.inner"]
    assert (inner.owner, inner.owner_kind, inner.body) == ("outer", "function",
                                                           "w = v + n\nreturn w\n")
    assert f["outer"].body.startswith('def inner(v):\n    """Inner doc."""\n')
    for fn in fns:  # the cut texts parse back to the same trees
        if fn.code is not None:
            assert isinstance(ast.parse(fn.code).body[0], ast.FunctionDef | ast.AsyncFunctionDef)


def test_byte_order_mark_and_crlf_line_ends():
    src = '\ufeffdef f(x):\r\n    """Doc."""\r\n    y = x  # c\r\n    return y\r\n'
    (fn,) = T.extract_functions(src, "a.py")
    assert fn.body == "y = x  # c\nreturn y\n" and fn.code.startswith("def f(x):\n")


def test_skip_reasons_and_prompts():
    f = by_name(T.extract_functions(SOURCE, "m.py"))
    reasons = {q: T.skip_reason(fn) for q, fn in f.items()}
    assert reasons == {"no_doc": "no docstring", "add": None, "Box.scale": None,
                       "Box.stub": "trivial body", "fetch": None, "outer": None,
                       "outer.<locals>.inner": None, "short": "trivial body"}
    assert T.skip_reason(f["add"], max_chars=40) == "too long"
    assert T.prompt_of(f["add"]) == ("Write a Python function `add(a, b=1, *args, c: int=2, "
                                     "**kw) -> int` that: Add things.\n\nMore detail.")
    assert T.prompt_of(f["Box.scale"]).startswith(
        "Write a Python function `scale(v, k)`, a method of class `Box`, that: Scale v")
    assert T.prompt_of(f["fetch"]) == "Write a Python async function `fetch(q)` that: Await q."
    assert ", nested in function `outer`, that:" in T.prompt_of(f["outer.<locals>.inner"])
    rows = list(T.instruction_examples(f.values()))
    assert [r["source"] for r in rows] == ["m.py::add", "m.py::Box.scale", "m.py::fetch",
                                           "m.py::outer", "m.py::outer.<locals>.inner"]
    assert rows[0]["response"] == f["add"].body


def _stmts(code):
    fn = ast.parse(code).body[0]
    return [ast.dump(s) for s in fn.body]


def _changed_lines(a, b):
    return [d for d in difflib.ndiff(a.splitlines(), b.splitlines()) if d[:1] in "+-"]


FUNCS = {
    "flat": '''\
def flat(items, limit):
    """Flat body."""
    count = 0  # counter
    seen = set()
    for it in items:
        if it in seen or it is None:
            continue
        seen.add(it)
    count = len(seen)
    if count >= limit and limit != 0:
        return limit
    return count
''',
    "calls": '''\
def calls(a, b):
    """Side effects."""
    print(a)
    print(b)
    x = a < b
    return x
''',
}


def _blocks(t):
    return [[ast.dump(s) for s in blk] for blk in T._blocks(t)]


def _ops(t):
    nodes = list(ast.walk(t))
    return ([type(o) for n in nodes if isinstance(n, ast.Compare) for o in n.ops]
            + [type(n.op) for n in nodes if isinstance(n, ast.BoolOp)])


def _names(t):
    return [n.id for n in ast.walk(t) if isinstance(n, ast.Name)]


def _returns(t):
    return sum(isinstance(n, ast.Return) for n in ast.walk(t))


@pytest.mark.parametrize("name", sorted(FUNCS))
@pytest.mark.parametrize("kind", T.CORRUPTIONS)
def test_every_corruption_parses_differs_and_is_the_documented_change(name, kind):
    code = FUNCS[name]
    orig = ast.parse(code).body[0]
    outs = {T.corrupt(code, kind, random.Random(seed)) for seed in range(12)}
    assert None not in outs
    for out in outs:
        new = ast.parse(out).body[0]
        assert ast.dump(new) != ast.dump(orig)
        if kind == "swap_statements":  # one block, two neighbours exchanged
            diffs = [(x, y) for x, y in zip(_blocks(orig), _blocks(new), strict=True) if x != y]
            assert len(diffs) == 1
            x, y = diffs[0]
            i = next(k for k in range(len(x)) if x[k] != y[k])
            assert y[i:i + 2] == [x[i + 1], x[i]] and y[:i] == x[:i] and y[i + 2:] == x[i + 2:]
        elif kind == "flip_operator":  # exactly one operator, to its documented opposite
            changed = [(x, y) for x, y in zip(_ops(orig), _ops(new), strict=True) if x != y]
            assert len(changed) == 1
            x, y = changed[0]
            assert T._FLIP.get(x) is y or {x, y} == {ast.And, ast.Or}
            assert len(_changed_lines(code, out)) == 2  # one line out, one line in
        elif kind == "drop_return":
            assert _returns(new) == _returns(orig) - 1
        elif kind == "rename_variable":  # one use renamed to another name of the function
            changed = [(x, y) for x, y in zip(_names(orig), _names(new), strict=True) if x != y]
            assert len(changed) == 1 and changed[0][1] in _names(orig)
            assert len(_changed_lines(code, out)) == 2
        elif kind == "truncate":
            a, b = _stmts(code), _stmts(out)
            assert b == a[:1 + (len(a) - 1 + 1) // 2]
        assert "# counter" in out or name != "flat"  # comments survive


def test_swaps_only_where_order_matters_and_kinds_can_not_apply():
    code = 'def f(a):\n    """Doc."""\n    x = 1\n    y = 2\n    return x + y\n'
    for seed in range(10):  # x = 1; y = 2 are independent: only (y = 2, return) is swapped
        out = T.corrupt(code, "swap_statements", random.Random(seed))
        assert out.endswith("    x = 1\n    return x + y\n    y = 2\n")
    lone = 'def g(a):\n    """Doc."""\n    print(a)\n    print(a)\n'
    assert T.corrupt(lone, "rename_variable", random.Random(0)) is None  # one local name
    assert T.corrupt(lone, "flip_operator", random.Random(0)) is None
    assert T.corrupt(lone, "drop_return", random.Random(0)) is None
    for seed in range(5):  # swapping two identical statements changes nothing: no pair
        assert T.corrupt(lone, "swap_statements", random.Random(seed)) is None
    with pytest.raises(ValueError, match="unknown corruption"):
        T.corrupt(lone, "shuffle", random.Random(0))


def test_preference_pairs_are_balanced_and_labelled():
    fns = T.extract_functions(SOURCE + "\n" + "\n".join(FUNCS.values()), "m.py") * 6
    balance, skipped = Counter(), Counter()
    rows = list(T.preference_pairs(fns, balance=balance, skipped=skipped))
    counts = Counter(r["corruption"] for r in rows)
    assert set(counts) == set(T.CORRUPTIONS) and max(counts.values()) - min(counts.values()) <= 1
    assert counts == balance and skipped["trivial body"] == 6 * 2
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected", "corruption", "source"}
        assert ast.dump(ast.parse(r["chosen"])) != ast.dump(ast.parse(r["rejected"]))


def _tree(root, n=40):
    for i in range(n):
        sub = root / f"pkg{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{i}.py").write_text(SOURCE.replace("def add(", f"def add{i}("))
    (root / "broken.py").write_text("def f(:\n    pass\n")
    (root / "nul.py").write_bytes(b"x = 1\0\n")


def test_writers_are_deterministic_and_split_by_file(tmp_path):
    _tree(tmp_path / "lib")
    for write in (T.write_sft_stdlib, T.write_preferences_stdlib):
        a = write(tmp_path / "a", val_fraction=0.3, root=tmp_path / "lib")
        b = write(tmp_path / "b", val_fraction=0.3, root=tmp_path / "lib")
        for name in ("train.jsonl", "val.jsonl", "stats.json"):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert a == json.loads((tmp_path / "a" / "stats.json").read_text())
        assert a["files"]["read"] == 42 and a["files"]["unparsable"] == 2
        assert sorted(a["files"]["unparsable_paths"]) == ["broken.py", "nul.py"]
        paths = {}
        for split in C.SPLITS:
            rows = [json.loads(x) for x in (tmp_path / "a" / f"{split}.jsonl").open()]
            assert len(rows) == a["splits"][split]["rows"] > 0
            paths[split] = {r["source"].split("::")[0] for r in rows}
            assert all(C.split_of(p, 0.3) == split for p in paths[split])
        assert not paths["train"] & paths["val"]
        # every module but its renamed add() is a duplicate of the first file's rows
        assert a["skipped"]["duplicate"] > 0
        assert b["splits"]["train"]["rows"] + b["splits"]["val"]["rows"] >= 40


def test_cli_writes_files_and_prints_counts(tmp_path, monkeypatch, capsys):
    _tree(tmp_path / "lib", n=12)
    monkeypatch.setattr(C, "stdlib_root", lambda: tmp_path / "lib")
    assert main(["data", "preferences-stdlib", "--out", str(tmp_path / "p"),
                 "--val-fraction", "0.2", "--max-chars", "1000"]) == 0
    out = capsys.readouterr().out
    stats = json.loads((tmp_path / "p" / "stats.json").read_text())
    assert stats["max_chars"] == 1000 and stats["val_fraction"] == 0.2
    assert "truncate" in out and f"{stats['splits']['train']['rows']:>10,}" in out
    assert "do not parse" in out
    assert main(["data", "sft-stdlib", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "train.jsonl").stat().st_size > 0
    assert "rows" in capsys.readouterr().out


def test_real_stdlib_slice(tmp_path):
    root = C.stdlib_root()
    if not (root / "json").is_dir() or not (root / "email").is_dir():
        pytest.skip("this Python has no json/ or email/ package sources")
    sft = T.write_sft_stdlib(tmp_path / "s", include=("json/", "email/"))
    pref = T.write_preferences_stdlib(tmp_path / "p", include=("json/", "email/"))
    assert 100 < sum(s["rows"] for s in sft["splits"].values()) < 1000
    assert sft["skipped"].get("layout", 0) == 0
    total = Counter()
    for split in C.SPLITS:
        total.update(pref["corruptions"][split])
    assert all(total[k] >= 10 for k in T.CORRUPTIONS), total
    for line in (tmp_path / "p" / "train.jsonl").open():
        r = json.loads(line)
        assert ast.dump(ast.parse(r["chosen"])) != ast.dump(ast.parse(r["rejected"]))
