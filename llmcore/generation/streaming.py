"""Stream callbacks for ``generate`` and ``assisted_generate``: print what a model writes
while it writes it.

``generate`` calls its ``stream`` with the new token of every row ([B] int64) after each
step; ``assisted_generate`` calls its own with a list of the tokens each row accepted.
The streamers here follow ``generate``'s form and :func:`per_token` adapts them to
``assisted_generate``. They follow row 0 (one sequence, as on a terminal).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import TextIO

import torch


class TextStreamer:
    """Writes the decoded text of row 0's new tokens as they arrive.

    The whole completion is decoded each time and only what was added is written, so a
    character spread over several tokens comes out whole (a trailing U+FFFD means an
    incomplete UTF-8 sequence: wait for the next token). EOS tokens are not written.
    ``printed`` holds the text written so far.
    """

    def __init__(self, tokenizer, eos_token_id: Iterable[int] | int | None = None,
                 file: TextIO | None = None):
        if isinstance(eos_token_id, int):
            eos_token_id = [eos_token_id]
        self.tokenizer, self.eos = tokenizer, set(eos_token_id or [])
        self.file = file  # None: sys.stdout at the time of writing
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, new: torch.Tensor) -> None:
        t = int(new[0])
        if t in self.eos:
            return
        self.ids.append(t)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        out = self.file or sys.stdout
        out.write(text[len(self.printed):])
        out.flush()
        self.printed = text


class TokenIdStreamer:
    """Writes row 0's new token ids separated by spaces (a model without a tokenizer)."""

    def __init__(self, file: TextIO | None = None):
        self.file = file

    def __call__(self, new: torch.Tensor) -> None:
        print(int(new[0]), end=" ", flush=True, file=self.file or sys.stdout)


def per_token(stream: Callable[[torch.Tensor], object]
              ) -> Callable[[list[torch.Tensor]], None]:
    """``assisted_generate``'s stream from a ``generate``-style one: row 0's accepted
    tokens are passed on one at a time, each as a [1] tensor."""

    def accepted(rows: list[torch.Tensor]) -> None:
        for t in rows[0]:
            stream(t[None])

    return accepted
