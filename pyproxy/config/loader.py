"""Load Istio YAML (VirtualService, DestinationRule, ServiceEntry, WorkloadEntry,
Sidecar, Gateway, AuthorizationPolicy, RequestAuthentication, EnvoyFilter's rate-limit patches) from files
and directories into the typed model.

Loading never raises: every problem becomes a located :class:`Diagnostic`
(``FILE#N: spec.http[0].route[1].weight: must be >= 0``), and all problems
in all files are collected in one pass. Errors are what Istio would reject
(or what pyproxy cannot honour); warnings are things that load but may not
do what the author expects (unimplemented fields, unknown fields, other
kinds, deprecated names, overridden duplicates).

Documents with errors are left out of ``LoadedConfig.resources``; callers
should refuse a config whose ``errors`` is not empty.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._destination_rule import DESTINATION_RULE, parse_destination_rule
from ._duration import parse_duration
from ._envoy_filter import ENVOY_FILTER, parse_envoy_filter
from ._gateway import GATEWAY, parse_gateway
from ._peer_authentication import PEER_AUTHENTICATION, parse_peer_authentication
from ._reader import MIN_NODE_BUDGET, BudgetExceeded, Message, Node, Report, describe, join, message
from ._security import (
    AUTHORIZATION_POLICY,
    REQUEST_AUTHENTICATION,
    parse_authorization_policy,
    parse_request_authentication,
)
from ._service_entry import SERVICE_ENTRY, WORKLOAD_ENTRY, parse_service_entry, parse_workload_entry
from ._sidecar import SIDECAR, parse_sidecar
from ._virtual_service import VIRTUAL_SERVICE, parse_virtual_service
from ._yaml import read_documents
from .files import config_files
from .model import Diagnostic, LoadedConfig, Meta, Resource, Source

__all__ = ["ParseCache", "expand_paths", "load_paths", "load_text", "parse_duration"]

log = logging.getLogger(__name__)

API_GROUP = "networking.istio.io"
SECURITY_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
MAX_FILE_BYTES = 64 * 1024 * 1024

# Top-level fields of a Kubernetes object; "status" appears in `kubectl get -o yaml`.
OBJECT = message("object", "apiVersion kind metadata spec status")
# All of Kubernetes' ObjectMeta, so that only typos are reported; pyproxy uses
# name, namespace and labels.
OBJECT_META = message(
    "ObjectMeta",
    "name namespace labels annotations generateName selfLink uid resourceVersion generation "
    "creationTimestamp deletionTimestamp deletionGracePeriodSeconds ownerReferences finalizers "
    "managedFields clusterName",
)

Parser = Callable[[Meta, Node], Resource]


@dataclass(frozen=True, slots=True)
class _Kind:
    spec: Message
    parse: Parser
    # The apiVersions this kind is served at; the first one's group is the
    # kind's API group (a misspelt version of it is an error).
    api_versions: tuple[str, ...] = ("networking.istio.io/v1", "networking.istio.io/v1beta1",
                                     "networking.istio.io/v1alpha3")

    @property
    def group(self) -> str:
        return self.api_versions[0].partition("/")[0]


KINDS: dict[str, _Kind] = {
    "VirtualService": _Kind(VIRTUAL_SERVICE, parse_virtual_service),
    "DestinationRule": _Kind(DESTINATION_RULE, parse_destination_rule),
    "ServiceEntry": _Kind(SERVICE_ENTRY, parse_service_entry),
    "WorkloadEntry": _Kind(WORKLOAD_ENTRY, parse_workload_entry),
    "Sidecar": _Kind(SIDECAR, parse_sidecar),
    "Gateway": _Kind(GATEWAY, parse_gateway),
    "AuthorizationPolicy": _Kind(AUTHORIZATION_POLICY, parse_authorization_policy, SECURITY_VERSIONS),
    "RequestAuthentication": _Kind(REQUEST_AUTHENTICATION, parse_request_authentication, SECURITY_VERSIONS),
    "PeerAuthentication": _Kind(PEER_AUTHENTICATION, parse_peer_authentication, SECURITY_VERSIONS),
    # Only its rate-limit patches (see _envoy_filter.py); Istio serves it at v1alpha3 only.
    "EnvoyFilter": _Kind(ENVOY_FILTER, parse_envoy_filter, ("networking.istio.io/v1alpha3",)),
}


@dataclass(slots=True)
class _Loaded:
    """One valid resource, before de-duplication."""

    resource: Resource
    meta: Meta
    raw: dict
    path: str  # "" for a document, "items[i]" for an item of a List


@dataclass(slots=True)
class _Collector:
    errors: list[Diagnostic]
    warnings: list[Diagnostic]
    loaded: list[_Loaded]


@dataclass(frozen=True, slots=True)
class _FileResult:
    """Everything loading one file's text produced. It depends only on the
    file's path and bytes, so it can be reused while both stay the same."""

    digest: bytes
    errors: tuple[Diagnostic, ...]
    warnings: tuple[Diagnostic, ...]
    loaded: tuple[_Loaded, ...]


class ParseCache:
    """Per-file load results kept from one :func:`load_paths` call to the
    next, so a reload re-parses and re-validates only the files whose bytes
    changed (the rest of a large config is reused as the same objects).

    Keyed by path and a digest of the file's bytes, not by stat data: every
    file is still read on every load (cheap next to parsing), so an edit that
    keeps size and mtime is never missed. Only the files of the latest load
    are kept. Not thread-safe: one load at a time (the worker serialises
    reloads)."""

    def __init__(self) -> None:
        self._entries: dict[str, _FileResult] = {}
        # The latest load: files parsed and validated vs. reused unchanged.
        self.parsed = 0
        self.reused = 0
        self.parsed_total = 0
        self.reused_total = 0

    def stats(self) -> dict[str, int]:
        return {"files_parsed": self.parsed, "files_reused": self.reused,
                "files_parsed_total": self.parsed_total, "files_reused_total": self.reused_total}


# -- public API ------------------------------------------------------------------


def expand_paths(paths: Sequence[str]) -> list[str]:
    """The files :func:`load_paths` reads, in order (see ``files.py``: files
    as given and each directory's visible ``*.yaml``/``*.yml`` files, oldest
    modification first, then by path). Paths that do not exist or are not
    regular files are left out (load_paths reports them as errors)."""
    return [f.path for f in config_files(paths)[0]]


def load_paths(paths: Sequence[str], cache: ParseCache | None = None) -> LoadedConfig:
    """Load files and directories. Files are read oldest first (modification
    time, then path: ``files.config_files``), and a resource defined in
    several files is taken from the last: the most recently modified file
    wins, as if the files had been applied with ``kubectl apply`` in the
    order they were written.

    With a ``cache``, a file whose bytes are unchanged since the cache's
    previous load is not parsed or validated again: its resources,
    errors and warnings are reused. The result is the same either way."""
    found, problems = config_files(paths)
    files = [f.path for f in found]
    out = _Collector([Diagnostic(p.path, None, "", p.detail) for p in problems], [], [])
    read: list[str] = []
    kept: dict[str, _FileResult] = {}
    parsed = reused = 0
    for file in files:
        data = _read_bytes(file, out)
        if data is None:
            continue
        digest = hashlib.blake2b(data, digest_size=20).digest() if cache is not None else b""
        result = cache._entries.get(file) if cache is not None else None
        if result is not None and result.digest == digest:
            reused += 1
        else:
            text = _decode(file, data, out)
            if text is None:
                continue
            one = _Collector([], [], [])
            _load_file(text, file, one)
            result = _FileResult(digest, tuple(one.errors), tuple(one.warnings), tuple(one.loaded))
            parsed += 1
        read.append(file)
        kept[file] = result
        out.errors.extend(result.errors)
        out.warnings.extend(result.warnings)
        out.loaded.extend(result.loaded)
    if cache is not None:
        cache._entries = kept
        cache.parsed, cache.reused = parsed, reused
        cache.parsed_total += parsed
        cache.reused_total += reused
    return _finish(out, read)


def load_text(text: str, file: str = "<string>") -> LoadedConfig:
    """Load one file's content (for tests and fuzzing)."""
    out = _Collector([], [], [])
    _load_file(text, file, out)
    return _finish(out, [file])


# -- files ------------------------------------------------------------------------


def _read_bytes(file: str, out: _Collector) -> bytes | None:
    try:
        with open(file, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        out.errors.append(Diagnostic(file, None, "", f"cannot read file: {exc.strerror or exc}"))
        return None
    if len(data) > MAX_FILE_BYTES:
        out.errors.append(Diagnostic(file, None, "", f"file is larger than {MAX_FILE_BYTES // 2**20} MiB"))
        return None
    return data


def _decode(file: str, data: bytes, out: _Collector) -> str | None:
    try:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        out.errors.append(Diagnostic(file, None, "", f"not valid UTF-8 text (byte {exc.start})"))
        return None


def _load_file(text: str, file: str, out: _Collector) -> None:
    documents, problems = read_documents(text, file)
    out.errors.extend(problems)
    budget = max(MIN_NODE_BUDGET, 2 * len(text))
    for document in documents:
        rep = Report(file, document.index, budget)
        for line, key in document.duplicate_keys:
            rep.warn("", f"line {line}: duplicate key {key!r}; the last value is used (kubectl rejects this)")
        if document.data is not None:  # empty documents ("---" alone) are skipped
            _load_document(rep, document.data, out)
        out.errors.extend(rep.errors)
        out.warnings.extend(rep.warnings)


# -- documents --------------------------------------------------------------------


def _load_document(rep: Report, data: object, out: _Collector) -> None:
    kind = data.get("kind") if isinstance(data, dict) else None
    if isinstance(kind, str) and _is_list(kind) and isinstance(data, dict):
        _load_list(rep, data, kind, out)
    else:
        _load_guarded(rep, "", data, None, out)


def _is_list(kind: str) -> bool:
    # "List" from `kubectl get -o yaml`; "<Kind>List" from the API server.
    return kind == "List" or (kind.endswith("List") and kind[: -len("List")] in KINDS)


def _load_list(rep: Report, data: dict, kind: str, out: _Collector) -> None:
    items = data.get("items")
    if not isinstance(items, list):
        rep.error("items", f"must be a list, got {describe(items)}")
        return
    # Items of a typed list (VirtualServiceList) may omit kind and apiVersion.
    defaults = (
        None if kind == "List" else {"kind": kind[: -len("List")], "apiVersion": data.get("apiVersion")}
    )
    for i, item in enumerate(items):
        _load_guarded(rep, f"items[{i}]", item, defaults, out)


def _load_guarded(rep: Report, path: str, data: object, defaults: dict | None, out: _Collector) -> None:
    """Load one object; whatever happens, the outcome is diagnostics, not exceptions."""
    before = len(rep.errors)
    try:
        loaded = _load_object(rep, path, data, defaults)
    except BudgetExceeded:
        rep.error(path, "document too large: it expands to too many values (YAML aliases?)")
        return
    except Exception as exc:  # a bug in the loader must not take the proxy down
        log.exception("internal error while loading %s#%s %s", rep.file, rep.doc, path)
        rep.error(path, f"internal error while loading this document: {type(exc).__name__}: {exc}")
        return
    if loaded is not None and len(rep.errors) == before:
        out.loaded.append(loaded)


def _load_object(rep: Report, path: str, data: object, defaults: dict | None) -> _Loaded | None:
    if not isinstance(data, dict):
        rep.error(path, f"a Kubernetes object must be a mapping, got {describe(data)}")
        return None
    fields = {**defaults, **{k: v for k, v in data.items() if v is not None}} if defaults else data
    kind = fields.get("kind")
    if kind is None:
        rep.error(join(path, "kind"), "is required")
    elif not isinstance(kind, str):
        rep.error(join(path, "kind"), f"must be a string, got {describe(kind)}")
    name, namespace, labels, annotations = _metadata(rep, path, data)
    if not isinstance(kind, str) or name is None:
        return None
    api_version = fields.get("apiVersion")
    handler = KINDS.get(kind)
    if handler is None:
        if isinstance(api_version, str) and api_version.startswith(API_GROUP + "/"):
            # A kind of pyproxy's own API group that pyproxy does not know is a
            # typo (VirtualSevice) or a kind it does not implement; skipping a
            # misspelt one silently would drop routing rules.
            _unknown_networking_kind(rep, path, kind, namespace, name)
            return None
        rep.warn(
            path, f"kind {kind} ({_shown(api_version)}) is not used by pyproxy; {namespace}/{name} ignored"
        )
        return None
    if api_version is None:
        rep.error(join(path, "apiVersion"), f"is required (use {handler.api_versions[0]})")
        return None
    if not isinstance(api_version, str) or api_version not in handler.api_versions:
        supported = f"use {handler.api_versions[0]}" + "".join(
            f", {v.partition('/')[2]}" for v in handler.api_versions[1:-1]
        ) + (f" or {handler.api_versions[-1].partition('/')[2]}" if len(handler.api_versions) > 1 else "")
        if isinstance(api_version, str) and api_version.startswith(handler.group + "/"):
            rep.error(join(path, "apiVersion"), f"{api_version} is not a version of {kind} ({supported})")
        else:  # another API group's kind of the same name (gateway.networking.k8s.io Gateway)
            rep.warn(
                join(path, "apiVersion"),
                f"{_shown(api_version)} is not supported for {kind} ({supported}); {namespace}/{name} ignored",
            )
        return None
    Node(rep, path, data, OBJECT)  # reports unknown top-level fields
    source = Source(rep.file, rep.doc if rep.doc is not None else 0)
    meta = Meta(kind, str(api_version), name, namespace, source, labels, annotations)
    spec = data.get("spec")
    spec_path = join(path, "spec")
    if spec is None:
        spec = {}
    elif not isinstance(spec, dict):
        rep.error(spec_path, f"must be a mapping, got {describe(spec)}")
        return None
    resource = handler.parse(meta, Node(rep, spec_path, spec, handler.spec))
    return _Loaded(resource, meta, data, path)


# Kinds of networking.istio.io that pyproxy does not implement (Istio's
# pilot/pkg/config/kube/crd): documents of these kinds are skipped with a warning.
OTHER_NETWORKING_KINDS = frozenset(["WorkloadGroup", "ProxyConfig"])


def _unknown_networking_kind(rep: Report, path: str, kind: str, namespace: str, name: str) -> None:
    if kind in OTHER_NETWORKING_KINDS:
        rep.warn(path, f"kind {kind} is not used by pyproxy; {namespace}/{name} ignored")
        return
    close = difflib.get_close_matches(kind, sorted(KINDS) + sorted(OTHER_NETWORKING_KINDS), n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    rep.error(join(path, "kind"), f"{API_GROUP} has no kind {kind!r}{hint}")


def _shown(api_version: object) -> str:
    return api_version if isinstance(api_version, str) else f"apiVersion {describe(api_version)}"


Pairs = tuple[tuple[str, str], ...]


def _metadata(rep: Report, path: str, data: dict) -> tuple[str | None, str, Pairs, Pairs]:
    """(name, namespace, labels, annotations); name is None when missing
    (reported). Annotations keep only string values, without diagnostics:
    pyproxy reads a few of them and Kubernetes checks the rest."""
    md_path = join(path, "metadata")
    metadata = data.get("metadata")
    if metadata is None:
        rep.error(join(md_path, "name"), "is required")
        return None, "default", (), ()
    if not isinstance(metadata, dict):
        rep.error(md_path, f"must be a mapping, got {describe(metadata)}")
        return None, "default", (), ()
    md = Node(rep, md_path, metadata, OBJECT_META)
    name = md.string("name", required=True, nonempty=True)
    namespace = md.string("namespace") or "default"
    raw = metadata.get("annotations")
    annotations = tuple((k, v) for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)) \
        if isinstance(raw, dict) else ()
    return name, namespace, md.string_map("labels"), annotations


# -- de-duplication ----------------------------------------------------------------


def _finish(out: _Collector, files: list[str]) -> LoadedConfig:
    """Keep the last definition of each kind/namespace/name, in load order."""
    effective: dict[tuple[str, str, str], _Loaded] = {}
    for item in out.loaded:
        previous = effective.pop(item.meta.key, None)
        if previous is not None:
            out.warnings.append(_override_warning(previous, item))
        effective[item.meta.key] = item
    return LoadedConfig(
        resources=tuple(item.resource for item in effective.values()),
        errors=tuple(out.errors),
        warnings=tuple(out.warnings),
        files=tuple(files),
        raw=tuple((item.meta.source, item.raw) for item in effective.values()),
    )


def _where(item: _Loaded) -> str:
    return f"{item.meta.source} {item.path}" if item.path else str(item.meta.source)


def _override_warning(previous: _Loaded, item: _Loaded) -> Diagnostic:
    kind, namespace, name = item.meta.key
    if previous.meta.source.file == item.meta.source.file:
        rule = "the later document in the file wins"
    else:
        rule = f"{item.meta.source.file} wins (the most recently modified file, as with kubectl apply in that order)"
    return Diagnostic(
        item.meta.source.file,
        item.meta.source.doc,
        join(item.path, "metadata.name"),
        f"{kind} {namespace}/{name} is defined twice: {_where(previous)} and {_where(item)}; {rule}",
    )
