"""Every ``llmcore ...`` command in the README's and docs/' shell blocks parses with the
real command line (a renamed or removed flag fails here), and the cheap ones run. The
slow ones (training, the demo, benchmarks) are run by their own tests in quick form:
tests/test_demo.py runs ``llmcore demo --quick``, tests/test_cli_train.py the recipes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from llmcore.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_commands(text: str) -> list[str]:
    """The ``llmcore`` command lines of a Markdown text's shell code: fenced blocks marked
    bash/sh/console/shell or unmarked, and indented code lines; backslash continuations
    joined, ``a && b`` split."""
    blocks, cur, lang = [], None, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if cur is None:
                cur, lang = [], line.strip()[3:].strip()
            else:
                if lang in ("", "bash", "sh", "console", "shell"):
                    blocks.append("\n".join(cur))
                cur = None
        elif cur is not None:
            cur.append(line)
        elif line.startswith("    llmcore "):
            blocks.append(line)
    out = []
    for block in blocks:
        for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            for part in re.split(r"\s*&&\s*", line.strip().removeprefix("$ ")):
                if part.startswith("llmcore "):
                    out.append(part)
    return out


def argv_of(command: str) -> list[str]:
    """The arguments after ``llmcore``; ``[...]`` groups of a usage line are optional and
    dropped, ``A|B`` alternatives keep the first."""
    command = re.sub(r"\[[^\]]*\]", " ", command)
    argv = shlex.split(command, comments=True)
    return [a.split("|")[0] if "|" in a and not a.startswith("-") else a for a in argv[1:]]


COMMANDS = sorted({(p.name, c) for p in PAGES for c in shell_commands(p.read_text())})


def test_the_pages_show_commands():
    names = {c.split()[1] for _, c in COMMANDS}
    assert {"demo", "train", "eval", "data", "scaling", "bench", "generate"} <= names


@pytest.mark.parametrize("page, command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_command_parses(page, command):
    parser = build_parser()
    try:
        parser.parse_args(argv_of(command))
    except SystemExit as e:  # argparse refused it
        pytest.fail(f"{page}: `{command}` does not parse (exit {e.code})")


def test_shell_commands_are_extracted():
    text = ("```bash\nllmcore train sft --config stdlib \\\n    --out runs/sft  # comment\n"
            "pip install x && llmcore demo --quick\necho no\n```\nllmcore inline\n"
            "```python\nllmcore not shell\n```\n")
    assert shell_commands(text) == ["llmcore train sft --config stdlib --out runs/sft  # comment",
                                    "llmcore demo --quick"]
    assert argv_of(shell_commands(text)[0]) == ["train", "sft", "--config", "stdlib", "--out",
                                               "runs/sft"]
    assert argv_of("llmcore scaling fit [CSV] [--json F] --compute 1e21") == [
        "scaling", "fit", "--compute", "1e21"]
