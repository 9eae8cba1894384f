"""``pyproxy canary``: progressive delivery with Flagger's analysis model.

A controller reads a Flagger ``Canary`` (``flagger.app/v1beta1``), checks the
canary subset's metrics every analysis interval and moves traffic by writing
one VirtualService into the mesh config directory that every sidecar watches.

Modules:

* :mod:`.resource`: Canary and MetricTemplate parsed into frozen objects.
* :mod:`.metrics`: metric sources (sidecar scrapes, Prometheus HTTP API).
* :mod:`.webhooks`: Flagger's webhooks (HTTP POST, Flagger's payload).
* :mod:`.mesh`: the owned VirtualService: generated, validated, swapped in.
* :mod:`.controller`: the state machine, its state file and its lock.
* :mod:`.cli`: ``pyproxy canary run`` and ``pyproxy canary status``.
"""
