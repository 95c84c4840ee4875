"""Verifiable checks for generated Python: does it parse, and do its doctests pass.

:func:`run_sandboxed` runs untrusted code in a child interpreter (``python -I``) in a fresh
temporary directory, with limits set before it starts: address space (``memory_mb``), CPU
seconds and a wall-clock ``timeout`` (the whole process group is killed), at most 1 MiB
per written file, and an audit hook (installed before the code runs; code cannot remove
one) that refuses sockets, subprocesses, ``os.system``/``exec``/``fork``/``kill``, loading
native libraries, and opening files for writing or removing/renaming anything outside the
temporary directory. The child's result comes back as one JSON line on stdout.

:func:`check_code` applies it to an answer of the stdlib instruction set (the prompt names
the function's signature, the answer is its body): the assembled ``def`` must parse, and
where the docstring in the prompt has ``>>>`` examples, they run as doctests against it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import warnings
from dataclasses import dataclass

_SIGNATURE = re.compile(r"Write a Python (?:async )?function `(?P<sig>[^`]+)`"
                        r"(?P<owner>, (?:a method of class|nested in function) `[^`]+`,)?"
                        r" that:\s*(?P<doc>.*)\Z", re.S)

# Runs in the child before the untrusted code: limits are set by the parent (preexec),
# the audit hook here. ``ROOT`` is the child's temporary directory.
_BOOTSTRAP = r'''
import json, os, sys
ROOT = os.path.realpath(os.getcwd())
_DENY = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
         "os.fork", "os.forkpty", "os.kill", "os.killpg", "ctypes.", "os.startfile",
         "shutil.", "pty.", "webbrowser.", "urllib.", "http.", "ftplib.", "smtplib.")

def _inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return p == ROOT or p.startswith(ROOT + os.sep)

def _hook(event, args):
    if event.startswith(_DENY) and event not in ("socket.getaddrinfo",):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing and not isinstance(path, int) and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox")
    if event in ("os.remove", "os.rmdir", "os.rename", "os.replace", "os.mkdir",
                 "os.chmod", "os.chown", "os.link", "os.symlink", "os.truncate",
                 "os.utime"):
        paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
        if not all(_inside(p) for p in paths):
            raise PermissionError(f"sandbox: {event} outside the sandbox")

sys.addaudithook(_hook)
_src = sys.stdin.read()
_job = json.loads(_src)
_out = {"ok": False}
try:
    if _job["kind"] == "exec":
        exec(compile(_job["code"], "<sandbox>", "exec"), {"__name__": "__sandbox__"})
        _out = {"ok": True}
    else:
        import doctest
        g = {"__name__": "__sandbox__"}
        exec(compile(_job["code"], "<sandbox>", "exec"), g)
        test = doctest.DocTestParser().get_doctest(_job["doc"], g, "doc", "<doc>", 0)
        runner = doctest.DocTestRunner(verbose=False, optionflags=doctest.ELLIPSIS)
        import io
        buf = io.StringIO()
        r = runner.run(test, out=buf.write)
        _out = {"ok": True, "attempted": r.attempted, "failed": r.failed}
except BaseException as e:
    _out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
sys.stdout.write("\n" + json.dumps(_out) + "\n")
sys.stdout.flush()
'''


@dataclass
class SandboxResult:
    ok: bool  # the code ran to the end (doctests: ran, whether or not they passed)
    timed_out: bool = False
    error: str | None = None
    attempted: int = 0
    failed: int = 0


def _limits(memory_mb: int, cpu_s: int):
    def apply():
        import resource

        os.setsid()
        mem = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_sandboxed(code: str, doc: str | None = None, timeout: float = 5.0,
                  memory_mb: int = 512) -> SandboxResult:
    """Run ``code`` (and, with ``doc``, the doctests in ``doc`` against its globals) in the
    sandbox described in the module doc. Never raises for what the code does."""
    if not (timeout > 0 and memory_mb >= 64):
        raise ValueError(f"timeout must be > 0 and memory_mb >= 64, got {timeout}, {memory_mb}")
    job = json.dumps({"kind": "exec" if doc is None else "doctest", "code": code,
                      "doc": doc or ""})
    env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}
    with tempfile.TemporaryDirectory(prefix="llmcore-sandbox-") as tmp:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _BOOTSTRAP], cwd=tmp,
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL,
                                preexec_fn=_limits(memory_mb, max(1, int(timeout) + 1)))
        try:
            out, _ = proc.communicate(job.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            return SandboxResult(False, timed_out=True, error=f"timed out after {timeout} s")
        finally:
            try:  # nothing it started outlives it
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    lines = out.decode("utf-8", "replace").strip().splitlines()
    try:
        r = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        r = None
    if not isinstance(r, dict):
        why = "killed (CPU or memory limit?)" if proc.returncode and proc.returncode < 0 \
            else f"exit status {proc.returncode}"
        return SandboxResult(False, error=why)
    return SandboxResult(bool(r.get("ok")), error=r.get("error"),
                         attempted=int(r.get("attempted", 0)), failed=int(r.get("failed", 0)))


@dataclass
class CodeCheck:
    parses: bool
    doctests: int = 0  # examples attempted
    passed: int = 0

    @property
    def doctest_rate(self) -> float | None:
        return self.passed / self.doctests if self.doctests else None


def assemble(prompt: str, response: str) -> tuple[str, str | None, bool]:
    """(source of the function, its docstring, whether it can run alone) from a stdlib
    instruction prompt and an answer body; for any other prompt, the answer itself."""
    m = _SIGNATURE.search(prompt)
    if m is None:
        return response, None, True
    sig, doc = m.group("sig"), m.group("doc")
    body = textwrap.indent(textwrap.dedent(response).strip("\n") or "pass", "    ")
    head = "async def" if "async function" in prompt[:m.end("sig") + 2] else "def"
    src = f"{head} {sig}:\n{body}\n"
    standalone = m.group("owner") is None  # methods and nested functions need their owner
    return src, doc, standalone


def check_code(prompt: str, response: str, run_doctests: bool = True, timeout: float = 5.0,
               memory_mb: int = 512) -> CodeCheck:
    """Does the answer parse; and how many of the prompt's doctest examples pass."""
    src, doc, standalone = assemble(prompt, response)
    try:
        with warnings.catch_warnings():  # generated text trips SyntaxWarnings: not ours
            warnings.simplefilter("ignore")
            ast.parse(src)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return CodeCheck(False)
    if not (run_doctests and doc and ">>>" in doc and standalone):
        return CodeCheck(True)
    r = run_sandboxed(src, doc, timeout, memory_mb)
    if not r.ok:
        n = doc.count(">>>")
        return CodeCheck(True, n, 0)
    return CodeCheck(True, r.attempted, r.attempted - r.failed)


__all__ = ["CodeCheck", "SandboxResult", "assemble", "check_code", "run_sandboxed"]
