"""The package's import direction: csrc <- ops <- nn <- models <- generation / training /
evaluation <- bench <- demo <- cli, and nothing imports the CLI. Checked on the source, so a
lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "llmcore"

# Lower numbers are lower layers; a module may import its own layer and lower ones.
LAYERS = {
    "_C": 0, "_ext": 0, "_io": 0, "formats": 0, "reference": 0,
    "ops": 1,
    "nn": 2,
    "models": 3, "tokenizer": 3, "data": 3,
    "generation": 4,
    "training": 5, "evaluation": 5, "scaling": 5,
    "bench": 6,
    "demo": 7,
    "cli": 8,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "llmcore":
        return None
    if len(parts) == 1:
        return -1  # the package root: re-exports only
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module}: top-level module {parts[1]!r} has no layer in "
                             "tests/test_layering.py (add it)")
    return LAYERS[parts[1]]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module scope?) for every llmcore import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n.startswith("llmcore"):
                out.append((n, id(node) in top))
    return out


def _graph():
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    return mods, {m: _imports(p) for m, p in mods.items()}


def test_every_import_goes_down_the_layers():
    mods, graph = _graph()
    bad = []
    for mod, imps in graph.items():
        own = _layer(mod)
        if own == -1:
            continue
        for target, _ in imps:
            t = _layer(target)
            if t is not None and t > own:
                bad.append(f"{mod} (layer {own}) imports {target} (layer {t})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_nothing_imports_the_cli():
    _, graph = _graph()
    bad = [f"{m} imports {t}" for m, imps in graph.items() if not m.startswith("llmcore.cli")
           for t, _ in imps if t == "llmcore.cli" or t.startswith("llmcore.cli.")]
    assert not bad, bad


def test_no_import_cycle_at_module_scope():
    mods, graph = _graph()
    edges = {m: sorted({t if t in mods else t.rsplit(".", 1)[0] for t, top in imps if top}
                       & set(mods) - {m}) for m, imps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in edges[m]:
            if n == "llmcore" or m.startswith(n + "."):
                continue  # a package's own __init__ (parents import children by design)
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_violation(tmp_path):
    """The layer rule must be able to fail: an upward import is reported."""
    assert _layer("llmcore.cli.train") > _layer("llmcore.ops.attention")
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from llmcore.cli import main\n")
    assert _imports(f) == [("llmcore.cli", False), ("llmcore.cli.main", False)]
