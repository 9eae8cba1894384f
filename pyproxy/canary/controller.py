"""The canary controller: Flagger's analysis loop as a state machine.

One :meth:`Controller.tick` is one run of Flagger's ``advanceCanary``
(pkg/controller/scheduler.go), in Flagger's order:

1. ``Initializing``: route everything to the primary subset → ``Initialized``.
2. ``Initialized``/``Waiting``: confirm-rollout hooks; all pass → ``Progressing``
   (nothing else that interval), any fails → ``Waiting``.
3. rollback hooks (``Progressing``/``Waiting``/``WaitingPromotion``): one
   answering 2xx rolls back at once.
4. ``Promoting``: all traffic to the canary subset → ``Finalising``;
   ``Finalising`` → ``Succeeded`` (post-rollout hooks).
5. failed checks ≥ ``threshold`` → roll back: all traffic to the primary
   subset, ``Failed``, post-rollout hooks.
6. no traffic on the canary yet (weight 0, no iteration): pre-rollout hooks,
   a failing one counts a failed check; otherwise the analysis: rollout hooks,
   then every metric over its window. Any failure (including no data) counts
   one failed check and stops this interval; failed checks are never reset
   by a later pass (Flagger's ``FailedChecks``).
7. the strategy advances: A/B (match rule to the canary, one iteration per
   interval), blue/green (iterations, then all traffic to the canary, then
   promotion), canary (confirm-traffic-increase hooks, then the weight grows
   by ``stepWeight``/``stepWeights`` until ``maxWeight``; at ``maxWeight``
   confirm-promotion hooks, then ``Promoting``).

The state lives in a JSON file beside the config
(``<config dir>/.canary-<namespace>.<name>.json``; a dotfile, which the
sidecars never read), rewritten atomically after every tick, so a restarted
controller resumes where it stopped. A lock file next to it (``flock``)
refuses a second controller for the same canary.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Protocol

from .mesh import RouteRejected, Routes
from .metrics import MetricError, MetricSource, NoData
from .resource import Canary, Webhook
from .webhooks import WebhookCaller

log = logging.getLogger("pyproxy.canary")

INITIALIZING = "Initializing"
INITIALIZED = "Initialized"
WAITING = "Waiting"
PROGRESSING = "Progressing"
WAITING_PROMOTION = "WaitingPromotion"
PROMOTING = "Promoting"
FINALISING = "Finalising"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
TERMINAL = (SUCCEEDED, FAILED)
HISTORY_LIMIT = 500


def status_value(phase: str) -> int:
    """Flagger's ``flagger_canary_status``: 0 running, 1 successful (or idle), 2 failed."""
    return {PROGRESSING: 0, FAILED: 2}.get(phase, 1)


class Router(Protocol):
    def set_routes(self, routes: Routes) -> None:
        """Make the mesh route by ``routes``; raises RouteRejected."""


@dataclass
class Check:
    name: str
    result: str  # pass | fail | no_data
    value: float | None
    message: str


@dataclass
class State:
    name: str
    namespace: str
    phase: str = INITIALIZING
    weight: int = 0  # the canary's share of the default route
    failed_checks: int = 0
    iterations: int = 0
    steps: int = 0  # VirtualService swaps
    message: str = ""
    checksum: str = ""
    updated: float = 0.0
    checks: list[dict] = field(default_factory=list)  # the latest analysis
    history: list[dict] = field(default_factory=list)  # events and analyses, oldest first

    def record(self, now: float, message: str, **extra: Any) -> None:
        self.message = message
        self.history.append({"t": round(now, 3), "phase": self.phase, "weight": self.weight,
                             "failed_checks": self.failed_checks, "message": message, **extra})
        del self.history[:-HISTORY_LIMIT]


class LockedError(RuntimeError):
    """Another controller holds this canary's lock."""


def state_path(config_dir: str, namespace: str, name: str) -> str:
    return os.path.join(config_dir, f".canary-{namespace}.{name}.json")


class StateStore:
    """The state file and the lock beside it."""

    def __init__(self, config_dir: str, namespace: str, name: str) -> None:
        self.path = state_path(config_dir, namespace, name)
        self.lock_path = self.path[: -len(".json")] + ".lock"
        self._lock: IO[str] | None = None

    def acquire(self) -> None:
        fh = open(self.lock_path, "a+")  # noqa: SIM115 - held open for the controller's lifetime
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise LockedError(f"another controller (pid {holder}) is running this canary "
                              f"(lock {self.lock_path})") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock = fh

    def release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def load(self) -> State | None:
        return read_state(self.path)

    def save(self, state: State) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(asdict(state), fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


def read_state(path: str) -> State | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable canary state: {exc}") from None
    known = set(State.__dataclass_fields__)
    return State(**{k: v for k, v in data.items() if k in known})


Observer = Callable[[State, list[Check]], None]


class Controller:
    """Flagger's analysis for one canary. Time, metrics, webhooks and the mesh
    are injected, so tests drive it tick by tick."""

    def __init__(self, canary: Canary, router: Router, metrics: MetricSource, webhook: WebhookCaller,
                 store: StateStore | None = None, clock: Callable[[], float] = time.time,
                 observer: Observer | None = None, restart: bool = False) -> None:
        self.canary = canary
        self.analysis = canary.analysis
        self.router = router
        self.metrics = metrics
        self.webhook = webhook
        self.store = store
        self.clock = clock
        self.observer = observer
        loaded = store.load() if store is not None and not restart else None
        self.resumed = loaded is not None
        self.state = loaded or State(canary.name, canary.namespace, checksum=canary.checksum)

    # -- helpers -----------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.state.phase in TERMINAL

    def _event(self, message: str, level: int = logging.INFO, **extra: Any) -> None:
        log.log(level, "%s: %s", self.canary.key, message)
        self.state.record(self.clock(), message, **extra)

    def _route(self, primary: int, canary: int, match: bool = False) -> bool:
        try:
            self.router.set_routes(Routes(primary, canary, match))
        except (RouteRejected, OSError) as exc:
            self._event(f"routing not changed: {exc}", logging.ERROR)
            return False
        self.state.steps += 1
        return True

    def _hooks(self, kind: str, phase: str) -> list[tuple[Webhook, str | None]]:
        return [(h, self.webhook(self.canary, h, phase)) for h in self.analysis.hooks(kind)]

    def _gate(self, kind: str, phase: str) -> bool:
        """Confirm-* gates: every hook must answer 2xx."""
        for hook, error in self._hooks(kind, phase):
            if error is not None:
                self._event(f"Halt advancement: {kind} webhook {hook.name} not approved: {error}")
                return False
        return True

    def resume(self) -> None:
        """After a restart: put the routes back as the state says (idempotent)."""
        st = self.state
        if st.phase in (INITIALIZING,):
            return
        if st.phase == FAILED or st.phase in (INITIALIZED, WAITING):
            self._route(100, 0)
        elif st.phase in (FINALISING, SUCCEEDED):
            self._route(0, 100)
        elif self.analysis.strategy == "ab" and st.iterations > 0:
            self._route(100, 0, match=True)
        else:
            self._route(100 - st.weight, st.weight)
        self._event(f"resumed in phase {st.phase} (weight {st.weight}, failed checks {st.failed_checks}, "
                    f"iterations {st.iterations})")
        self._save([])

    def _save(self, checks: list[Check]) -> None:
        self.state.updated = self.clock()
        if self.store is not None:
            self.store.save(self.state)
        if self.observer is not None:
            self.observer(self.state, checks)

    # -- the loop ------------------------------------------------------------------

    def tick(self) -> list[Check]:
        """One analysis interval. Returns the metric checks run (maybe none)."""
        checks: list[Check] = []
        try:
            self._advance(checks)
        finally:
            self._save(checks)
        return checks

    def _advance(self, checks: list[Check]) -> None:
        st, c, a = self.state, self.canary, self.analysis
        if st.phase in TERMINAL:
            return
        if c.suspend:
            self._event("skipping canary run as object is suspended")
            return
        # A reading every interval, also before the canary gets traffic: the
        # scraper's first window then starts before the first step.
        self.metrics.refresh(self.clock())
        if st.phase == INITIALIZING:
            if self._route(100, 0):
                st.phase = INITIALIZED
                self._event(f"Initialization done! {c.key}: all traffic to {c.primary_subset}")
            return
        if st.phase in (INITIALIZED, WAITING):
            if not self._gate("confirm-rollout", st.phase):
                st.phase = WAITING
                return
            if c.skip_analysis:
                if self._route(0, 100):
                    st.weight, st.phase = 100, SUCCEEDED
                    self._event(f"Promotion completed! Canary analysis was skipped for {c.key}")
                    self._hooks("post-rollout", SUCCEEDED)
                return
            st.phase, st.weight, st.failed_checks, st.iterations = PROGRESSING, 0, 0, 0
            self._event(f"New revision detected! Starting canary analysis for {c.key}")
            return
        if st.phase in (PROGRESSING, WAITING, WAITING_PROMOTION):
            for hook, error in self._hooks("rollback", st.phase):
                if error is None:
                    self._event(f"Rolling back {c.key} manual webhook invoked ({hook.name})", logging.WARNING)
                    self._rollback()
                    return
        if st.phase == PROMOTING:
            if self._route(0, 100):
                st.weight, st.phase = 100, FINALISING
                self._event(f"Routing all traffic to canary {c.canary_subset}")
            return
        if st.phase == FINALISING:
            st.phase = SUCCEEDED
            self._event(f"Promotion completed! {c.key}: {c.canary_subset} serves all traffic")
            self._post_rollout(SUCCEEDED)
            return
        if st.failed_checks >= a.threshold:
            self._event(f"Rolling back {c.key} failed checks threshold reached {st.failed_checks}",
                        logging.WARNING)
            self._rollback()
            return
        if st.weight == 0 and st.iterations == 0:
            self._event(f"Starting canary analysis for {c.key}")
            for hook, error in self._hooks("pre-rollout", st.phase):
                if error is not None:
                    st.failed_checks += 1
                    checks.append(Check(f"webhook {hook.name}", "fail", None, error))
                    self._event(f"Halt advancement pre-rollout check {hook.name} failed: {error}",
                                logging.WARNING, checks=[asdict(k) for k in checks])
                    return
        elif not self._analysis(checks):
            st.failed_checks += 1
            st.checks = [asdict(k) for k in checks]
            failed = next(k for k in checks if k.result != "pass")
            self._event(f"Halt {c.key} advancement: {failed.message}", logging.WARNING,
                        checks=st.checks)
            return
        if checks:
            st.checks = [asdict(k) for k in checks]
            self._event("Checks passed: " + ", ".join(k.message for k in checks), checks=st.checks)
        if a.strategy == "ab":
            self._ab()
        elif a.strategy == "bluegreen":
            self._blue_green()
        else:
            self._canary()

    def _analysis(self, checks: list[Check]) -> bool:
        for hook, error in self._hooks("rollout", self.state.phase):
            if error is not None:
                checks.append(Check(f"webhook {hook.name}", "fail", None, f"external check {hook.name} "
                                                                          f"failed: {error}"))
                return False
        now = self.clock()
        for m in self.analysis.metrics:
            try:
                value = self.metrics.value(m, self.canary, now)
            except NoData as exc:
                checks.append(Check(m.name, "no_data", None,
                                    f"waiting for data: no values found for metric {m.name}, probably "
                                    f"{self.canary.canary_subset} is not receiving traffic ({exc})"))
                continue
            except MetricError as exc:
                checks.append(Check(m.name, "fail", None, f"metric {m.name} query failed: {exc}"))
                continue
            if math.isnan(value):
                checks.append(Check(m.name, "no_data", None, f"no values found for metric {m.name}"))
                continue
            builtin = m.template is None and not m.query
            if builtin and m.name == "request-duration":
                # Flagger reads the p99 as whole milliseconds (time.Duration(int64(value))).
                value = float(math.trunc(value))
            unit = {"request-success-rate": "%", "request-duration": "ms"}.get(m.name, "") if builtin else ""
            violation = m.threshold_range.violation(value, unit)
            if violation is None:
                shown = f"{value:.0f}ms" if unit == "ms" else f"{value:.2f}{unit}"
                checks.append(Check(m.name, "pass", value, f"{m.name} {shown}"))
            else:
                # Flagger's wording: "success rate 98.69% < 99%", "request duration 1515ms > 500ms".
                what = {"request-success-rate": "success rate", "request-duration": "request duration"}.get(
                    m.name, m.name) if builtin else m.name
                checks.append(Check(m.name, "fail", value, f"{what} {violation}"))
        return all(k.result == "pass" for k in checks)

    # -- strategies ------------------------------------------------------------------

    def _next_step(self, weight: int) -> int:
        """Flagger's nextStepWeight."""
        a = self.analysis
        if a.step_weight > 0 or not a.step_weights:
            return a.step_weight
        room = 100 - weight
        if room == 0:
            return 1
        if weight == 0:
            return min(room, a.step_weights[0])
        for i, w in enumerate(a.step_weights[:-1]):
            if w == weight:
                return min(room, a.step_weights[i + 1] - weight)
        return room

    def _canary(self) -> None:
        st, a = self.state, self.analysis
        if st.weight < a.max_weight:
            if not self._gate("confirm-traffic-increase", st.phase):
                return
            weight = min(100, st.weight + self._next_step(st.weight))
            if self._route(100 - weight, weight):
                st.weight = weight
                self._event(f"Advance {self.canary.key} canary weight {weight}")
            return
        self._promote()

    def _ab(self) -> None:
        st, a = self.state, self.analysis
        if a.iterations > st.iterations:
            if self._route(100, 0, match=True):
                st.iterations += 1
                self._event(f"Advance {self.canary.key} canary iteration {st.iterations}/{a.iterations}")
            return
        self._promote()

    def _blue_green(self) -> None:
        st, a = self.state, self.analysis
        if a.iterations > st.iterations:
            st.iterations += 1
            self._event(f"Advance {self.canary.key} canary iteration {st.iterations}/{a.iterations}")
            return
        if not self._gate("confirm-promotion", st.phase):
            st.phase = WAITING_PROMOTION
            return
        if a.iterations == st.iterations:
            if self._route(0, 100):
                st.weight = 100
                st.iterations += 1
                self._event(f"Routing all traffic to canary {self.canary.canary_subset}")
            return
        st.phase = PROMOTING
        self._event(f"Promoting {self.canary.key}: {self.canary.canary_subset} passed the analysis")

    def _promote(self) -> None:
        st = self.state
        if not self._gate("confirm-promotion", st.phase):
            st.phase = WAITING_PROMOTION
            return
        st.phase = PROMOTING
        self._event(f"Promoting {self.canary.key}: {self.canary.canary_subset} passed the analysis")

    def _rollback(self) -> None:
        st = self.state
        if not self._route(100, 0):
            return  # stays in its phase: the next interval tries again
        st.weight, st.phase = 0, FAILED
        self._event(f"Canary failed! All traffic back to {self.canary.primary_subset}", logging.WARNING)
        self._post_rollout(FAILED)

    def _post_rollout(self, phase: str) -> None:
        for hook, error in self._hooks("post-rollout", phase):
            if error is not None:
                self._event(f"post-rollout webhook {hook.name} failed: {error}", logging.WARNING)

    def run(self, sleep: Callable[[float], object], interval: float, stop: Callable[[], bool]) -> str:
        """Tick every ``interval`` seconds until Succeeded/Failed or ``stop()``."""
        if self.resumed:
            self.resume()
        else:
            self._save([])
        next_at = self.clock()
        while not self.done and not stop():
            self.tick()
            next_at += interval
            delay = next_at - self.clock()
            if delay < 0:  # the tick overran: start the next one from now
                next_at, delay = self.clock(), 0.0
            sleep(delay)
        return self.state.phase
