"""Where a CPU decode step's time goes inside the fused decode ops.

``llmcore::decoder_layers`` (every block of a cached forward: decoding, draft
verification) and ``llmcore::greedy_decode`` (a whole greedy loop) are one event each to
``torch.profiler``. While switched on here, they sum each part's wall time (the
projections, RoPE, the KV-cache write, the attention, the norms, the head, ...) over their
calls::

    from llmcore.ops.profile import decode_profile

    with decode_profile() as prof:
        model.decode_greedy(tok, cache, 64)
    print(prof.table())        # one row per part: ms per step and share

A model's cached forward (``model(ids, cache=cache)``) on the CPU runs its blocks through
``decoder_layers`` (the parts up to ``down``); its embedding and head run in Python and
are not counted (``embed``, ``head`` and ``argmax`` are ``decode_greedy``'s). Collection is
process-wide and off by default; off, each part costs one branch. The timers read a
steady clock between the ops a part calls, so a part holds its ops' own threading and
dispatch; every part runs on the calling thread's clock (helper threads' work inside an
op is within that op's wall time).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from llmcore import _ext

__all__ = ["PARTS", "StepProfile", "decode_profile", "read_decode_profile",
           "set_decode_profile"]

# The parts in step order (csrc/fused/step_profile.h, StepPart).
PARTS = ("embed", "norms", "qkv", "rope", "kv_append", "attention", "o_proj", "gate_up",
         "silu_mul", "down", "head", "argmax")


@dataclass
class StepProfile:
    """Per-part seconds summed over ``layer_calls`` calls of ``decoder_layers`` (one per
    forward or greedy step) and ``steps`` greedy steps."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    layer_calls: int = 0
    steps: int = 0

    @property
    def total(self) -> float:
        """Seconds in all parts."""
        return sum(self.seconds.values())

    def per_call(self) -> dict[str, float]:
        """Seconds per step: per greedy step when there were any, else per
        ``decoder_layers`` call (0 when nothing ran)."""
        n = self.steps or self.layer_calls
        return {k: v / n if n else 0.0 for k, v in self.seconds.items()}

    def table(self) -> str:
        """A text table: each part's milliseconds per step (see :meth:`per_call`) and its
        share of the parts' total; parts that took no time are left out."""
        per, total = self.per_call(), self.total
        unit = "greedy step" if self.steps else "decoder_layers call"
        lines = [f"part        ms / {unit}   share",
                 "----------  " + "-" * (len(unit) + 5) + "  -----"]
        for k in PARTS:
            if self.seconds[k] > 0:
                lines.append(f"{k:10s}  {per[k] * 1e3:{len(unit) + 5}.3f}  "
                             f"{self.seconds[k] / total:5.1%}")
        lines.append(f"{'total':10s}  {sum(per.values()) * 1e3:{len(unit) + 5}.3f}  "
                     f"({self.layer_calls} decoder_layers calls, {self.steps} greedy steps)")
        return "\n".join(lines)


def _call(enable: bool | None, reset: bool) -> list[float]:
    if not _ext.has_op("decode_profile"):
        why = (f"it failed to load ({_ext.LOAD_ERROR})" if not _ext.available()
               else "the loaded build predates it: rebuild")
        raise RuntimeError(f"the decode profile needs llmcore's compiled extension; {why}")
    return torch.ops.llmcore.decode_profile(enable, reset)


def _profile(raw: list[float]) -> StepProfile:
    n = len(PARTS)
    return StepProfile(dict(zip(PARTS, raw[:n], strict=True)), int(raw[n]), int(raw[n + 1]))


def read_decode_profile(reset: bool = False) -> StepProfile:
    """The totals collected so far (``reset``: then zero them)."""
    return _profile(_call(None, reset))


def set_decode_profile(enabled: bool) -> bool:
    """Switch collection on or off; returns whether it was on."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    return bool(_call(enabled, False)[-1])


@contextlib.contextmanager
def decode_profile() -> Iterator[StepProfile]:
    """Collect the decode ops' per-part times inside the ``with`` block: the yielded
    :class:`StepProfile` holds them when the block ends (also when it raises). The totals
    are zeroed on entry; collection returns to its previous state on exit."""
    was_on = bool(_call(True, True)[-1])
    prof = StepProfile()
    try:
        yield prof
    finally:
        got = _profile(_call(was_on, True))
        prof.seconds, prof.layer_calls, prof.steps = got.seconds, got.layer_calls, got.steps
