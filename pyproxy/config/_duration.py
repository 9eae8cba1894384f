"""Go-style duration strings ("1h30m", "0.5s", "300µs"), as Istio's YAML uses them."""

from __future__ import annotations

import re
from decimal import Decimal

_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign, accepted by Go
    "\u03bcs": 1_000,  # Greek small mu, accepted by Go
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
# One "<number><unit>" component. [0-9] rather than \d: \d would accept non-ASCII digits.
_COMPONENT = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_INT64_MAX = 2**63 - 1
_HINT = "use a duration like '5s', '100ms' or '1m30s'"


def duration_ns(value: object) -> int:
    """Parse a Go duration into integer nanoseconds (the unit Go and protobuf use).

    Raises ValueError with a message meant for the user. Negative durations are
    rejected: no Istio duration field accepts them.
    """
    if isinstance(value, bool) or not isinstance(value, str):
        kind = _kind(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # Istio rejects bare numbers: "5" is not "5s" (the unit is mandatory).
            raise ValueError(f"expected a duration string, got {kind}; {_HINT}")  # noqa: TRY004
        raise ValueError(f"expected a duration string, got {kind}")  # noqa: TRY004 - API promises ValueError
    negative = value.startswith("-")
    text = value[1:] if value.startswith(("-", "+")) else value
    if text == "0":  # Go special-cases a bare zero.
        return 0
    if not text:
        raise ValueError(f"empty duration; {_HINT}")
    total = Decimal(0)
    pos = 0
    while pos < len(text):
        m = _COMPONENT.match(text, pos)
        if m is None or not any(c.isdigit() for c in m.group(1)):
            if text[pos:].replace(".", "").isdigit():
                raise ValueError(f"invalid duration {value!r}: missing unit; {_HINT}")
            raise ValueError(f"invalid duration {value!r}; {_HINT}")
        number = m.group(1)
        if number.endswith("."):  # Go accepts "5.s"; Decimal does not.
            number += "0"
        total += Decimal(number) * _UNIT_NS[m.group(2)]
        pos = m.end()
    ns = int(total)  # truncates fractional nanoseconds, like Go
    if negative and ns:
        raise ValueError(f"negative duration {value!r} is not allowed")
    if ns > _INT64_MAX:
        raise ValueError(f"duration {value!r} is out of range (max about 292 years)")
    return ns


def parse_duration(value: object) -> float:
    """Parse a Go duration string into float seconds; raises ValueError with a clear message."""
    return duration_ns(value) / 1e9


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}" if value.bit_length() <= 64 else "a very large integer"
    if isinstance(value, float):
        return f"number {value!r}"
    return f"a {type(value).__name__}"
