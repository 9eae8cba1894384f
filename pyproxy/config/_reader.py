"""Typed, path-tracking access to one YAML document (internal to the loader).

Every accessor reports problems into a :class:`Report` with the exact field
path (``spec.http[0].route[1].weight``) and returns ``None`` (or an empty
value) instead of raising, so one pass over a document collects all of its
errors. ``None`` in the YAML (``key:`` with no value) counts as "not set",
as it does for Kubernetes.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import date

from ._duration import duration_ns
from .model import Diagnostic

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1

# Values visited per document: at least this many, and more for big files.
# YAML aliases share structure, so a small text can expand into millions of
# values when walked; without aliases a document cannot hold more values than
# its file has characters, so a budget of twice the file size (each value may
# be counted twice: as a list element and as a mapping) never stops real files.
MIN_NODE_BUDGET = 200_000

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_ONE_MS = 1_000_000


class BudgetExceeded(Exception):
    """A document expands (usually through YAML aliases) into too many values."""


class Report:
    """Diagnostics collected for one document."""

    __slots__ = ("budget", "doc", "errors", "file", "warnings")

    def __init__(self, file: str, doc: int | None, budget: int = MIN_NODE_BUDGET) -> None:
        self.file = file
        self.doc = doc
        self.errors: list[Diagnostic] = []
        self.warnings: list[Diagnostic] = []
        self.budget = budget

    def error(self, path: str, message: str) -> None:
        self.errors.append(Diagnostic(self.file, self.doc, path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(Diagnostic(self.file, self.doc, path, message))

    def spend(self, count: int = 1) -> None:
        self.budget -= count
        if self.budget < 0:
            raise BudgetExceeded


@dataclass(frozen=True, slots=True)
class Message:
    """The YAML field names of one Istio proto message: a strict list.

    ``parsed`` fields are read by pyproxy; ``ignored`` ones are valid Istio
    fields that pyproxy does not implement (one warning per occurrence).
    Anything else is an unknown field: an error, as in Istio (the API
    server's schema rejects it), because a misspelled field silently
    dropped can change what a rule matches (``uri: {prefx: /api}`` would
    match every request).

    ``shapes`` gives the message type of fields whose values are messages
    (or lists of messages). It is what lets a field pyproxy does not read
    (an ignored one, or a message used only as a shape) still be checked for
    unknown fields, so a typo inside an unimplemented block is reported as
    well. Parsed fields are checked by their parser (``Node.child``).
    """

    name: str
    parsed: frozenset[str]
    ignored: frozenset[str] = frozenset()
    shapes: Mapping[str, Message] = field(default_factory=dict, compare=False, hash=False)

    @property
    def known(self) -> frozenset[str]:
        return self.parsed | self.ignored


def message(name: str, parsed: str, ignored: str = "", **shapes: Message) -> Message:
    """A :class:`Message` from space-separated field names; keyword arguments
    are the message types of message-valued fields (``tls=CLIENT_TLS``)."""
    msg = Message(name, frozenset(parsed.split()), frozenset(ignored.split()), shapes)
    stray = set(shapes) - msg.known
    if stray:  # a programming error in a field list
        raise ValueError(f"{name}: shapes given for fields it does not have: {sorted(stray)}")
    return msg


NOT_IMPLEMENTED = "not implemented by pyproxy, ignored"


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def describe(value: object) -> str:
    """A short, safe description of a YAML value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        # str() of a huge int can itself raise (Python's int-to-str digit limit).
        return f"integer {value}" if value.bit_length() <= 64 else "a very large integer"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:40] + "..."
        return f"string {shown!r}"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, date):
        return "a date"
    if isinstance(value, (bytes, bytearray)):
        return "binary data"
    if isinstance(value, (set, frozenset)):
        return "a set"
    return f"a {type(value).__name__}"


def _quote_hint(value: object) -> str:
    # YAML turns unquoted 1, 1.10, yes, 2024-01-01 into non-strings.
    scalar = isinstance(value, (bool, int, float, date))
    return " (quote it to make it a string)" if scalar else ""


def is_dns1123_label(value: str) -> bool:
    return len(value) <= 63 and _DNS1123_LABEL.fullmatch(value) is not None


def range_message(lo: float | None, hi: float | None, value: float) -> str:
    # Limits that only exist because of the proto integer width are not worth
    # mentioning as a range: "must be >= 0" reads better than "between 0 and 2147483647".
    natural_hi = hi is not None and hi not in (INT32_MAX, UINT32_MAX, UINT64_MAX)
    if lo is not None and natural_hi:
        return f"must be between {lo} and {hi}"
    if lo is not None and value < lo:
        return f"must be >= {lo}"
    return f"must be <= {hi}"


def _unknown_field_message(key: str, msg: Message) -> str:
    known = msg.known
    camel = re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), key)
    guess = camel if camel != key and camel in known else None
    if guess is None:
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
        guess = close[0] if close else None
    hint = f" (did you mean {guess!r}?)" if guess else ""
    return f"unknown field {key!r} in {msg.name}{hint}"


def check_unknown_fields(rep: Report, path: str, value: object, msg: Message) -> None:
    """Report unknown fields in a value pyproxy does not otherwise read (an
    ignored field's message, or a list of them), recursively along
    ``msg.shapes``. Values of the wrong type are not reported: pyproxy does
    not use them."""
    items: list[tuple[str, object]]
    if isinstance(value, list):
        rep.spend(len(value))
        items = [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    else:
        items = [(path, value)]
    for item_path, item in items:
        if not isinstance(item, dict):
            continue
        rep.spend(1 + len(item))
        for key, sub in item.items():
            if not isinstance(key, str):
                rep.error(item_path, _non_string_field_message(key, msg))
            elif key not in msg.known:
                rep.error(join(item_path, key), _unknown_field_message(key, msg))
            elif sub is not None and key in msg.shapes:
                check_unknown_fields(rep, join(item_path, key), sub, msg.shapes[key])


def _non_string_field_message(key: object, msg: Message) -> str:
    return f"unknown field {describe(key)} in {msg.name} (field names are strings){_quote_hint(key)}"


class Node:
    """A YAML mapping at ``path`` that is an instance of an Istio message."""

    __slots__ = ("data", "path", "rep")

    def __init__(self, rep: Report, path: str, data: dict, msg: Message) -> None:
        rep.spend(1 + len(data))
        self.rep = rep
        self.path = path
        self.data = data
        self._check_fields(msg)

    def _check_fields(self, msg: Message) -> None:
        for key, value in self.data.items():
            if not isinstance(key, str):
                self.rep.error(self.path, _non_string_field_message(key, msg))
            elif key in msg.parsed:
                continue
            elif key in msg.ignored:
                if value is not None:
                    self.rep.warn(join(self.path, key), NOT_IMPLEMENTED)
                    shape = msg.shapes.get(key)
                    if shape is not None:
                        check_unknown_fields(self.rep, join(self.path, key), value, shape)
            else:
                self.rep.error(join(self.path, key), _unknown_field_message(key, msg))

    # -- basics -------------------------------------------------------------

    def at(self, key: str) -> str:
        return join(self.path, key)

    def get(self, key: str) -> object:
        return self.data.get(key)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def error(self, key: str, message: str) -> None:
        self.rep.error(self.at(key), message)

    def warn(self, key: str, message: str) -> None:
        self.rep.warn(self.at(key), message)

    def _missing(self, key: str, required: bool) -> None:
        if required:
            self.error(key, "is required")

    # -- scalars ------------------------------------------------------------

    def string(self, key: str, *, required: bool = False, nonempty: bool = False) -> str | None:
        value = self.data.get(key)
        if value is None:
            self._missing(key, required)
            return None
        if not isinstance(value, str):
            self.error(key, f"must be a string, got {describe(value)}{_quote_hint(value)}")
            return None
        if nonempty and not value:
            self.error(key, "must not be empty")
            return None
        return value

    def integer(
        self, key: str, *, lo: int | None = None, hi: int | None = INT32_MAX, required: bool = False
    ) -> int | None:
        value = self.data.get(key)
        if value is None:
            self._missing(key, required)
            return None
        return check_integer(self.rep, self.at(key), value, lo=lo, hi=hi)

    def number(self, key: str, *, required: bool = False) -> float | None:
        value = self.data.get(key)
        if value is None:
            self._missing(key, required)
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.error(key, f"must be a number, got {describe(value)}")
            return None
        try:
            result = float(value)
        except OverflowError:
            result = math.inf
        if math.isnan(result):
            self.error(key, "must be a number, got NaN")
            return None
        return result

    def boolean(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            self.error(key, f"must be true or false, got {describe(value)}")
            return None
        return value

    def duration(self, key: str, *, istio_min: bool = True) -> float | None:
        """A Go duration in seconds. ``istio_min`` applies Istio's check for
        timeouts and intervals: at least 1ms, whole milliseconds."""
        value = self.data.get(key)
        if value is None:
            return None
        try:
            ns = duration_ns(value)
        except ValueError as exc:
            self.error(key, str(exc))
            return None
        if istio_min and ns < _ONE_MS:
            self.error(key, "must be at least 1ms")
            return None
        if istio_min and ns % _ONE_MS:
            self.error(key, "only durations with millisecond precision are supported")
            return None
        return ns / 1e9

    def enum(self, key: str, allowed: Collection[str]) -> str | None:
        value = self.string(key)
        if value is None:
            return None
        if value not in allowed:
            self.error(key, f"must be one of {', '.join(allowed)}, got {value!r}")
            return None
        return value

    # -- containers ---------------------------------------------------------

    def child(self, key: str, msg: Message, *, required: bool = False) -> Node | None:
        value = self.data.get(key)
        if value is None:
            self._missing(key, required)
            return None
        if not isinstance(value, dict):
            self.error(key, f"must be a mapping, got {describe(value)}")
            return None
        # type(self): a subclass (the canary's Flagger reader) keeps its own rules below.
        return type(self)(self.rep, self.at(key), value, msg)

    def items(self, key: str) -> list[tuple[str, object]]:
        """The elements of a list field with their paths (``key[i]``)."""
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(key, f"must be a list, got {describe(value)}")
            return []
        self.rep.spend(len(value))
        base = self.at(key)
        return [(f"{base}[{i}]", item) for i, item in enumerate(value)]

    def children(self, key: str, msg: Message) -> list[Node]:
        """A list of messages; null or non-mapping elements are errors."""
        nodes = []
        for path, item in self.items(key):
            if isinstance(item, dict):
                nodes.append(type(self)(self.rep, path, item, msg))
            else:
                self.rep.error(path, f"must be a mapping, got {describe(item)}")
        return nodes

    def strings(self, key: str) -> tuple[str, ...]:
        result = []
        for path, item in self.items(key):
            if isinstance(item, str):
                result.append(item)
            else:
                self.rep.error(path, f"must be a string, got {describe(item)}{_quote_hint(item)}")
        return tuple(result)

    def entries(self, key: str) -> list[tuple[str, str, object]]:
        """The ``(path, key, value)`` entries of a map field with string keys."""
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, dict):
            self.error(key, f"must be a mapping, got {describe(value)}")
            return []
        self.rep.spend(len(value))
        base = self.at(key)
        result = []
        for k, v in value.items():
            if isinstance(k, str):
                result.append((join(base, k), k, v))
            else:
                self.rep.error(base, f"keys must be strings, got {describe(k)}{_quote_hint(k)}")
        return result

    def string_map(self, key: str) -> tuple[tuple[str, str], ...]:
        result = []
        for path, k, v in self.entries(key):
            if isinstance(v, str):
                result.append((k, v))
            else:
                self.rep.error(path, f"must be a string, got {describe(v)}{_quote_hint(v)}")
        return tuple(result)


def check_integer(rep: Report, path: str, value: object, *, lo: int | None, hi: int | None) -> int | None:
    """Validate an integer value found at ``path`` (bool is not an integer)."""
    if isinstance(value, bool) or not isinstance(value, int):
        rep.error(path, f"must be an integer, got {describe(value)}")
        return None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rep.error(path, range_message(lo, hi, value))
        return None
    return value
