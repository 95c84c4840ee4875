"""Exact and near deduplication: a normalised content hash, and MinHash with LSH.

**MinHash.** A document is the set of its word ``shingle``-grams (lower-cased,
whitespace-split). Each shingle is hashed once to 32 bits (the first four bytes of its
SHA-1, little-endian: datasketch's ``sha1_hash32``), and ``num_perm`` random permutations
of the hash space give ``num_perm`` minima, the signature. For two sets the chance that a
position agrees is their Jaccard similarity. The permutations are computed for all
shingles at once as a ``[shingles, num_perm]`` numpy array (as datatrove and text-dedup
do), not one shingle at a time.

Two permutation schemes, both bit-exact with ``datasketch.MinHash(num_perm, seed)``:

- ``"affine32"`` (datasketch's default since 2.0): the hash is mixed once by the
  MurmurHash3 finalizer, then ``a*h + b mod 2**32`` with odd ``a`` (a bijection, so the
  permutation adds no collisions);
- ``"legacy"`` (datasketch before 2.0, datatrove, text-dedup): ``(a*h + b) mod (2**61 - 1)``
  kept to 32 bits, with ``a*h`` wrapping at 2**64 as their uint64 arithmetic does.

**LSH.** The signature is cut into ``bands`` bands of ``rows`` values; two documents are
candidates when any band is equal. The chance of that for Jaccard ``s`` is
``1 - (1 - s**rows)**bands``, an S-curve whose midpoint is near ``(1/bands)**(1/rows)``.
:func:`optimal_param` picks (bands, rows) for a threshold as datasketch does: the pair
minimising the weighted areas of false positives below the threshold and false negatives
above it.

Defaults: 5-word shingles, 128 permutations, threshold 0.8. A candidate pair found by the
bands is then *verified*: it counts as a duplicate only if its signatures agree in at least
``threshold`` of the positions (the MinHash estimate of its Jaccard). Verification removes
the band test's false positives at the cost of one comparison each, so the bands are
chosen to favour recall, with weights (false positive 0.1, false negative 0.9): 14 bands
x 9 rows, whose S-curve midpoint is 0.75 (the equally weighted choice, 9 x 13 with
midpoint 0.84, is used without verification). On planted near duplicates (the test
``test_near_dedup_precision_recall_on_planted_pairs``) this gives precision 1.0 and recall
0.98; the misses are pairs within 0.02 of the threshold, where a 128-value estimate
(standard deviation about 0.035) cannot decide.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

try:
    import numpy as np
except ImportError:  # not a dependency of the package, only of the cleaning tools
    raise ImportError("the cleaning tools need numpy: pip install numpy "
                      "(or llmcore[clean])") from None

SCHEMES = ("affine32", "legacy")
_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64((1 << 32) - 1)


def normalise(text: str) -> str:
    """NFKC, lower case, runs of whitespace to one space, no leading/trailing space."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).lower()).strip()


def content_hash(text: str) -> bytes:
    """16 bytes of SHA-256 of :func:`normalise` (``text`` equal up to case, spacing and
    Unicode compatibility forms hash the same)."""
    return hashlib.sha256(normalise(text).encode("utf-8")).digest()[:16]


def shingles(text: str, n: int = 5) -> set[str]:
    """The set of word ``n``-grams of the lower-cased, whitespace-split text (a text of
    fewer than ``n`` words is one shingle; an empty text none)."""
    if n < 1:
        raise ValueError(f"shingle size must be >= 1, got {n}")
    words = text.lower().split()
    if len(words) <= n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def hash_shingles(grams: Iterable[str]) -> np.ndarray:
    """datasketch's ``sha1_hash32`` of each shingle's UTF-8 bytes, as uint32."""
    return np.fromiter((int.from_bytes(hashlib.sha1(g.encode("utf-8")).digest()[:4], "little")
                        for g in grams), dtype=np.uint32)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, a bijection that spreads structured inputs."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class MinHasher:
    """MinHash signatures (uint32, ``[num_perm]``) equal to datasketch's for the same
    ``num_perm``, ``seed`` and ``scheme``."""

    def __init__(self, num_perm: int = 128, seed: int = 1, scheme: str = "affine32",
                 shingle: int = 5, chunk: int = 4096):
        if num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {num_perm}")
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        self.num_perm, self.seed, self.scheme, self.shingle = num_perm, seed, scheme, shingle
        self.chunk = chunk  # shingles per [chunk, num_perm] block: bounds memory
        gen = np.random.RandomState(seed)  # datasketch draws its parameters this way
        if scheme == "legacy":
            ab = [(gen.randint(1, _MERSENNE, dtype=np.uint64),
                   gen.randint(0, _MERSENNE, dtype=np.uint64)) for _ in range(num_perm)]
            self.a, self.b = np.array(ab, dtype=np.uint64).T
        else:
            self.a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + \
                np.uint32(1)
            self.b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)

    def from_hashes(self, hashes: np.ndarray) -> np.ndarray:
        """The signature of a set given as its uint32 hashes (all ones for an empty set)."""
        sig = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        for i in range(0, len(hashes), self.chunk):
            h = hashes[i:i + self.chunk]
            if self.scheme == "legacy":
                # [n, 1] * [num_perm] -> [n, num_perm]; uint64 wraps as datasketch's does.
                p = (h.astype(np.uint64)[:, None] * self.a + self.b) % _MERSENNE & _MAX32
            else:
                p = _fmix32(h.astype(np.uint32))[:, None] * self.a + self.b
            np.minimum(sig, p.min(axis=0).astype(np.uint32), out=sig)
        return sig

    def __call__(self, text: str) -> np.ndarray:
        return self.from_hashes(hash_shingles(shingles(text, self.shingle)))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _integrate(f, lo: float, hi: float, n: int = 400) -> float:
    """Simpson's rule on ``n`` (even) intervals: exact enough for the smooth S-curves."""
    x = np.linspace(lo, hi, n + 1)
    w = np.ones(n + 1)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return float((hi - lo) / (3 * n) * (w * f(x)).sum())


def false_positive_area(threshold: float, bands: int, rows: int) -> float:
    """Integral over s in [0, threshold] of P(candidate | Jaccard s)."""
    return _integrate(lambda s: 1 - (1 - s**rows) ** bands, 0.0, threshold)


def false_negative_area(threshold: float, bands: int, rows: int) -> float:
    """Integral over s in [threshold, 1] of P(not candidate | Jaccard s)."""
    return _integrate(lambda s: (1 - s**rows) ** bands, threshold, 1.0)


def optimal_param(threshold: float, num_perm: int,
                  weights: tuple[float, float] = (0.5, 0.5)) -> tuple[int, int]:
    """(bands, rows), bands*rows <= num_perm, minimising the weighted false positive and
    false negative areas (datasketch's ``_optimal_param``)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    best, opt = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            err = weights[0] * false_positive_area(threshold, b, r) + \
                weights[1] * false_negative_area(threshold, b, r)
            if err < best:
                best, opt = err, (b, r)
    return opt


def implied_threshold(bands: int, rows: int) -> float:
    """Jaccard where the S-curve is steepest, ``(1/bands)**(1/rows)``: pairs above it are
    likely candidates, pairs below unlikely."""
    return (1.0 / bands) ** (1.0 / rows)


def candidate_probability(s: float, bands: int, rows: int) -> float:
    """Chance that two sets of Jaccard ``s`` share a band."""
    return 1 - (1 - s**rows) ** bands


class NearDuplicateIndex:
    """Streaming near-duplicate detection: :meth:`add` says whether a document is a near
    duplicate of one added before (and remembers it if not). ``bands``/``rows`` default
    to :func:`optimal_param` with ``weights`` (false positive, false negative): (0.1, 0.9)
    with ``verify``, else (0.5, 0.5).

    Memory is per kept document: ``bands`` 8-byte band keys in the band tables and, with
    ``verify``, the ``num_perm`` x 4-byte signature (about 3 KB a document in Python
    containers with the defaults); documents themselves are not kept.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5,
                 bands: int | None = None, rows: int | None = None, seed: int = 1,
                 scheme: str = "affine32", verify: bool = True,
                 weights: tuple[float, float] | None = None):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if (bands is None) != (rows is None):
            raise ValueError("give both bands and rows, or neither")
        if bands is None:
            weights = weights or ((0.1, 0.9) if verify else (0.5, 0.5))
            bands, rows = optimal_param(threshold, num_perm, weights)
        if bands < 1 or rows < 1 or bands * rows > num_perm:
            raise ValueError(f"bands x rows must be positive and at most num_perm "
                             f"({num_perm}), got {bands} x {rows}")
        self.threshold, self.bands, self.rows, self.verify = threshold, bands, rows, verify
        self.hasher = MinHasher(num_perm, seed, scheme, shingle)
        self.tables: list[dict[int, list[int]]] = [{} for _ in range(bands)]
        self.signatures: list[np.ndarray] = []

    def params(self) -> dict:
        return {"threshold": self.threshold, "num_perm": self.hasher.num_perm,
                "shingle": self.hasher.shingle, "bands": self.bands, "rows": self.rows,
                "implied_threshold": round(implied_threshold(self.bands, self.rows), 4),
                "scheme": self.hasher.scheme, "seed": self.hasher.seed, "verify": self.verify}

    def _keys(self, sig: np.ndarray) -> list[int]:
        r = self.rows
        return [int.from_bytes(hashlib.blake2b(sig[i * r:(i + 1) * r].tobytes(),
                                               digest_size=8).digest(), "little")
                for i in range(self.bands)]

    def add(self, text: str) -> tuple[bool, int | None]:
        """(is a near duplicate, index of the earlier kept document it matched)."""
        sig = self.hasher(text)
        keys = self._keys(sig)
        for table, key in zip(self.tables, keys, strict=True):
            for j in table.get(key, ()):
                if not self.verify or np.mean(self.signatures[j] == sig) >= self.threshold:
                    return True, j
        idx = len(self.signatures)
        self.signatures.append(sig if self.verify else np.empty(0, np.uint32))
        for table, key in zip(self.tables, keys, strict=True):
            table.setdefault(key, []).append(idx)
        return False, None
