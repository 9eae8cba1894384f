"""A picture of a canary run from its state file (matplotlib, the ``load`` extra).

    python -m pyproxy.canary.plot MESH_DIR/.canary-default.reviews.json run.png [--title TEXT]

Top: the canary's traffic weight over time, with the phase changes marked.
Bottom: the canary subset's success rate (and p99 latency, right axis) as
each analysis measured it; failed checks are red.
"""

from __future__ import annotations

import argparse
import sys

from .controller import read_state


def plot(state_path: str, out: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state = read_state(state_path)
    if state is None:
        raise SystemExit(f"{state_path}: no such state file")
    events = state.history
    if not events:
        raise SystemExit(f"{state_path}: the history is empty")
    t0 = events[0]["t"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True,
                                      gridspec_kw={"height_ratios": [1, 1.2]})
    xs = [e["t"] - t0 for e in events]
    top.step(xs, [e["weight"] for e in events], where="post", color="tab:blue", linewidth=2)
    top.set_ylabel(f"weight to {state.name} canary (%)")
    top.set_ylim(-5, 105)
    last_phase = ""
    for x, e in zip(xs, events, strict=True):
        if e["phase"] != last_phase:
            top.axvline(x, color="0.8", linewidth=0.8, zorder=0)
            top.annotate(e["phase"], (x, 100), rotation=90, fontsize=7, va="top", ha="right", color="0.35")
            last_phase = e["phase"]
    rate_ok: list[tuple[float, float]] = []
    rate_bad: list[tuple[float, float]] = []
    p99: list[tuple[float, float]] = []
    for x, e in zip(xs, events, strict=True):
        for check in e.get("checks", ()):
            if check["value"] is None:
                continue
            if check["name"] == "request-success-rate":
                (rate_ok if check["result"] == "pass" else rate_bad).append((x, check["value"]))
            elif check["name"] == "request-duration":
                p99.append((x, check["value"]))
    if rate_ok:
        bottom.plot(*zip(*rate_ok, strict=True), "o", color="tab:green", label="success rate (pass)")
    if rate_bad:
        bottom.plot(*zip(*rate_bad, strict=True), "x", color="tab:red", markersize=9,
                    label="success rate (failed check)")
    bottom.set_ylabel("canary success rate (%)")
    bottom.set_xlabel("seconds since the controller started")
    bottom.set_ylim(min([v for _, v in rate_ok + rate_bad] + [95]) - 3, 101)
    if p99:
        right = bottom.twinx()
        right.plot(*zip(*p99, strict=True), ".", color="tab:gray", label="p99 latency")
        right.set_ylabel("p99 latency (ms)", color="tab:gray")
    bottom.legend(loc="lower left", fontsize=8)
    top.set_title(title or f"{state.namespace}.{state.name}: {state.phase} (failed checks {state.failed_checks})")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyproxy.canary.plot", description=__doc__.splitlines()[0])
    p.add_argument("state")
    p.add_argument("out")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    plot(args.state, args.out, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
