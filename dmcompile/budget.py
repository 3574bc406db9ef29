"""Size budgets of a mixed-precision build, parsed once into a typed :class:`Budget`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BudgetError

__all__ = ["Budget", "parse_budget"]

UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
KINDS = ("bits", "bytes", "bops")


@dataclass(frozen=True)
class Budget:
    """kind: bits (average weight bits over the allocated layers), bytes (stored weight bytes
    of the allocated layers, scales included) or bops (MACs x weight bits x activation bits).
    ``text``: what the user wrote (kept for manifests and messages)."""

    kind: str
    value: float
    text: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise BudgetError(f"budget kind must be one of {KINDS}, got {self.kind!r}")

    def __str__(self):
        return {"bits": f"{self.value:g} average weight bits", "bytes": f"{self.value / 1e6:.4g} MB of weights",
                "bops": f"{self.value:.4g} BOPs"}[self.kind]


def parse_budget(text: str) -> Budget:
    """'5.0bits', '20MB' (also B, KB, GB, KiB, MiB, GiB), 'BOPs=4e9'. Raises BudgetError."""
    if isinstance(text, Budget):
        return text
    s = str(text).strip()
    if m := re.fullmatch(r"([0-9.]+)\s*bits?", s, re.IGNORECASE):
        v = _number(m.group(1), text)
        if not 1 <= v <= 32:
            raise BudgetError(f"an average of {v} weight bits is out of range; use 2bits to 8bits")
        return Budget("bits", v, s)
    if m := re.fullmatch(r"([0-9.]+(?:e[0-9+]+)?)\s*([kmg]i?b|b)", s, re.IGNORECASE):
        return Budget("bytes", _number(m.group(1), text) * UNITS[m.group(2).upper()], s)
    if m := re.fullmatch(r"bops\s*=\s*([0-9.]+(?:e[+]?[0-9]+)?)", s, re.IGNORECASE):
        return Budget("bops", _number(m.group(1), text), s)
    raise BudgetError(f"cannot read budget {text!r}; write e.g. 5.0bits (average weight bits), 20MB (weight "
                      "bytes) or BOPs=4e9 (MACs x weight bits x activation bits)")


def _number(s: str, text) -> float:
    try:
        return float(s)
    except ValueError:
        raise BudgetError(f"cannot read the number in budget {text!r}; write e.g. 5.0bits or 20MB") from None


def span(values, fmt: str) -> str:
    """"a-b", or "a" when every value prints the same."""
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}-{hi}"
