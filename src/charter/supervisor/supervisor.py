"""The supervisor the daemon runs: checks on schedule, states with thresholds, restarts with backoff.

States of a service:

  unknown   not checked yet
  starting  (re)started; failing checks are retried, not acted on, for `restart.start_period`
  passing   `successes_before_passing` checks in a row passed
  critical  `failures_before_critical` checks in a row failed (or Charter's process exited)
  failed    the start limit was reached: no more automatic restarts. Sticky, as a systemd unit that hit
            its start limit: checks go on (a passing one shows in the reason and the receipt), but only
            the operator leaves it (`charter services restart`, `reset` or `start`)
  stopped   the operator stopped it (`charter services stop`); not checked, not restarted

Each service is checked every `interval` (default 300 s); while a change of state is pending (a
failure below the threshold, a start in progress) every `retry_interval` instead. Due checks run
concurrently under one semaphore (`supervisor.concurrency`); a service's check waits for the checks
of its dependencies that are in flight, so dependencies are checked first. A critical service is
restarted through its manager after the backoff of `policy.RestartPolicy`, but never before all of
its dependencies pass: it waits, and is re-checked as soon as they do. When the backoff ends, the
restart happens only if the service is still down: a pending restart is dropped when it passes
again, and the failing check is run once more right before the restart (it may have come back
during the backoff, e.g. restarted by launchd itself, with nobody checking).

Processes Charter runs start in dependency order (systemd's After= + Requires=): one with
`depends` starts only after each dependency's first passing check in this run. If that takes longer
than the dependency is given (its check timeout and retries, plus its start period if Charter runs
it), the dependent is reported `critical` (not started), and it still starts as soon as they pass.

Every change of state is an event on `charter.services.health` whose payload is the health receipt
`{service, status: ok|fail, run_id, generated_at, state, previous, reason, ...}`; every restart is
one on `charter.services.restarts`; reaching the start limit (and a critical-tier service going
critical) is one on `charter.services.alerts`. Subjects are fixed tokens, the label is in the
payload: a reverse-DNS label's dots would otherwise become subject tokens.

One view of health with the gateway: a `model` check *is* the router's deep probe (`Router.probe`),
so its outcome moves the backend's circuit breaker exactly as the router's own probes do; when a
breaker opens because of live traffic, the supervisor checks the backend's `managed_service` at
once instead of at its next interval; and when that service passes again after a restart, the
supervisor probes the backend so its circuit closes and traffic returns without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ulid import ULID

from charter.errors import CONFLICT, NOT_FOUND, CharterError
from charter.supervisor import launchers
from charter.supervisor.checks import CheckContext, CheckResult, run_check
from charter.supervisor.history import History
from charter.supervisor.manager import ManagedProcess
from charter.supervisor.policy import RestartPolicy, Thresholds
from charter.supervisor.specs import ServiceConfig, Spec, SupervisorConfig, levels

if TYPE_CHECKING:
    from charter.models.router import Router
    from charter.node import Node

log = logging.getLogger("charter.supervisor")

UNKNOWN, STARTING, PASSING, CRITICAL, FAILED, STOPPED = "unknown", "starting", "passing", "critical", "failed", "stopped"
HEALTH, RESTARTS, ALERTS = "charter.services.health", "charter.services.restarts", "charter.services.alerts"
Publish = Callable[[list[tuple[str, dict[str, Any]]]], Awaitable[None]]


def iso_now(ts: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if ts is None else ts, dt.UTC).astimezone().isoformat(timespec="seconds")


class Service:
    """One supervised service: its spec and everything the supervisor knows about it now."""

    def __init__(self, spec: Spec, level: int) -> None:
        cfg = spec.config
        self.spec: ServiceConfig = cfg
        self.source = spec.source
        self.label = cfg.label
        self.level = level
        self.state = UNKNOWN
        self.since = time.time()
        self.reason = "not checked yet"
        self.last_checked: float | None = None
        self.last: CheckResult | None = None
        self.thresholds = Thresholds(cfg.successes_before_passing, cfg.failures_before_critical)
        self.policy = RestartPolicy(cfg.restart)
        self.next_check = 0.0
        self.restart_at: float | None = None
        self.restart_attempt = 0
        self.restart_delay = 0.0
        self.restarting = False
        self.start_deadline: float | None = None
        self.blocked_by: str | None = None
        self.inflight: asyncio.Future[None] | None = None
        self.managed: ManagedProcess | None = None
        # The label whose failing check asked for the pending restart (a model check may restart the
        # backend's service): the restart happens only if that one is still down.
        self.restart_cause: str | None = None
        # Why it is to be started once its dependencies pass (dependency order at start and reload).
        self.awaiting: str | None = None
        # A check in this run found it working (a state restored from the database does not count):
        # what dependents wait for before they start or are restarted.
        self.fresh = False
        self.checks = self.checks_ok = self.restarts = 0

    @property
    def status(self) -> str:
        return "ok" if self.state == PASSING else ("unknown" if self.state == UNKNOWN else "fail")

    def receipt(self, run_id: str | None = None, **extra: Any) -> dict[str, Any]:
        """The health receipt: `{service, status: ok|fail, run_id, generated_at, ...}`."""
        body: dict[str, Any] = {
            "service": self.label, "status": "ok" if self.state == PASSING else "fail", "run_id": run_id,
            "generated_at": iso_now(), "state": self.state, "reason": self.reason, "name": self.spec.display_name,
            "tier": self.spec.tier, "check": self.spec.check.kind if self.spec.check else "process",
        }
        if self.last is not None:
            body["ms"] = round(self.last.ms, 2)
        body.update(extra)
        return body

    def view(self, now: float) -> dict[str, Any]:
        s = self.spec
        return {
            "label": self.label, "name": s.display_name, "state": self.state, "status": self.status,
            "reason": self.reason, "since": self.since, "last_checked": self.last_checked,
            "interval": s.interval, "tier": s.tier, "why": s.why, "category": s.category,
            "check": s.check.kind if s.check else "process", "manager": s.effective_manager,
            "depends": list(s.depends), "blocked_by": self.blocked_by, "awaiting_start": self.awaiting is not None,
            "port": s.port,
            "checks": self.checks, "checks_ok": self.checks_ok, "restarts": self.restarts,
            "restart_policy": self.policy.to_dict(now),
            "restart_in_s": round(max(self.restart_at - now, 0.0), 2) if self.restart_at is not None else None,
            "last": self.last.to_dict() if self.last else None,
            "managed": self.managed.to_dict() if self.managed else None, "source": self.source,
        }


class Supervisor:
    def __init__(self, specs: list[Spec], config: SupervisorConfig | None = None, *, home_root: Path | None = None,
                 db_path: Path | None = None, router: Router | None = None, publish: Publish | None = None,
                 managed_backends: dict[str, str] | None = None, synchronous: str = "normal") -> None:
        self.config = config or SupervisorConfig()
        self.home_root = home_root
        self.router = router
        self.publish = publish
        self.managed_backends = dict(managed_backends or {})  # backend name -> service label
        self.history = History(db_path, synchronous) if db_path is not None else None
        self.ctx = CheckContext(concurrency=self.config.concurrency, router=router, base_dir=home_root)
        self.services: dict[str, Service] = {}
        self._install(specs)
        self._sem = asyncio.Semaphore(self.config.concurrency)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._status_rows: dict[str, tuple[Any, ...]] = {}
        self._history_rows: list[tuple[Any, ...]] = []
        self._outbox: list[tuple[str, dict[str, Any]]] = []
        self._flush_lock = asyncio.Lock()
        self._last_prune = 0.0
        self._closing = False
        self.started = False

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def for_node(cls, node: Node) -> Supervisor:
        from charter.bus import envelope as envmod
        from charter.identity.registry import OPERATOR_ID
        from charter.supervisor.specs import load_specs

        cfg = node.config
        specs = load_specs(node.home, cfg)

        async def publish(events: list[tuple[str, dict[str, Any]]]) -> None:
            if len(events) == 1:
                await node.emit(*events[0])
                return
            envs = [envmod.seal(node.root_key, sender=OPERATOR_ID, subject=s, payload=p) for s, p in events]
            size = cfg.bus.max_batch
            for i in range(0, len(envs), size):
                for outcome in await node.publish_batch(envs[i:i + size]):
                    if outcome.error is not None:
                        log.warning("a service event was refused: %s", outcome.error)

        managed = {name: b.managed_service for name, b in cfg.models.backends.items() if b.managed_service}
        sup = cls(specs, cfg.supervisor, home_root=node.home.root, db_path=node.home.db_path,
                  router=node.gateway.router, publish=publish, managed_backends=managed, synchronous=cfg.bus.synchronous)
        node.state_providers["services"] = sup.state_snapshot
        node.metric_sources.append(sup.metrics)
        sup._hook_router()
        return sup

    def _install(self, specs: list[Spec]) -> None:
        depth = levels({s.label: s.config.depends for s in specs})
        for s in specs:
            self.services[s.label] = Service(s, depth[s.label])
        self.dependents: dict[str, list[str]] = {label: [] for label in self.services}
        for svc in self.services.values():
            for d in svc.spec.depends:
                self.dependents[d].append(svc.label)

    def _make_managed(self, svc: Service) -> ManagedProcess | None:
        if svc.spec.effective_manager != "charter":
            return None
        root = self.home_root or Path.cwd()
        return ManagedProcess(svc.spec, root / "run" / "services", root / "logs" / "services",
                              log_max_bytes=self.config.log_max_bytes, log_backups=self.config.log_backups,
                              on_exit=self._on_exit)

    def _hook_router(self) -> None:
        """A breaker opened by live traffic makes the supervisor look at the backend's service now."""
        router = self.router
        if router is None:
            return
        previous = router.on_health

        async def on_health(backend: str, state: str, reason: str) -> None:
            if previous is not None:
                await previous(backend, state, reason)
            if state == "open":
                self.poke_backend(backend)

        router.on_health = on_health

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.config.enabled or self.started:
            return
        self.started = True
        saved = await asyncio.to_thread(self.history.load) if self.history else {}
        now = time.monotonic()
        for svc in self.services.values():
            row = saved.get(svc.label)
            if row and row["state"] in (PASSING, CRITICAL, FAILED):
                svc.state, svc.since, svc.reason = row["state"], row["since"], row["detail"] or svc.reason
                svc.last_checked, svc.checks, svc.checks_ok, svc.restarts = (
                    row["last_checked"], row["checks"], row["checks_ok"], row["restarts"])
            svc.next_check = now
            svc.managed = self._make_managed(svc)
        await self._autostart(list(self.services.values()), "started with the daemon")
        await self._flush()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _autostart(self, batch: list[Service], why: str) -> None:
        """Start the processes Charter runs in topological order of `depends`; one whose dependencies
        have not passed a check yet waits for them (`_dependency_up` starts it), as systemd orders a
        unit After= and Requires= its dependencies: a dependent never races its database."""
        for svc in sorted(batch, key=lambda s: s.level):  # stable: spec order within a level
            if svc.managed is None or not svc.spec.autostart or svc.state == STOPPED:
                continue
            blocker = self._blocker(svc)
            if blocker is None:
                await self._start_managed(svc, why)
            else:
                self._await_dependencies(svc, why, blocker)

    def _blocker(self, svc: Service) -> Service | None:
        """The first dependency that is not known to work now (None: all of them do)."""
        for dep in svc.spec.depends:
            d = self.services.get(dep)
            if d is not None and not self._up(d):
                return d
        return None

    @staticmethod
    def _up(svc: Service) -> bool:
        """Works now, by a check in this run: passing, or `failed` (no more restarts) yet passing its checks."""
        return svc.fresh and svc.state in (PASSING, FAILED)

    def _start_bound(self, svc: Service) -> float:
        """How long a dependent waits before it is reported not started: what its dependencies are given
        to pass a first check (timeout and retries, plus the start period of a process Charter runs)."""
        bound = 0.0
        for dep in svc.spec.depends:
            d = self.services.get(dep)
            if d is None:
                continue
            c = d.spec
            given = c.timeout + c.retry * c.successes_before_passing
            if d.managed is not None:
                given += c.restart.start_period
            bound = max(bound, given)
        return bound

    def _await_dependencies(self, svc: Service, why: str, blocker: Service) -> None:
        svc.awaiting, svc.blocked_by = why, blocker.label
        reason = f"not started yet: waiting for {blocker.label} ({blocker.state}) to pass a check"
        if svc.state in (PASSING, STARTING):  # remembered from before the daemon's restart: not true now
            self._transition(svc, UNKNOWN, reason, str(ULID()))
        svc.reason = reason
        self._status(svc)
        self._spawn(self._await_deadline(svc, self._start_bound(svc)))

    async def _await_deadline(self, svc: Service, bound: float) -> None:
        """Past the bound, a dependent still waiting is reported `critical` (it is down); it still starts
        as soon as its dependencies pass."""
        await asyncio.sleep(bound)
        if self.services.get(svc.label) is not svc or svc.awaiting is None:
            return
        blocker = self._blocker(svc)
        if blocker is None:  # passed this very moment: _dependency_up starts it
            return
        self._transition(svc, CRITICAL, f"not started: {blocker.label} is {blocker.state} after {bound:g}s "
                                        f"(it starts once {blocker.label} passes)", str(ULID()))
        svc.blocked_by = blocker.label
        await self._flush()

    async def _start_after_dependencies(self, svc: Service, why: str) -> None:
        if self.services.get(svc.label) is not svc or svc.state == STOPPED or self._closing:
            svc.restarting = False
            return  # removed by a reload, or stopped by the operator, since it was due to start
        await self._start_managed(svc, why)
        await self._flush()

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5)
            self._task = None
        pending = list(self._tasks)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=max((s.spec.stop_timeout for s in self.services.values()), default=5) + 5)
        await asyncio.gather(*(s.managed.close() for s in self.services.values() if s.managed is not None),
                             return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._flush()
        await self.ctx.close()
        if self.history is not None:
            self.history.close()
            self.history = None
        self.started = False

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def wake(self) -> None:
        self._wake.set()

    # -- the schedule ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        while not self._closing:
            self._wake.clear()
            now = time.monotonic()
            due = [s for s in self.services.values() if s.inflight is None and not s.restarting
                   and s.state != STOPPED and s.awaiting is None and s.next_check <= now]
            if due:
                self._spawn(self.run_cycle(due))
            for s in self.services.values():
                if s.restart_at is not None and s.restart_at <= now and not s.restarting:
                    s.restart_at = None
                    self._spawn(self._restart(s, automatic=True))
            if self.history is not None and now - self._last_prune > 3600:
                self._last_prune = now
                self._spawn(asyncio.to_thread(self.history.prune, time.time() - self.config.history_retention))
            times = [s.next_check for s in self.services.values()
                     if s.inflight is None and s.state != STOPPED and s.awaiting is None]
            times += [s.restart_at for s in self.services.values() if s.restart_at is not None]
            wait = min(times, default=now + 60) - time.monotonic()
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that arrives as
            # the event is set, and close() would then wait for this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(max(wait, 0.005), 60.0)):
                    await self._wake.wait()

    async def run_cycle(self, due: list[Service] | None = None, run_id: str | None = None) -> str:
        """Check `due` (default: every service) concurrently, dependencies first; record and publish."""
        batch = list(self.services.values()) if due is None else due
        run_id = run_id or str(ULID())
        loop = asyncio.get_running_loop()
        futures = {s.label: loop.create_future() for s in batch}
        for s in batch:
            s.inflight = futures[s.label]
        try:
            await asyncio.gather(*(self._check_one(s, run_id, futures[s.label])
                                   for s in sorted(batch, key=lambda s: s.level)))
        finally:
            for s in batch:
                self._done(s, futures[s.label])
            await self._flush()
            self.wake()
        return run_id

    @staticmethod
    def _done(svc: Service, mine: asyncio.Future[None]) -> None:
        if not mine.done():
            mine.set_result(None)
        if svc.inflight is mine:
            svc.inflight = None

    async def _check_one(self, svc: Service, run_id: str, mine: asyncio.Future[None]) -> None:
        deps = [self.services[d].inflight for d in svc.spec.depends if d in self.services]
        waiting = [f for f in deps if f is not None and f is not mine and not f.done()]
        if waiting:
            await asyncio.wait(waiting)
        try:
            async with self._sem:
                result = await self._check(svc)
            self._observe(svc, result, run_id)
        finally:
            self._done(svc, mine)

    async def _check(self, svc: Service) -> CheckResult:
        if svc.spec.check is not None:
            return await run_check(svc.spec, self.ctx)
        m = svc.managed
        if m is not None and m.alive():
            return CheckResult(True, f"Charter's process is running (pid {m.pid})")
        if m is not None and m.last_exit is not None:
            return CheckResult(False, f"Charter's process is not running (last exit {m.last_exit})")
        return CheckResult(False, "Charter's process is not running")

    # -- what a result means -------------------------------------------------------------------

    def _observe(self, svc: Service, result: CheckResult, run_id: str, *, exited: bool = False) -> None:
        now = time.time()
        svc.last, svc.last_checked = result, now
        svc.checks += 1
        svc.checks_ok += result.ok
        try:
            self._apply(svc, result, run_id, exited)
        finally:
            self._history_rows.append((svc.label, now, "check", svc.state, "ok" if result.ok else "fail",
                                       result.detail[:500], run_id, round(result.ms, 3)))
            self._status(svc)
            self._write_receipt(svc, run_id)

    def _apply(self, svc: Service, result: CheckResult, run_id: str, exited: bool) -> None:
        mono = time.monotonic()
        if svc.state == STOPPED:
            return
        svc.thresholds.observe(result.ok)
        svc.next_check = mono + svc.spec.interval
        if result.ok:
            svc.policy.passing(mono)
            if svc.state == FAILED:
                # Sticky, as systemd's start-limit-hit: a service that flaps outside Charter must not earn
                # a fresh burst of restarts each time it briefly passes. Its health still shows.
                svc.reason = f"{svc.reason.split(' | last check')[0]} | last check passed: {result.detail}"
            elif svc.state != PASSING:
                if svc.thresholds.passing:
                    self._transition(svc, PASSING, result.detail, run_id)
                else:
                    svc.next_check = mono + svc.spec.retry
            else:
                svc.reason = result.detail
            if not svc.fresh and svc.thresholds.passing and svc.state in (PASSING, FAILED):
                svc.fresh = True
                self._dependency_up(svc)
        else:
            svc.policy.not_passing()
            starting = svc.state == STARTING and svc.start_deadline is not None and mono < svc.start_deadline
            if starting and not exited:
                svc.reason = f"starting: {result.detail}"
                svc.next_check = min(mono + svc.spec.retry, svc.start_deadline)  # type: ignore[type-var]
            elif svc.state == FAILED:
                svc.reason = f"{svc.reason.split(' | last check')[0]} | last check: {result.detail}"
                if svc.thresholds.critical or exited:
                    svc.fresh = False
            elif svc.thresholds.critical or exited or svc.state == STARTING:
                self._transition(svc, CRITICAL, result.detail, run_id)
                target = self._target(svc)
                self._want_restart(target, result.detail, run_id, cause=svc)
                if target is not svc or svc.blocked_by:
                    svc.next_check = mono + svc.spec.retry  # its fix is under way elsewhere: look again soon
            else:
                svc.next_check = mono + svc.spec.retry

    def _target(self, svc: Service) -> Service:
        """What to restart when `svc` fails: a model check's backend may name its managed service."""
        c = svc.spec.check
        if c is not None and c.kind == "model" and c.backend in self.managed_backends:
            target = self.services.get(self.managed_backends[c.backend])
            if target is not None:
                return target
        return svc

    def _transition(self, svc: Service, new: str, reason: str, run_id: str | None, **extra: Any) -> None:
        old = svc.state
        svc.reason = reason
        if old == new:
            return
        svc.state, svc.since = new, time.time()
        if new != PASSING:
            svc.fresh = False
        if new in (PASSING, STOPPED):
            svc.start_deadline = None
            svc.blocked_by = None
        if new == PASSING:
            self._drop_pending_restart(svc)
        self._history_rows.append((svc.label, svc.since, "state", new, svc.status, reason[:500], run_id, None))
        self._outbox.append((HEALTH, svc.receipt(run_id, previous=old, **extra)))
        log.info("service %s: %s -> %s (%s)", svc.label, old, new, reason)
        if new == CRITICAL and svc.spec.tier == "critical":
            self._alert(svc, f"critical service {svc.label} is down: {reason}", run_id)
        if new == PASSING:
            for backend, label in self.managed_backends.items():
                if label == svc.label:
                    self._backend_service_up(svc, backend)
        self._status(svc)

    def _drop_pending_restart(self, svc: Service) -> None:
        """It passes again: the restart its failure asked for (of itself, or of the service running its
        backend) is no longer wanted. Without this, a service that came back during its backoff (a check
        by the operator, a router poke, an interval shorter than the backoff) was still kicked."""
        for target in {svc, self._target(svc)}:
            if target.restart_at is not None and (target.restart_cause or target.label) == svc.label:
                target.restart_at = target.restart_cause = None
                if target is not svc and target.state == CRITICAL:
                    target.reason = f"{svc.label} passes again; restart cancelled"

    def _alert(self, svc: Service, reason: str, run_id: str | None) -> None:
        self._history_rows.append((svc.label, time.time(), "alert", svc.state, svc.status, reason[:500], run_id, None))
        self._outbox.append((ALERTS, svc.receipt(run_id, alert=reason)))

    def _backend_service_up(self, svc: Service, backend: str) -> None:
        """The service running a gateway backend passes again: probe the backend now, so its circuit
        closes and traffic returns without waiting for the router's next probe."""
        watchers = [s for s in self.services.values() if s is not svc and s.spec.check is not None
                    and s.spec.check.kind == "model" and s.spec.check.backend == backend]
        if watchers:
            mono = time.monotonic()
            for s in watchers:  # their check is the probe
                s.next_check = min(s.next_check, mono)
            self.wake()
        elif self.router is not None and backend in self.router.breakers and self.router.breakers[backend].state != "closed":
            own = svc.spec.check
            if own is None or own.kind != "model":
                self._spawn(self.router.probe(backend))

    def _dependency_up(self, svc: Service) -> None:
        """A dependency works (again): dependents waiting to start start now if all theirs do; the others
        are re-checked now (and restarted if need be)."""
        mono = time.monotonic()
        for label in self.dependents.get(svc.label, []):
            d = self.services[label]
            if d.awaiting is not None:
                if self._blocker(d) is None:
                    why, d.awaiting, d.blocked_by = d.awaiting, None, None
                    d.restarting = True  # from now until its process is spawned: not due for a check
                    self._spawn(self._start_after_dependencies(d, f"{why} once {', '.join(d.spec.depends)} passed"))
                continue
            if d.blocked_by == svc.label or d.state in (CRITICAL, UNKNOWN):
                d.blocked_by = None
                d.next_check = mono
        self.wake()

    def _want_restart(self, svc: Service, reason: str, run_id: str | None, *, cause: Service | None = None) -> None:
        if svc.state in (FAILED, STOPPED) or svc.restart_at is not None or svc.restarting or svc.awaiting is not None:
            return
        if svc.state == STARTING and svc.start_deadline is not None and time.monotonic() < svc.start_deadline:
            return  # just (re)started: give it its start period
        if svc.spec.effective_manager == "none":
            return
        for dep in svc.spec.depends:
            d = self.services[dep]
            if not self._up(d):
                svc.blocked_by = dep
                svc.reason = f"{reason.split(' | waiting for ')[0]} | waiting for {dep} ({d.state}) before a restart"
                return
        svc.blocked_by = None
        decision = svc.policy.decide(time.monotonic())
        if not decision.restart:
            self._transition(svc, FAILED, decision.reason, run_id)
            self._alert(svc, f"{svc.label} failed: {decision.reason}; not restarted automatically again until "
                             f"`charter services restart {svc.label}` (or `reset`)", run_id)
            return
        svc.restart_at = time.monotonic() + decision.delay
        svc.restart_cause = (cause or svc).label
        svc.restart_attempt, svc.restart_delay = decision.attempt, decision.delay
        self.wake()

    # -- acting ----------------------------------------------------------------------------------

    async def _start_managed(self, svc: Service, why: str) -> None:
        assert svc.managed is not None
        run_id = str(ULID())
        svc.restarting = True  # not checked (nor restarted) while its process is being spawned
        try:
            pid = await svc.managed.start()
        except OSError as exc:
            svc.restarting = False
            self._transition(svc, CRITICAL, f"could not start: {exc}", run_id)
            self._want_restart(svc, str(exc), run_id)
            return
        finally:
            svc.restarting = False
        svc.thresholds.ok_run = svc.thresholds.fail_run = 0
        svc.start_deadline = time.monotonic() + svc.spec.restart.start_period
        self._transition(svc, STARTING, f"{why}: pid {pid}", run_id)
        svc.next_check = time.monotonic() + min(svc.spec.retry, 1.0)
        self.wake()

    async def _restart(self, svc: Service, *, automatic: bool) -> dict[str, Any]:
        run_id = str(ULID())
        cause = self.services.get(svc.restart_cause or svc.label, svc)
        svc.restart_cause = None
        if automatic:
            if svc.state in (STOPPED, FAILED) or svc.awaiting is not None or cause.state != CRITICAL:
                return {"restarted": False, "reason": f"{cause.label} is {cause.state}: no restart needed"}
            for dep in svc.spec.depends:
                d = self.services[dep]
                if not self._up(d):  # it went down since the restart was scheduled: wait for it
                    svc.blocked_by = dep
                    svc.reason = f"{svc.reason.split(' | waiting for ')[0]} | waiting for {dep} ({d.state}) before a restart"
                    svc.next_check = time.monotonic() + svc.spec.retry
                    self._status(svc)
                    return {"restarted": False, "reason": f"waiting for {dep}"}
        svc.restarting = True
        try:
            if automatic and not await self._still_down(svc, cause):
                await self._flush()
                return {"restarted": False, "reason": f"{cause.label} passes again"}
            if automatic:
                svc.policy.started(time.monotonic())
            attempt, delay = (svc.restart_attempt, svc.restart_delay) if automatic else (0, 0.0)
            outcome = await launchers.restart(svc.spec, svc.managed)
        finally:
            svc.restarting = False
        svc.restarts += 1
        detail = ("automatic" if automatic else "by the operator") + f" restart via {outcome.via}: {outcome.detail}"
        self._history_rows.append((svc.label, time.time(), "restart", svc.state, "ok" if outcome.ok else "fail",
                                   detail[:500], run_id, None))
        self._outbox.append((RESTARTS, {"service": svc.label, "name": svc.spec.display_name, "attempt": attempt,
                                        "delay_s": delay, "automatic": automatic, "via": outcome.via,
                                        "ok": outcome.ok, "detail": outcome.detail, "run_id": run_id,
                                        "generated_at": iso_now(), "restart_policy": svc.policy.to_dict(time.monotonic())}))
        if outcome.ok:
            svc.thresholds.ok_run = svc.thresholds.fail_run = 0
            svc.start_deadline = time.monotonic() + svc.spec.restart.start_period
            self._transition(svc, STARTING, detail, run_id)
            svc.next_check = time.monotonic() + min(svc.spec.retry, 1.0)
        else:
            self._transition(svc, CRITICAL, detail, run_id)
            self._want_restart(svc, outcome.detail, run_id)
            svc.next_check = time.monotonic() + svc.spec.retry
        await self._flush()
        self.wake()
        return {"restarted": outcome.ok, "via": outcome.via, "detail": outcome.detail}

    async def _still_down(self, svc: Service, cause: Service) -> bool:
        """Right before an automatic restart: is what asked for it still failing? It may have come back
        during the backoff with nobody checking (launchd's KeepAlive, an interval longer than the
        backoff), and a restart would then kill a working service. A check in flight is waited for;
        else the failing check runs once more (recorded like any other). Not needed when Charter's own
        process is gone."""
        if cause is svc and svc.managed is not None and not svc.managed.alive():
            return True
        if cause.inflight is not None:
            while cause.inflight is not None:
                await asyncio.shield(cause.inflight)
        elif cause.state == CRITICAL:
            await self.run_cycle([cause])
        return cause.state == CRITICAL and cause.last is not None and not cause.last.ok and svc.state != STOPPED

    async def _on_exit(self, label: str, code: int) -> None:
        svc = self.services.get(label)
        if svc is None or svc.state == STOPPED:
            return
        how = f"signal {-code}" if code < 0 else f"code {code}"
        self._observe(svc, CheckResult(False, f"Charter's process exited with {how}"), str(ULID()), exited=True)
        await self._flush()
        self.wake()

    def poke_backend(self, backend: str) -> None:
        """Check, now, the services that watch or run this gateway backend."""
        mono = time.monotonic()
        for svc in self.services.values():
            c = svc.spec.check
            if (c is not None and c.kind == "model" and c.backend == backend) or self.managed_backends.get(backend) == svc.label:
                if svc.state not in (STOPPED,) and svc.inflight is None:
                    svc.next_check = min(svc.next_check, mono)
        self.wake()

    # -- recording -------------------------------------------------------------------------------

    def _status(self, svc: Service) -> None:
        self._status_rows[svc.label] = (svc.label, svc.state, svc.status, svc.since, svc.last_checked,
                                        svc.reason[:500], svc.checks, svc.checks_ok, svc.restarts)

    def _write_receipt(self, svc: Service, run_id: str) -> None:
        if not self.config.receipts_dir:
            return
        folder = Path(os.path.expanduser(self.config.receipts_dir))
        if not folder.is_absolute() and self.home_root is not None:
            folder = self.home_root / folder
        body = svc.receipt(run_id, status="ok" if svc.last and svc.last.ok else "fail",
                           detail=svc.last.detail if svc.last else "")
        path = folder / f"{svc.label}.json"
        tmp = folder / f".{svc.label}.json.tmp"
        with contextlib.suppress(OSError):  # a receipt is a courtesy to other tools: atomic, mode 0600, no fsync
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(json.dumps(body, indent=2).encode() + b"\n")
            os.replace(tmp, path)

    async def flush(self) -> None:
        """Record and publish everything observed so far (what the API shows is then on the bus)."""
        await self._flush()

    async def _flush(self) -> None:
        async with self._flush_lock:
            status, rows, events = list(self._status_rows.values()), self._history_rows, self._outbox
            self._status_rows, self._history_rows, self._outbox = {}, [], []
            if self.history is not None and (status or rows):
                try:
                    await asyncio.to_thread(self.history.write, status, rows)
                except Exception:  # noqa: BLE001 - history is a record; supervision goes on
                    log.exception("could not record service history")
            if self.publish is not None and events:
                try:
                    await self.publish(events)
                except Exception:  # noqa: BLE001
                    log.exception("could not publish %d service events", len(events))

    # -- the operator's view and actions ---------------------------------------------------------

    def get(self, label: str) -> Service:
        svc = self.services.get(label)
        if svc is None:
            raise CharterError(NOT_FOUND, f"no service {label!r}; see `charter services list`", "label")
        return svc

    async def list(self) -> list[dict[str, Any]]:
        await self._flush()
        now = time.monotonic()
        out = [svc.view(now) for svc in sorted(self.services.values(), key=lambda s: (s.level, s.label))]
        history = self.history
        if history is not None:
            def uptimes() -> None:
                for v in out:
                    v["uptime_24h"] = history.uptime(v["label"], 86400)
                    v["uptime_7d"] = history.uptime(v["label"], 7 * 86400)

            await asyncio.to_thread(uptimes)
        return out

    async def state_snapshot(self) -> list[dict[str, Any]]:
        """For capsules and reflection: label, status, state, tier, interval, last_checked."""
        return [{"label": s.label, "name": s.spec.display_name, "status": s.status, "state": s.state,
                 "tier": s.spec.tier, "interval": s.spec.interval, "last_checked": s.last_checked,
                 "reason": s.reason, "why": s.spec.why} for s in self.services.values()]

    async def check(self, label: str) -> dict[str, Any]:
        """Check now (the operator asked), with the usual consequences."""
        svc = self.get(label)
        if svc.state == STOPPED:
            raise CharterError(CONFLICT, f"{label} is stopped; `charter services start {label}` first", "label")
        while svc.inflight is not None:
            await asyncio.shield(svc.inflight)
        run_id = await self.run_cycle([svc])
        return {"run_id": run_id, "result": svc.last.to_dict() if svc.last else None, **svc.view(time.monotonic())}

    async def restart(self, label: str) -> dict[str, Any]:
        """The operator's restart: clears `failed` and the start-limit window, restarts at once."""
        svc = self.get(label)
        if svc.spec.effective_manager == "none":
            raise CharterError(CONFLICT, f"{label} has no manager that can restart it (manager = \"none\")", "label")
        if svc.restarting:
            raise CharterError(CONFLICT, f"{label} is being restarted right now", "label")
        svc.policy.reset()
        svc.restart_at = svc.restart_cause = svc.awaiting = None
        result = await self._restart(svc, automatic=False)
        return {**result, **svc.view(time.monotonic())}

    async def reset(self, label: str) -> dict[str, Any]:
        """The operator's `systemctl reset-failed`: the start-limit history and the backoff start over and
        `failed` is left, without a restart; the service is checked now and goes on from what it shows."""
        svc = self.get(label)
        svc.policy.reset()
        if svc.state == STOPPED:
            return svc.view(time.monotonic())
        while svc.inflight is not None:
            await asyncio.shield(svc.inflight)
        if svc.state == FAILED:
            svc.thresholds.ok_run = svc.thresholds.fail_run = 0
            self._transition(svc, UNKNOWN, "the operator reset its start limit", str(ULID()))
        if svc.restarting or svc.awaiting is not None:
            await self._flush()
            return svc.view(time.monotonic())
        run_id = await self.run_cycle([svc])
        return {"run_id": run_id, **svc.view(time.monotonic())}

    async def stop(self, label: str) -> dict[str, Any]:
        svc = self.get(label)
        if svc.managed is None:
            raise CharterError(CONFLICT, f"Charter does not run {label}'s process (manager {svc.spec.effective_manager})", "label")
        svc.restart_at = svc.restart_cause = svc.awaiting = None
        code = await svc.managed.stop()
        self._transition(svc, STOPPED, f"stopped by the operator (exit {code})", str(ULID()))
        await self._flush()
        return svc.view(time.monotonic())

    async def start_service(self, label: str) -> dict[str, Any]:
        svc = self.get(label)
        if svc.managed is None:
            raise CharterError(CONFLICT, f"Charter does not run {label}'s process (manager {svc.spec.effective_manager})", "label")
        svc.policy.reset()
        svc.awaiting = None  # the operator's start does not wait for dependencies
        await self._start_managed(svc, "started by the operator")
        await self._flush()
        return svc.view(time.monotonic())

    async def history_of(self, label: str, limit: int = 50, kinds: tuple[str, ...] | None = None) -> dict[str, Any]:
        """History and uptime; the SQLite queries run in a thread, not on the event loop the checks share."""
        svc = self.get(label)
        history = self.history
        if history is None:
            return {"label": label, "history": [], "uptime": {}}

        def read() -> tuple[list[dict[str, Any]], dict[str, float | None]]:
            rows = history.history(label, limit, kinds or ("state", "restart", "alert", "check"))
            windows = (("1h", 3600), ("24h", 86400), ("7d", 7 * 86400), ("30d", 30 * 86400))
            return rows, {w: history.uptime(label, s) for w, s in windows}

        rows, uptime = await asyncio.to_thread(read)
        return {"label": label, "state": svc.state, "status": svc.status, "uptime": uptime, "history": rows}

    async def reload(self, specs: list[Spec], managed_backends: dict[str, str] | None = None) -> dict[str, list[str]]:
        """Apply a new set of specs: new services start, removed ones stop, changed ones are replaced."""
        if managed_backends is not None:
            self.managed_backends = dict(managed_backends)
        new = {s.label: s for s in specs}
        depth = levels({s.label: s.config.depends for s in specs})
        added, removed, changed = [], [], []
        to_start: list[Service] = []
        for label in list(self.services):
            if label not in new:
                old = self.services.pop(label)
                if old.managed is not None:
                    await old.managed.close()
                removed.append(label)
        for label, spec in new.items():
            old = self.services.get(label)
            if old is not None and old.spec == spec.config:
                old.level, old.source = depth[label], spec.source
                continue
            svc = Service(spec, depth[label])
            svc.next_check = time.monotonic()
            if old is not None:
                changed.append(label)
                svc.state, svc.since, svc.reason, svc.last_checked = old.state, old.since, old.reason, old.last_checked
                svc.checks, svc.checks_ok, svc.restarts = old.checks, old.checks_ok, old.restarts
                if old.managed is not None:
                    await old.managed.close()
                if svc.state in (STARTING, STOPPED):  # what it was doing ended with the old spec: say so
                    self._transition(svc, UNKNOWN, f"its spec changed ({spec.source}); not checked since",
                                     str(ULID()))
            else:
                added.append(label)
            self.services[label] = svc
            if self.started:
                svc.managed = self._make_managed(svc)
                to_start.append(svc)
        self.dependents = {label: [] for label in self.services}
        for svc in self.services.values():
            for d in svc.spec.depends:
                self.dependents[d].append(svc.label)
        await self._autostart(to_start, "started by a reload")
        await self._flush()
        self.wake()
        return {"added": added, "removed": removed, "changed": changed}

    def metrics(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily("charter_service_up", "1 if the service passes its check, else 0", labels=["service", "tier"])
        state = GaugeMetricFamily("charter_service_state", "The service's state (one series per state, value 1)",
                                  labels=["service", "state"])
        restarts = CounterMetricFamily("charter_service_restarts", "Restarts since the daemon started", labels=["service"])
        for s in self.services.values():
            up.add_metric([s.label, s.spec.tier], 1.0 if s.state == PASSING else 0.0)
            state.add_metric([s.label, s.state], 1.0)
            restarts.add_metric([s.label], s.restarts)
        yield up
        yield state
        yield restarts
