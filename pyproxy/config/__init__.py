"""Istio configuration: YAML files in, a frozen, validated model out.

``loader.load_paths`` reads files and directories into ``model.LoadedConfig``
(collect-all diagnostics: every problem in every file, each located as
``FILE#N: spec.path: message``); ``validate`` is ``pyproxy validate``;
``watch`` reloads on change.

Field lists are strict. Each Istio message is declared once with
``_reader.message(NAME, PARSED, IGNORED, **shapes)``: ``PARSED`` fields are
read by a parser, ``IGNORED`` ones are Istio fields pyproxy does not
implement (a warning when set), and any other field is an error ("unknown
field"), as Istio's schema rejects it. ``shapes`` names the message type of
message-valued fields, so blocks pyproxy does not read are still checked for
unknown fields.

To add a field to a kind pyproxy already reads: add its name to the message
(in ``_virtual_service.py``, ``_destination_rule.py``, ...), to ``IGNORED``
if pyproxy will not act on it, or to ``PARSED`` and read it in the parser
through the ``Node`` accessors (``node.child(key, MESSAGE)``,
``node.string(key)``, ...), which report type errors with their path. To
implement an ignored block (``trafficPolicy.tls``): move it from ``IGNORED``
to ``PARSED`` and parse it with ``node.child("tls", CLIENT_TLS)``.

To add a kind (``PeerAuthentication``, ``AuthorizationPolicy``): declare its
spec message and nested messages, write ``parse_KIND(meta, spec_node) ->
Resource`` (a frozen model class in ``model.py``), and register it in
``loader.KINDS`` (kind → spec message, parser and, when it is not
``networking.istio.io``, its ``api_versions`` such as
``("security.istio.io/v1", "security.istio.io/v1beta1")``).
Then add unit tests in tests/unit/test_config_loader.py: one valid document,
and one unknown field that must be an error.
"""
