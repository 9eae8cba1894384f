"""The one VirtualService the controller owns, written into the mesh config
directory that every sidecar watches.

The VirtualService is generated from the canary and from the VirtualService
already routing the host, if there is one (as Flagger takes over an existing
VirtualService): that one's other rules are kept, its default rule (the
first without ``match``) becomes the weighted primary/canary route, and for
A/B testing the canary's ``match`` rule is put before it. The generated
resource keeps the existing one's name and namespace, and its file
(``zz-canary-<name>.yaml``) sorts after the other files, so the loader's
"the file loaded later wins" rule replaces the original (each sidecar logs a
warning that it is defined twice, naming both files).

Every write is validated with pyproxy's own config loader, together with the
rest of the directory, before it is moved into place (a temporary dotfile,
which the sidecars never read, then ``os.replace``): a step is one file
swap, and a VirtualService the sidecars would reject is never written.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import yaml

from ..config.loader import expand_paths, load_paths
from ..config.model import DestinationRule, LoadedConfig, VirtualService
from .resource import Canary

log = logging.getLogger("pyproxy.canary")

AB_RULE_NAME = "pyproxy-canary-match"


class RouteRejected(Exception):
    """The generated VirtualService failed validation; nothing was written."""


@dataclass(frozen=True, slots=True)
class Routes:
    primary: int
    canary: int
    match: bool = False  # A/B testing: the match rule sends matching requests to the canary


def file_name(canary: Canary) -> str:
    return f"zz-canary-{canary.name}.yaml"


def same_host(name: str, canary: Canary) -> bool:
    host, ns = canary.host, canary.namespace
    return name in (host, f"{host}.{ns}", f"{host}.{ns}.svc", f"{host}.{ns}.svc.cluster.local")


class Mesh:
    """Reads the config directory and swaps in the owned VirtualService."""

    def __init__(self, config_dir: str, canary: Canary) -> None:
        self.config_dir = config_dir
        self.canary = canary
        self.path = os.path.join(config_dir, file_name(canary))
        self.tmp = os.path.join(config_dir, f".{file_name(canary)}.tmp")
        self.writes = 0

    # -- reading -------------------------------------------------------------

    def others(self) -> list[str]:
        """The directory's config files except the owned one."""
        return [f for f in expand_paths([self.config_dir]) if os.path.abspath(f) != os.path.abspath(self.path)]

    def load_others(self) -> LoadedConfig:
        return load_paths(self.others())

    def subset_labels(self, subset: str, config: LoadedConfig | None = None) -> dict[str, str]:
        """The pod labels of one subset of the canary's host (from its DestinationRule)."""
        config = config or self.load_others()
        for r in config.resources:
            if isinstance(r, DestinationRule) and same_host(r.host, self.canary):
                for s in r.subsets:
                    if s.name == subset:
                        return dict(s.labels)
        raise LookupError(f"no DestinationRule for host {self.canary.host!r} defines subset {subset!r} "
                          f"(in {self.config_dir})")

    def base(self, config: LoadedConfig | None = None) -> dict | None:
        """The raw VirtualService already routing the host for the mesh (or the
        canary's gateways), from the other files; None when there is none."""
        config = config or self.load_others()
        raw = {(src.file, src.doc): doc for src, doc in config.raw}
        wanted = set(self.canary.gateways) or {"mesh"}
        for r in config.resources:
            if not isinstance(r, VirtualService) or not any(same_host(h, self.canary) for h in r.hosts):
                continue
            gateways = set(r.gateways) or {"mesh"}
            if gateways & wanted:
                doc = raw.get((r.meta.source.file, r.meta.source.doc))
                if isinstance(doc, Mapping):
                    return copy.deepcopy(dict(doc))
        return None

    # -- generating ----------------------------------------------------------

    def destination(self, subset: str, weight: int) -> dict:
        return {"destination": {"host": self.canary.host, "subset": subset}, "weight": weight}

    def render(self, routes: Routes, base: dict | None) -> dict:
        c = self.canary
        default: dict[str, object] = {"route": [self.destination(c.primary_subset, routes.primary),
                             self.destination(c.canary_subset, routes.canary)]}
        for key, value in c.route_extras:
            default[key] = copy.deepcopy(value)
        if base is not None:
            doc = {"apiVersion": base.get("apiVersion", "networking.istio.io/v1"), "kind": "VirtualService",
                   "metadata": {k: v for k, v in (base.get("metadata") or {}).items()
                                if k in ("name", "namespace", "labels", "annotations")},
                   "spec": copy.deepcopy(base.get("spec") or {})}
            http = [r for r in doc["spec"].get("http") or [] if not (isinstance(r, dict)
                                                                     and r.get("name") == AB_RULE_NAME)]
            at = next((i for i, r in enumerate(http) if isinstance(r, dict) and not r.get("match")), None)
            if at is None:
                http.append(default)
                at = len(http) - 1
            else:
                kept = {k: v for k, v in http[at].items() if k not in ("route", "redirect", "directResponse")}
                http[at] = {**kept, **default}
        else:
            spec: dict = {"hosts": list(c.hosts)}
            if c.gateways:
                spec["gateways"] = list(c.gateways)
            doc = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                   "metadata": {"name": c.host.split(".")[0], "namespace": c.namespace}, "spec": spec}
            http = [default]
            at = 0
        if routes.match:
            rule: dict[str, object] = {"name": AB_RULE_NAME, "match": [copy.deepcopy(m) for m in c.analysis.match],
                    "route": [self.destination(c.primary_subset, 0), self.destination(c.canary_subset, 100)]}
            for key, value in c.route_extras:
                rule[key] = copy.deepcopy(value)
            http.insert(at, rule)
        doc["spec"]["http"] = http
        meta = doc.setdefault("metadata", {})
        annotations = dict(meta.get("annotations") or {})
        annotations["pyproxy.io/canary"] = f"{c.namespace}/{c.name}"
        meta["annotations"] = annotations
        return doc

    def text(self, routes: Routes, base: dict | None) -> str:
        c = self.canary
        header = (f"# Written by `pyproxy canary run` for Canary {c.namespace}/{c.name}: primary "
                  f"{c.primary_subset} {routes.primary}%, canary {c.canary_subset} {routes.canary}%"
                  f"{' (A/B match rule to the canary)' if routes.match else ''}.\n"
                  f"# The controller owns this file and replaces it at every step; edits are overwritten.\n")
        return header + yaml.safe_dump(self.render(routes, base), sort_keys=False, default_flow_style=False)

    # -- writing -------------------------------------------------------------

    def set_routes(self, routes: Routes) -> None:
        """Validate and swap in the VirtualService for ``routes``; RouteRejected when invalid."""
        config = self.load_others()
        text = self.text(routes, self.base(config))
        with open(self.tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            checked = load_paths([*self.others(), self.tmp])
            mine = [d for d in checked.errors if d.file == self.tmp]
            if mine or not any(src.file == self.tmp for src, _ in checked.raw):
                problems = "; ".join(str(d).replace(self.tmp, self.path) for d in mine) or "not loaded"
                raise RouteRejected(f"generated VirtualService rejected by the config loader: {problems}")
            os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
        self.writes += 1
        log.info("wrote %s: primary %s %d%%, canary %s %d%%%s", self.path, self.canary.primary_subset,
                 routes.primary, self.canary.canary_subset, routes.canary, " + A/B match" if routes.match else "")
