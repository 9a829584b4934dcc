"""splitmix64 (Steele, Lea & Flood 2014) on int64 tensors: the counter-based hash behind every per-example random
choice (augmentation offsets and flips, dropout masks), computed on the device that holds the examples.

torch has no full uint64 arithmetic, so the uint64 algorithm runs in int64: additions and multiplications wrap
modulo 2^64 exactly like uint64's, xor is the same, and right shifts are made logical by masking. The values are
bit for bit those of the numpy uint64 reference (data_pipelines/order.py; tests/test_order.py compares them).
The functions only use tensor operators, so this module imports no torch.
"""

from __future__ import annotations

GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def as_int64(v: int) -> int:
    """A Python integer reduced modulo 2^64 into int64's range (what a wrapping uint64 would hold)."""
    return (v + 2**63) % 2**64 - 2**63


def shr(x, s: int):
    """Logical right shift of int64 (torch's >> is arithmetic on signed integers)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix(x):
    """splitmix64's finalizer; int64 multiplication wraps modulo 2^64 like the uint64 original."""
    x = (x ^ shr(x, 30)) * MIX1
    x = (x ^ shr(x, 27)) * MIX2
    return x ^ shr(x, 31)


def splitmix64(x):
    """One splitmix64 step: the golden-ratio increment, then the finalizer."""
    return mix(x + GOLDEN)


def umod(x, m: int):
    """x mod m, reading the int64 x as the uint64 it stands for (m > 0, m < 2^62)."""
    return ((shr(x, 1) % m) * 2 + (x & 1)) % m
