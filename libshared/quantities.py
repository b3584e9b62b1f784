"""Kubernetes resource quantities ("2", "4000", "1k", "1Ki", "500m", "1e3") as numbers.

Follows the grammar of Kubernetes' ``resource.Quantity`` (k8s.io/apimachinery
pkg/api/resource/quantity.go): a signed decimal number, then an optional binary suffix
(Ki Mi Gi Ti Pi Ei), decimal suffix (n u m "" k M G T P E) or decimal exponent (e3, E-2).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
}
_PATTERN = re.compile(
    r"^([+-]?(?:\d+\.?\d*|\.\d+))((?:[eE][+-]?\d+)|Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?$"
)


def parse_quantity(value: object) -> Decimal:
    """Parse a Kubernetes quantity (string or number) into a ``Decimal``.

    Raises ``ValueError`` naming the value when it is not a quantity (empty, non-numeric,
    unknown suffix, bool).
    """
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int | float):
        as_decimal = Decimal(str(value))
        if not as_decimal.is_finite():
            raise ValueError(f"not a finite quantity: {value!r}")
        return as_decimal
    if not isinstance(value, str):
        raise ValueError(f"not a quantity: {value!r}")
    match = _PATTERN.match(value.strip())
    if match is None:
        raise ValueError(f"not a quantity: {value!r}")
    number, suffix = match.group(1), match.group(2) or ""
    try:
        base = Decimal(number)
    except InvalidOperation as exc:
        raise ValueError(f"not a quantity: {value!r}") from exc
    try:
        if suffix in _BINARY:
            return base * _BINARY[suffix]
        if suffix[:1] in ("e", "E") and len(suffix) > 1:
            return base * (Decimal(10) ** int(suffix[1:]))
        return base * _DECIMAL[suffix]
    except ArithmeticError as exc:  # decimal.Overflow for exponents past the context's range
        raise ValueError(f"quantity out of range: {value!r}") from exc
