"""Robustness: any input text yields a LoadedConfig (possibly with errors), never an exception."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyproxy.config.loader import load_text
from pyproxy.config.model import LoadedConfig
from tests.unit.test_config_loader import FULL_DR, FULL_VS, doc

# Hypothesis over the loader (~3,500 examples in the ci profile, a quarter in dev): the full run only.
pytestmark = pytest.mark.slow

FILE = "f.yaml"
# Sized to keep the whole file around 10 s on a shared 2-core machine.
# Budgets in units of the Hypothesis profile (tests/conftest.py): ci 100, dev 25.
N = settings.default.max_examples
FUZZ = settings(max_examples=4 * N, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID_DOCS = [
    doc("VirtualService", FULL_VS, name="reviews"),
    doc("DestinationRule", FULL_DR, name="reviews"),
    doc(
        "ServiceEntry",
        """
        hosts: [api.example.com]
        resolution: STATIC
        ports: [{number: 80, name: http, protocol: HTTP}]
        endpoints: [{address: 10.0.0.1, ports: {http: 8080}, labels: {a: b}}]
        """,
    ),
    doc("ServiceEntry", "hosts: [db.internal]\nresolution: DNS\nworkloadSelector: {labels: {app: db}}"),
    doc("WorkloadEntry", "address: 10.0.0.5\nports: {http: 8080}\nlabels: {app: vm}\nweight: 2"),
    doc("Sidecar", "workloadSelector: {labels: {app: a}}\noutboundTrafficPolicy: {mode: ALLOW_ANY}"),
]
VALID_OBJECTS = [yaml.safe_load(d) for d in VALID_DOCS]


def check(cfg: object) -> LoadedConfig:
    """The invariants every load must satisfy."""
    assert isinstance(cfg, LoadedConfig)
    for diag in (*cfg.errors, *cfg.warnings):
        assert diag.file == FILE
        assert diag.doc is None or (isinstance(diag.doc, int) and diag.doc >= 0)
        assert isinstance(diag.path, str)
        assert isinstance(diag.message, str) and diag.message
        assert "internal error" not in diag.message, str(diag)
        str(diag)
    assert cfg.ok == (not cfg.errors)
    assert len(cfg.raw) == len(cfg.resources)
    hash(cfg.resources)  # the model must stay hashable whatever the input
    return cfg


# -- strategies ---------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["5s", "0s", "-1s", "1h30m", "*", "mesh", "ALLOW_ANY", "a(", "", "v1", "unix:///x"]),
)
keys = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        ["hosts", "http", "route", "destination", "host", "weight", "match", "uri", "exact", "spec"]
    ),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)),
    max_leaves=25,
)
kinds = st.sampled_from(
    ["VirtualService", "DestinationRule", "ServiceEntry", "WorkloadEntry", "Sidecar", "List", "Gateway"]
)


def dump(obj: object) -> str:
    return yaml.safe_dump(obj, allow_unicode=True, sort_keys=False)


# -- hypothesis tests -----------------------------------------------------------------


@settings(FUZZ, max_examples=10 * N)
@given(st.text(max_size=300))
def test_random_text_never_raises(text: str) -> None:
    check(load_text(text, FILE))


@FUZZ
@given(st.lists(values, min_size=1, max_size=3))
def test_random_yaml_structures_never_raise(documents: list[object]) -> None:
    check(load_text(yaml.safe_dump_all(documents, allow_unicode=True), FILE))


@FUZZ
@given(kinds, st.sampled_from(["v1", "v1beta1", "v1alpha3", "v2"]), values, values)
def test_random_specs_of_istio_kinds_never_raise(
    kind: str, version: str, spec: object, items: object
) -> None:
    obj = {
        "apiVersion": f"networking.istio.io/{version}",
        "kind": kind,
        "metadata": {"name": "x"},
        "spec": spec,
    }
    if kind == "List":
        obj["items"] = items
    check(load_text(dump(obj), FILE))


def leaf_paths(obj: object, prefix: tuple = ()) -> list[tuple]:
    """Paths (tuples of keys/indexes) to every value inside ``obj``."""
    paths = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            paths += leaf_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            paths += leaf_paths(v, (*prefix, i))
    return paths


def replaced(obj: object, path: tuple, new: object) -> object:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        return {k: (replaced(v, rest, new) if k == head else v) for k, v in obj.items()}
    assert isinstance(obj, list)
    return [replaced(v, rest, new) if i == head else v for i, v in enumerate(obj)]


def deleted(obj: object, path: tuple) -> object:
    head, rest = path[0], path[1:]
    if not rest:
        if isinstance(obj, dict):
            return {k: v for k, v in obj.items() if k != head}
        return [v for i, v in enumerate(obj) if i != head]  # type: ignore[arg-type]
    if isinstance(obj, dict):
        return {k: (deleted(v, rest) if k == head else v) for k, v in obj.items()}
    return [deleted(v, rest) if i == head else v for i, v in enumerate(obj)]  # type: ignore[arg-type]


def other_type(value: object) -> st.SearchStrategy:
    """Values of a different type than ``value`` (a string where a list is expected, ...)."""
    return values.filter(lambda v: type(v) is not type(value))


@settings(max_examples=15 * N, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_valid_documents_never_raise(data: st.DataObject) -> None:
    original = data.draw(st.sampled_from(VALID_OBJECTS))
    mutated = original
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        paths = leaf_paths(mutated)
        path = data.draw(st.sampled_from(paths))
        action = data.draw(st.sampled_from(["retype", "delete", "random"]))
        current = _get(mutated, path)
        if action == "delete" and path:
            mutated = deleted(mutated, path)
        elif action == "retype":
            mutated = replaced(mutated, path, data.draw(other_type(current)))
        else:
            mutated = replaced(mutated, path, data.draw(values))
    text = dump(mutated)
    cfg = check(load_text(text, FILE))
    if text == dump(original):  # (1 == True in Python, so compare the YAML text)
        assert cfg.ok


def _get(obj: object, path: tuple) -> object:
    for step in path:
        obj = obj[step]  # type: ignore[index]
    return obj


@FUZZ
@given(st.data())
def test_byte_level_damage_to_valid_text_never_raises(data: st.DataObject) -> None:
    text = data.draw(st.sampled_from(VALID_DOCS))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        pos = data.draw(st.integers(min_value=0, max_value=len(text)))
        junk = data.draw(
            st.text(max_size=5) | st.sampled_from([":", "- ", "{", "]", "\t", "&a ", "*a", "!!", "\n  "])
        )
        cut = data.draw(st.integers(min_value=0, max_value=5))
        text = text[:pos] + junk + text[pos + cut :]
    check(load_text(text, FILE))


def test_valid_documents_used_for_mutation_are_valid() -> None:
    # Mutation tests are only meaningful if they start from documents that load cleanly.
    for text in VALID_DOCS:
        cfg = check(load_text(text, FILE))
        assert cfg.ok, [str(e) for e in cfg.errors]
        assert len(cfg.resources) == 1


# -- hand-picked nasty inputs --------------------------------------------------------------

BILLION_LAUGHS = """
a: &a ["x","x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]
"""


def _alias_fanout(width: int) -> str:
    """A small text whose rules expand to width**3 header matches through aliases."""
    headers = ", ".join(f"h{i}: *s" for i in range(width))
    matches = ", ".join(["*m"] * width)
    rules = ", ".join(["*r"] * width)
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: boom}\n"
        "status:\n  - &s {exact: x}\n"  # status: a known top-level field pyproxy does not read
        f"  - &m {{headers: {{{headers}}}}}\n"
        f"  - &r {{match: [{matches}], route: [{{destination: {{host: r}}}}]}}\n"
        f"spec:\n  hosts: [r]\n  http: [{rules}]\n"
    )


ALIAS_FANOUT = _alias_fanout(100)

NASTY = {
    "deep-flow-unclosed": "[" * 100_000,
    "deep-flow-closed": "[" * 5000 + "]" * 5000,
    "deep-block": "".join(" " * i + "- \n" for i in range(3000)),
    "deep-compact": "- " * 20_000 + "x\n",
    "billion-laughs": BILLION_LAUGHS,
    "python-object": "!!python/object:os.system {}\n",
    "python-name": "kind: !!python/name:os.system\n",
    "nul-bytes": "kind: Virtual\x00Service\n",
    "binary-junk": "".join(chr(c) for c in range(1, 256)) * 3,
    "surrogates": "kind: \ud800\n",
    "bom-and-controls": "\ufeff\x1b[31mkind: x\n",
    "huge-hex-int": "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\n"
    "spec: {hosts: [r], http: [{route: [{destination: {host: r}, weight: 0x" + "f" * 5000 + "}]}]}\n",
    "huge-decimal-int": "a: " + "9" * 5000 + "\n",
    "bad-date": "a: 2001-02-30\n",
    "non-string-keys": "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a}\n"
    "spec: {host: r, 1: x, [1, 2]: y, subsets: [{name: v1, labels: {3: x, true: y}}]}\n",
    "unhashable-key": "? [a, b]\n: c\n? {a: b}\n: d\n",
    "merge-keys": "base: &b {host: r}\nspec:\n  <<: *b\n  host: s\n",
    "set-and-omap": "a: !!set {x, y}\nb: !!omap [{x: 1}]\nc: !!binary aGVsbG8=\n",
    "tabs": "kind:\tVirtualService\n\tmetadata: {}\n",
    "many-docs": "---\n" * 5000,
    "kind-list-junk": "kind: List\nitems: [1, null, [], {kind: List, items: [{kind: VirtualService}]}]\n",
    "nan-percent": "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\n"
    "spec: {hosts: [r], http: [{fault: {abort: {httpStatus: 500, percentage: {value: .nan}}}, route: [{destination: {host: r}}]}]}\n",
    "inf-duration": "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\n"
    "spec: {hosts: [r], http: [{timeout: .inf, route: [{destination: {host: r}}]}]}\n",
    "alias-fanout": ALIAS_FANOUT,
}


@pytest.mark.parametrize("text", list(NASTY.values()), ids=list(NASTY))
def test_nasty_input_yields_diagnostics_not_exceptions(text: str) -> None:
    check(load_text(text, FILE))


def test_deep_nesting_is_refused_with_a_message() -> None:
    # What pyproxy guarantees: one whole-file error that says where and why,
    # nothing loaded, no crash. Who notices first (pyproxy's own depth check
    # or the YAML library's limit, which some PyYAML versions have) and its
    # exact wording are not part of it.
    for text in ("[" * 100_000, "[" * 5000 + "]" * 5000, "- " * 20_000 + "x\n"):
        cfg = check(load_text(text, FILE))
        assert cfg.resources == ()
        assert len(cfg.errors) == 1, [str(e) for e in cfg.errors]
        error = cfg.errors[0]
        assert (error.file, error.doc, error.path) == (FILE, None, "")
        assert "line 1" in error.message and "nesting" in error.message, error.message


def test_python_tags_never_execute(tmp_path: object) -> None:
    cfg = check(load_text("!!python/object/apply:builtins.exit [3]\n", FILE))
    assert not cfg.ok


def test_nan_percentage_and_infinite_duration_are_errors() -> None:
    assert not check(load_text(NASTY["nan-percent"], FILE)).ok
    assert not check(load_text(NASTY["inf-duration"], FILE)).ok


def test_alias_fanout_is_bounded() -> None:
    assert len(ALIAS_FANOUT) < 2000  # ... yet it expands to a million header matches
    cfg = check(load_text(ALIAS_FANOUT, FILE))
    assert [str(e) for e in cfg.errors] == [
        "f.yaml#0: document too large: it expands to too many values (YAML aliases?)"
    ]
    small = check(load_text(_alias_fanout(3), FILE))
    assert len(small.resources) == 1
    assert len(small.resources[0].http) == 3  # type: ignore[union-attr]


def test_budget_grows_with_the_file_so_big_real_documents_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyproxy.config import loader

    monkeypatch.setattr(loader, "MIN_NODE_BUDGET", 50)
    rules = "".join(
        f"  - match: [{{uri: {{prefix: /p{i}}}}}]\n    route: [{{destination: {{host: r}}}}]\n"
        for i in range(100)
    )
    text = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: big}\nspec:\n  hosts: [r]\n  http:\n"
        + rules
    )
    cfg = check(load_text(text, FILE))
    assert cfg.ok, [str(e) for e in cfg.errors]
    assert len(cfg.resources[0].http) == 100  # type: ignore[union-attr]
    assert not check(load_text(_alias_fanout(20), FILE)).ok  # 8000 matches from a ~300-byte text
