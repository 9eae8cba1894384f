"""Safe, never-raising YAML reading (internal to the loader).

Only the safe constructors are used (no ``!!python/...`` tags). Any failure
becomes a Diagnostic; documents read before a syntax error are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

from .model import Diagnostic

# libyaml is ~7x faster than the pure-Python parser; fall back when absent.
_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"
_DOCUMENT_START = re.compile(r"^---", re.MULTILINE)

# libyaml's composer recurses in C without a depth check and crashes the
# process on absurdly deep nesting, so such text is refused before composing.
MAX_DEPTH = 1000


@dataclass(slots=True)
class Document:
    index: int  # 0-based, counting every document the stream yields (empty ones too)
    data: object
    duplicate_keys: list[tuple[int, str]] = field(default_factory=list)  # (line, key)


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """A safe loader that remembers duplicate mapping keys (kubectl rejects
    them; PyYAML silently keeps the last value)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, str]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        # Fast path first: this runs for every mapping of every file.
        keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
        if len(set(keys)) != len(keys):
            self._record_duplicates(node)
        return super().construct_mapping(node, deep=deep)

    def _record_duplicates(self, node: yaml.MappingNode) -> None:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                ident = (key_node.tag, key_node.value)
                if ident in seen:
                    self.duplicates.append((key_node.start_mark.line + 1, str(key_node.value)[:60]))
                seen.add(ident)


def read_documents(text: str, file: str) -> tuple[list[Document], list[Diagnostic]]:
    """Parse every YAML document in ``text``; never raises."""
    too_deep = _too_deep(text, file)
    if too_deep is not None:
        return [], [too_deep]
    documents: list[Document] = []
    try:
        loader = _Loader(text)
    except Exception as exc:  # noqa: BLE001 - e.g. unencodable surrogates in the text
        return [], [Diagnostic(file, None, "", f"cannot read YAML: {_describe_error(exc)}")]
    try:
        while loader.check_data():
            data = loader.get_data()
            doc = Document(len(documents), data, loader.duplicates)
            loader.duplicates = []
            documents.append(doc)
    except Exception as exc:  # noqa: BLE001 - YAMLError, but also ValueError (bad dates), RecursionError...
        # A failure while reading the first document is a whole-file problem.
        doc_index = len(documents) if documents else None
        return documents, [Diagnostic(file, doc_index, "", f"invalid YAML: {_describe_error(exc)}")]
    finally:
        loader.dispose()
    return documents, []


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        if mark is not None:
            return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
        return problem
    if isinstance(exc, RecursionError):
        return "nesting is too deep"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def _too_deep(text: str, file: str) -> Diagnostic | None:
    """Refuse text nested deeper than MAX_DEPTH, cheaply in the common case."""
    # Upper bound on nesting: block nesting needs a new column (or "- "/"? "
    # on the same line; indentless sequences double it), flow nesting needs an
    # opening bracket in the same document (a "---" line ends any document,
    # flow collections included). Only a high bound costs an exact count.
    longest = max((len(line) for line in text.splitlines()), default=0)
    brackets = max((c.count("[") + c.count("{") for c in _DOCUMENT_START.split(text)), default=0)
    if 2 * (longest + 1) + brackets <= MAX_DEPTH:
        return None
    depth = 0
    doc = -1
    starts = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
    ends = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
    try:
        for event in yaml.parse(text, Loader=_BaseLoader):
            if isinstance(event, starts):
                depth += 1
                if depth > MAX_DEPTH:
                    where = doc if doc > 0 else None
                    line = event.start_mark.line + 1 if event.start_mark else "?"
                    return Diagnostic(
                        file, where, "", f"line {line}: nesting is deeper than {MAX_DEPTH} levels"
                    )
            elif isinstance(event, ends):
                depth -= 1
            elif isinstance(event, yaml.DocumentStartEvent):
                doc += 1
    except Exception:  # noqa: BLE001
        return None  # the real parse reports the syntax error, with its location
    return None
