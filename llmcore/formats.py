"""Block-floating-point formats (docs/formats.md).

A :class:`BFPFormat` stores ``block_size`` consecutive elements along the last axis as
signed integer mantissas of ``mantissa_bits`` bits (sign included) that share one 8-bit
exponent (E8M0: the power of two, biased by 127; 255 marks a block that held Inf/NaN).

Quantising one block ``x[0..B)`` with ``b = mantissa_bits``::

    amax = max |x_i|                       (any Inf/NaN -> the block dequantises to NaN)
    e    = floor(log2(amax)), clamped to [-127, 127]   (all-zero block: e = -127)
    m_i  = round(x_i * 2**(b-2-e)), clamped to [-(2**(b-1)-1), 2**(b-1)-1]
    x_i ~= m_i * 2**(e-(b-2))

``rounding="nearest"`` rounds halves away from zero, ``"even"`` to even. This is the OCP
Microscaling scale rule. Formats of 4 or fewer mantissa bits are stored packed, two
elements per byte (element 2i in the low nibble).
"""

from __future__ import annotations

from dataclasses import dataclass

ROUNDINGS = ("nearest", "even")


@dataclass(frozen=True)
class BFPFormat:
    """A block-floating-point format: ``mantissa_bits`` (2..8, sign included) per element
    and one shared exponent per ``block_size`` elements along the last axis."""

    name: str
    mantissa_bits: int
    block_size: int

    def __post_init__(self):
        if not isinstance(self.mantissa_bits, int) or not 2 <= self.mantissa_bits <= 8:
            raise ValueError(f"mantissa_bits must be an int in [2, 8], got {self.mantissa_bits!r}")
        if not isinstance(self.block_size, int) or not 1 <= self.block_size <= 1024:
            raise ValueError(f"block_size must be an int in [1, 1024], got {self.block_size!r}")

    @property
    def packed(self) -> bool:
        """True when two mantissas share a byte (mantissa_bits <= 4)."""
        return self.mantissa_bits <= 4

    @property
    def max_mantissa(self) -> int:
        return (1 << (self.mantissa_bits - 1)) - 1

    @property
    def bits_per_element(self) -> float:
        """Storage cost in bits per element, the shared exponent included."""
        return (4 if self.packed else 8) + 8 / self.block_size

    def mantissa_cols(self, k: int) -> int:
        """Last-axis length of the stored mantissa tensor for ``k`` elements."""
        return (k + 1) // 2 if self.packed else k

    def exponent_cols(self, k: int) -> int:
        """Last-axis length of the exponent tensor for ``k`` elements."""
        return -(-k // self.block_size)

    def __str__(self) -> str:
        return self.name


PRESETS: dict[str, BFPFormat] = {
    f.name: f
    for f in (
        BFPFormat("mxint8", 8, 32),  # OCP Microscaling MXINT8
        BFPFormat("mxint4", 4, 32),  # 4-bit integer elements, MX scale rule
        BFPFormat("msfp16", 8, 16),  # MSFP-style: sign + 7-bit mantissa, block 16
        BFPFormat("msfp12", 4, 16),  # MSFP-style: sign + 3-bit mantissa, block 16
        BFPFormat("bfp16", 8, 8),  # small-block BFP
    )
}


def get_format(fmt: str | BFPFormat) -> BFPFormat:
    """Resolve a preset name (case-insensitive) or pass a :class:`BFPFormat` through."""
    if isinstance(fmt, BFPFormat):
        return fmt
    if isinstance(fmt, str):
        f = PRESETS.get(fmt.lower())
        if f is not None:
            return f
        raise ValueError(f"unknown BFP format {fmt!r}; presets: {', '.join(PRESETS)} "
                         "(or pass BFPFormat(name, mantissa_bits, block_size))")
    raise TypeError(f"format must be a preset name or a BFPFormat, got {type(fmt).__name__}")


def check_rounding(rounding: str) -> bool:
    """Validate ``rounding`` and return True for round-half-to-even."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding == "even"
