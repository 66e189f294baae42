"""Unit constants and the one place where human-readable quantities become SI numbers.

Inside the simulator every quantity is SI: bytes, seconds, FLOP, bytes/s, FLOP/s. YAML may say
``600 GB/s``, ``200 Gb/s``, ``80 GiB``, ``1.5 us`` or ``989 TFLOPS``; :func:`parse_quantity`
converts such a string once, at the edge. Decimal prefixes (k, M, G, T, P) are powers of 1000,
binary prefixes (Ki, Mi, Gi, Ti) powers of 1024 (IEC 80000-13). A lower-case ``b`` is a bit.
"""
from __future__ import annotations

import math
import re

KB = 1e3
MB = 1e6
GB = 1e9
TB = 1e12
KiB = 2**10
MiB = 2**20
GiB = 2**30
TiB = 2**40
GFLOPS = 1e9
TFLOPS = 1e12
PFLOPS = 1e15
US = 1e-6
NS = 1e-9
MS = 1e-3
BITS_PER_BYTE = 8

_PREFIX = {
    "": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
    "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40,
}
# base unit -> (dimension, factor to SI)
_BASE = {
    "B": ("bytes", 1.0),
    "b": ("bytes", 1.0 / BITS_PER_BYTE),
    "B/s": ("bytes/s", 1.0),
    "b/s": ("bytes/s", 1.0 / BITS_PER_BYTE),
    "bps": ("bytes/s", 1.0 / BITS_PER_BYTE),
    "FLOPS": ("FLOP/s", 1.0),
    "FLOP/s": ("FLOP/s", 1.0),
    "OPS": ("FLOP/s", 1.0),
    "FLOP": ("FLOP", 1.0),
    "s": ("s", 1.0),
    "W": ("W", 1.0),
}
_TIME_PREFIX = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}

_QUANTITY = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-zµ/]*)\s*$")


class UnitError(ValueError):
    """A quantity string that cannot be read, or of the wrong dimension."""


def parse_quantity(value: object, dimension: str) -> float:
    """Return ``value`` in SI units of ``dimension`` ("bytes", "bytes/s", "FLOP/s", "FLOP", "s", "W").

    Plain numbers are taken to be SI already. Strings carry a unit: ``"450 GB/s"`` -> 4.5e11,
    ``"400 Gb/s"`` -> 5e10, ``"80 GiB"`` -> 85899345920, ``"2 us"`` -> 2e-6, ``"989 TFLOPS"`` -> 9.89e14.
    """
    if isinstance(value, bool):
        raise UnitError(f"expected a number or a quantity in {dimension}, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise UnitError(f"expected a finite quantity in {dimension}, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise UnitError(f"expected a number or a quantity in {dimension}, got {value!r}")
    match = _QUANTITY.match(value)
    if not match:
        raise UnitError(f"cannot read {value!r} as a quantity in {dimension}")
    number, unit = float(match.group(1)), match.group(2)
    if not math.isfinite(number):
        raise UnitError(f"expected a finite quantity in {dimension}, got {value!r}")
    if unit == "":
        return number
    if dimension == "s" and unit in _TIME_PREFIX:
        return number * _TIME_PREFIX[unit]
    for base, (dim, factor) in sorted(_BASE.items(), key=lambda kv: -len(kv[0])):
        if unit.endswith(base):
            prefix = unit[: -len(base)]
            if prefix in _PREFIX and dim == dimension:
                return number * _PREFIX[prefix] * factor
    raise UnitError(f"cannot read {value!r} as a quantity in {dimension} (unit {unit!r})")
