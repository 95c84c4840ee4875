"""Batches of tokenised rows for the post-training recipes: packed or padded, in a
deterministic order.

**Packing.** Sequences are packed into one row per micro-batch: ``input_ids`` [1, total],
``cu_seqlens`` (int32 [n + 1]) marking where each sequence starts, labels ``-100`` on the
prompt tokens and on the last token of each sequence. The model attends within each
sequence only (``attention_varlen``) with positions restarting at 0, so every sequence gets
the logits it gets alone and no compute is spent on padding. For SFT, the examples are
first grouped into bins of at most ``seq_len`` tokens (best-fit decreasing, as TRL's
``bfd`` packing), and a micro-batch is ``batch_size`` bins; with ``packing=False`` it is
``batch_size`` examples padded to the longest (the baseline the benchmark compares).

**Order.** Micro-batch ``g = step * micro_per_step + index`` takes the items at positions
``g * per_batch ...`` of an endless sequence of epochs, each a permutation drawn from a
generator seeded by (seed, epoch): a pure function of (step, index), so a resumed run sees
exactly the batches it would have seen.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

import torch

from llmcore.data.examples import Encoded, EncodedPair

IGNORE = -100


def _seed_of(*parts) -> int:
    h = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of ``lengths`` grouped into bins whose lengths sum to at
    most ``capacity`` (each length must fit alone). Deterministic (ties by index)."""
    if any(n > capacity or n <= 0 for n in lengths):
        raise ValueError(f"every length must be in [1, {capacity}]")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin id), sorted
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
        else:
            room, b = free.pop(j)
            bins[b].append(i)
            if room - n > 0:
                bisect.insort(free, (room - n, b))
    return bins


def labels_of(seq: Encoded) -> list[int]:
    """Next-token labels of one sequence: ids[t + 1] where that token counts, else -100."""
    ids, mask = seq.ids, seq.mask
    return [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def packed_batch(seqs: Sequence[Encoded]) -> dict:
    """One packed row of ``seqs``: input_ids, labels [1, total], cu_seqlens, num_tokens."""
    ids, labels, cu = [], [], [0]
    for s in seqs:
        ids += s.ids
        labels += labels_of(s)
        cu.append(len(ids))
    return {"input_ids": torch.tensor([ids], dtype=torch.int64),
            "labels": torch.tensor([labels], dtype=torch.int64),
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32), "num_tokens": len(ids)}


def padded_batch(seqs: Sequence[Encoded], pad_id: int) -> dict:
    """``seqs`` right-padded to the longest: input_ids, labels [B, T] (-100 on padding),
    num_tokens (the real tokens)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.int64)
    labels = torch.full((len(seqs), t), IGNORE, dtype=torch.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s.ids)
        labels[i, :len(s)] = torch.tensor(labels_of(s))
    return {"input_ids": ids, "labels": labels, "num_tokens": sum(len(s) for s in seqs)}


class _Epochs:
    """Item positions -> item indices over endless seeded permutations of ``n`` items."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        if n <= 0:
            raise ValueError("no items to draw batches from")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._perm: dict[int, list[int]] = {}

    def __getitem__(self, pos: int) -> int:
        epoch, i = divmod(pos, self.n)
        if epoch not in self._perm:
            if len(self._perm) > 2:
                self._perm.clear()
            g = torch.Generator().manual_seed(_seed_of(self.seed, "epoch", epoch))
            self._perm[epoch] = (torch.randperm(self.n, generator=g).tolist() if self.shuffle
                                 else list(range(self.n)))
        return self._perm[epoch][i]


class SFTBatches:
    """Micro-batches of SFT examples (see the module doc); ``micro_per_step`` is
    grad_accum × world size (the loop asks for index ``rank * grad_accum + m``)."""

    def __init__(self, examples: Sequence[Encoded], batch_size: int, seq_len: int, seed: int,
                 micro_per_step: int, packing: bool = True, pad_id: int = 0):
        self.examples, self.batch_size, self.packing = list(examples), batch_size, packing
        self.micro_per_step, self.pad_id = micro_per_step, pad_id
        self.groups = (pack_bins([len(e) for e in self.examples], seq_len) if packing
                       else [[i] for i in range(len(self.examples))])
        self.order = _Epochs(len(self.groups), seed)

    def items(self, step: int, index: int) -> list[Encoded]:
        g = step * self.micro_per_step + index
        out = []
        for j in range(self.batch_size):
            out += [self.examples[i] for i in self.groups[self.order[g * self.batch_size + j]]]
        return out

    def batch(self, step: int, index: int) -> dict:
        seqs = self.items(step, index)
        return packed_batch(seqs) if self.packing else padded_batch(seqs, self.pad_id)


class PairBatches:
    """Micro-batches of ``batch_size`` preference pairs, packed into one row: the chosen
    sequences first, then the rejected (so the forward is one call); ``index`` [B] the
    pairs' positions in ``pairs`` (to look up cached reference log-probs), ``margin`` [B]
    when the rows carry one."""

    def __init__(self, pairs: Sequence[EncodedPair], batch_size: int, seed: int,
                 micro_per_step: int, shuffle: bool = True):
        self.pairs, self.batch_size, self.micro_per_step = list(pairs), batch_size, micro_per_step
        self.order = _Epochs(len(self.pairs), seed, shuffle)

    def batch(self, step: int, index: int) -> dict:
        g = step * self.micro_per_step + index
        idx = [self.order[g * self.batch_size + j] for j in range(self.batch_size)]
        return pair_batch(self.pairs, idx)


def pair_batch(pairs: Sequence[EncodedPair], idx: Sequence[int]) -> dict:
    """The packed batch of ``pairs[i] for i in idx`` (chosen then rejected)."""
    chosen = [pairs[i].chosen for i in idx]
    rejected = [pairs[i].rejected for i in idx]
    out = packed_batch(chosen + rejected)
    out["index"] = torch.tensor(list(idx), dtype=torch.int64)
    margins = [pairs[i].labels.get("margin") for i in idx]
    if all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in margins):
        out["margin"] = torch.tensor(margins, dtype=torch.float32)
    return out


def chunks(n: int, size: int) -> list[list[int]]:
    """[0, n) in consecutive chunks of at most ``size``."""
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


__all__ = ["IGNORE", "PairBatches", "SFTBatches", "chunks", "labels_of", "pack_bins",
           "packed_batch", "padded_batch", "pair_batch"]
