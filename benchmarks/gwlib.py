"""Shared plumbing for the gateway benchmarks (gateway.py, failover.py, budget_race.py).

Not a benchmark itself. It starts the pieces as real processes on loopback and drives them:

* stand-in backends (`charter.models.standin`, the OpenAI-compatible `/v1` layer of it);
* a Charter daemon (`charter up`) whose gateway fronts them, with agents enrolled through invites
  and reaching the gateway with their bearer API key, as an unmodified OpenAI client does;
* the LiteLLM proxy, installed from PyPI into its own virtual environment (benchmarks/.venv-litellm,
  ignored by git) the first time it is needed, and started on a spare loopback port;
* the floor proxy (benchmarks/floor_proxy.py): the same hop as Charter's with nothing governed;
* a closed-loop load generator: keep-alive aiohttp clients, one latency per request, measured to
  the last byte of the body (so a stream counts when its `data: [DONE]` arrived).

CPU pinning: on a machine with two or more cores the gateway under test (Charter or LiteLLM) runs
alone on the last core, and the load generator and the stand-in backends share core 0, so the
gateway never competes with its own load. Every thread of a process is pinned
(`sched_setaffinity` on each task in /proc/PID/task); threads started later inherit it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:  # runnable from a checkout without an editable install
    sys.path.insert(0, str(ROOT / "src"))

import aiohttp  # noqa: E402
import orjson  # noqa: E402
import psutil  # noqa: E402

from charter import __version__  # noqa: E402
from charter.cli.operator import OperatorClient  # noqa: E402
from charter.config import Home  # noqa: E402
from charter.identity.init import init_home  # noqa: E402
from charter.models.standin import StandinProcess, spawn_standin  # noqa: E402
from charter.sdk import Agent  # noqa: E402
from charter.server.daemon import spawn, stop  # noqa: E402

LITELLM_VENV = ROOT / "benchmarks" / ".venv-litellm"
LITELLM_MASTER_KEY = "sk-charter-bench"
PROMPT = "Say hello to the benchmark. [[tokens=6]]"  # the stand-in answers with exactly 6 tokens
MAX_TOKENS = 16


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- CPU pinning ----------------------------------------------------------------------------------


@dataclass
class Pinning:
    """Which core does what. `enabled` is False on a one-core machine (or where affinity fails)."""

    enabled: bool
    loadgen_cpus: list[int] = field(default_factory=list)
    gateway_cpus: list[int] = field(default_factory=list)
    backend_cpus: list[int] = field(default_factory=list)
    note: str = ""

    @classmethod
    def plan(cls) -> Pinning:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return cls(False, note="sched_setaffinity is not available here: nothing pinned")
        if len(cpus) < 2:
            return cls(False, note=f"only {len(cpus)} usable core: nothing pinned")
        gw, rest = [cpus[-1]], cpus[:-1]
        return cls(True, rest, gw, rest,
                   f"gateway under test alone on core {gw[0]}; load generator and stand-in backends on "
                   f"core(s) {','.join(map(str, rest))}")

    def pin_self(self) -> None:
        if self.enabled:
            pin(os.getpid(), self.loadgen_cpus)

    def pin_gateway(self, pid: int) -> None:
        if self.enabled:
            pin(pid, self.gateway_cpus)

    def pin_backend(self, pid: int) -> None:
        if self.enabled:
            pin(pid, self.backend_cpus)

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "loadgen_cpus": self.loadgen_cpus, "gateway_cpus": self.gateway_cpus,
                "backend_cpus": self.backend_cpus, "note": self.note, "cpu_count": os.cpu_count()}


def pin(pid: int, cpus: Sequence[int]) -> None:
    """Pin every thread of `pid` (and its children's threads) to `cpus`."""
    pids = [pid]
    with contextlib.suppress(psutil.Error):
        pids += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    for p in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:
            tids = [p]
        for tid in tids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, set(cpus))


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children so far (0 if it is gone)."""
    try:
        p = psutil.Process(pid)
        total = sum(p.cpu_times()[:2])
        for c in p.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += sum(c.cpu_times()[:2])
        return total
    except psutil.Error:
        return 0.0


def rss_mib(pid: int) -> float:
    try:
        p = psutil.Process(pid)
        total = p.memory_info().rss
        for c in p.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += c.memory_info().rss
        return round(total / 2**20, 1)
    except psutil.Error:
        return 0.0


# -- how busy the machine is with other work ----------------------------------------------------------


def _stat() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in parts]
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    total = sum(ticks[:8])
    return (total - idle) / hz, total / hz


class Busy:
    """Share of the machine's CPU that went to processes other than `ours` between start() and share()."""

    def __init__(self, ours: Callable[[], Sequence[int]]) -> None:
        self.ours = ours
        self._t0: tuple[float, float] | None = None
        self._c0 = 0.0
        self._last: dict[int, float] = {}

    def _our_cpu(self) -> float:
        """Our processes' CPU; one that died since (a killed backend) counts with its last reading."""
        total = 0.0
        for p in self.ours():
            cpu = cpu_seconds(p)
            if cpu == 0.0 and p in self._last:
                cpu = self._last[p]
            self._last[p] = cpu
            total += cpu
        return total

    def start(self) -> None:
        self._t0, self._c0 = _stat(), self._our_cpu()

    def sample(self) -> None:
        """Take a reading now (before killing one of our processes, so its CPU so far still counts)."""
        self._our_cpu()

    def share(self) -> float | None:
        t1 = _stat()
        if self._t0 is None or t1 is None or t1[1] <= self._t0[1]:
            return None
        busy, total = t1[0] - self._t0[0], t1[1] - self._t0[1]
        others = busy - (self._our_cpu() - self._c0)
        return round(max(others, 0.0) / total, 3)


async def wait_calm(busy: Busy, *, threshold: float = 0.15, window: float = 1.0, max_wait: float = 60.0
                    ) -> dict[str, Any]:
    """Wait (at most `max_wait`) until other processes use under `threshold` of the machine for one window.

    These machines are shared: another job's test run can take both cores for minutes, and every
    latency figure measured meanwhile says more about that job than about the gateway.
    """
    t0 = time.monotonic()
    last = None
    while True:
        busy.start()
        await asyncio.sleep(window)
        last = busy.share()
        if last is None or last < threshold or time.monotonic() - t0 >= max_wait:
            break
    return {"waited_s": round(time.monotonic() - t0, 1), "others_cpu_share": last,
            "calm": last is None or last < threshold}


# -- statistics -----------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def summary_ms(latencies_s: Sequence[float]) -> dict[str, Any]:
    s = sorted(x * 1000 for x in latencies_s)
    if not s:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    return {"n": len(s), "p50": round(percentile(s, 50), 3), "p90": round(percentile(s, 90), 3),
            "p99": round(percentile(s, 99), 3), "max": round(s[-1], 3), "mean": round(sum(s) / len(s), 3)}


def r3(x: float) -> float:
    return round(x, 3)


# -- stand-ins and Charter ------------------------------------------------------------------------


def start_standin(pinning: Pinning, models: Sequence[str], token_delay: float = 0.0, **kw: Any) -> StandinProcess:
    proc = spawn_standin(models=list(models), token_delay=token_delay, stderr=subprocess.DEVNULL, **kw)
    pinning.pin_backend(proc.pid)
    return proc


def charter_home(root: Path, *, backends: dict[str, str], aliases: dict[str, list[str]],
                 prices: dict[str, tuple[float, float]], models_extra: str = "", roles_extra: str = "") -> Home:
    """A fresh CHARTER_HOME on a spare port whose gateway has exactly these OpenAI-kind backends.

    `backends` maps a backend name to its OpenAI-compatible base URL (ending in /v1); `prices` maps
    `backend/model` to USD per million input and output tokens.
    """
    home = Home(root)
    init_home(home)
    text = home.config_path.read_text()
    text = re.sub(r"(?m)^port = \d+", f"port = {free_port()}", text)
    start = text.index("# Prices in USD per million tokens.")
    end = text.index("# Roles: what an enrolled agent may do.")
    section = ["[prices]"]
    section += [f'"{ref}" = {{ input_per_mtok = {p_in}, output_per_mtok = {p_out} }}'
                for ref, (p_in, p_out) in prices.items()]
    section += ["", "[models]", "default_max_tokens = 256", models_extra, ""]
    for name, url in backends.items():
        section += [f"[models.backends.{name}]", 'kind = "openai"', f'url = "{url}"', ""]
    section += ["[models.aliases]"]
    section += [f"{alias} = {json.dumps(chain)}" for alias, chain in aliases.items()]
    text = text[:start] + "\n".join(section) + "\n\n" + text[end:] + "\n" + roles_extra
    home.config_path.write_text(text)
    return home


# A role like `worker` (same policy, T2 so it may call OpenAI-kind models) but with no budget of
# its own: its calls are decided by policy and recorded, and nothing is reserved in the ledger.
ROLE_NO_BUDGET = """
[roles.benchfree]
description = "Benchmark agent: worker rights, no budget (no reservation per call)."
publish = ["agents.{name}.>"]
subscribe = ["agents.{name}.>"]
read = []
policy = "default"
max_tier = "T2"
"""


@dataclass
class Charter:
    home: Home
    info: dict[str, Any]
    started_s: float  # from spawn to answering

    @property
    def url(self) -> str:
        return self.info["url"]

    @property
    def pid(self) -> int:
        return int(self.info["pid"])

    async def admin(self, method: str, path: str, **kw: Any) -> Any:
        async with OperatorClient(self.home) as op:
            return await op.call(method, path, **kw)

    async def enroll(self, name: str, role: str = "worker") -> Agent:
        token = (await self.admin("POST", "/v1/admin/invites", json={"role": role}))["token"]
        agent = await Agent.enroll(self.url, token, name, self.home.root.parent / f"{name}.creds.json")
        return agent

    def stop(self) -> None:
        stop(self.home)


def start_charter(home: Home, pinning: Pinning) -> Charter:
    t0 = time.perf_counter()
    info = spawn(home)
    started = time.perf_counter() - t0
    pinning.pin_gateway(int(info["pid"]))
    return Charter(home, info, started)


# -- LiteLLM ------------------------------------------------------------------------------------


@dataclass
class LiteLLMInstall:
    python: Path | None
    version: str | None
    reason: str | None  # why it is not usable, if it is not
    install_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.python is not None


def ensure_litellm(venv: Path = LITELLM_VENV) -> LiteLLMInstall:
    """LiteLLM's proxy in its own venv (created and filled from PyPI when missing)."""
    py = venv / "bin" / "python"
    t0 = time.perf_counter()

    def version() -> str | None:
        done = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                              capture_output=True, text=True, timeout=60)
        return done.stdout.strip() if done.returncode == 0 else None

    def proxy_imports() -> bool:
        done = subprocess.run([str(py), "-c", "import litellm.proxy.proxy_server"], capture_output=True, text=True,
                              timeout=180, env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
        return done.returncode == 0

    if py.exists() and version() and proxy_imports():
        return LiteLLMInstall(py, version(), None)
    progress(f"installing litellm[proxy] from PyPI into {venv} (once; about a minute)")
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
        done = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                               "litellm[proxy]"], capture_output=True, text=True, timeout=1200)
    except (subprocess.SubprocessError, OSError) as exc:
        return LiteLLMInstall(None, None, f"could not create the venv or run pip: {exc}")
    if done.returncode != 0:
        tail = [ln for ln in done.stderr.splitlines() if "is ignored" not in ln][-6:]
        return LiteLLMInstall(None, None, "pip install litellm[proxy] failed: " + " | ".join(tail))
    v = version()
    if not v or not proxy_imports():
        return LiteLLMInstall(None, None, "litellm installed but `import litellm.proxy.proxy_server` fails")
    return LiteLLMInstall(py, v, None, time.perf_counter() - t0)


@dataclass
class ServerProcess:
    """A gateway under test that is not Charter (the LiteLLM proxy, the floor proxy): a process
    group on a loopback port, its output in a log file."""

    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path
    started_s: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)


class StartError(Exception):
    """A gateway under test (LiteLLM, the floor proxy) did not come up."""


def _serve(name: str, cmd: list[str], port: int, log_path: Path, pinning: Pinning, health: str, timeout: float, *,
           env: dict[str, str] | None = None, cwd: Path | None = None) -> ServerProcess:
    """Start `cmd` in its own process group and wait until `GET health` answers 200 on `port`;
    then pin it on the gateway's core. Raises StartError otherwise."""
    t0 = time.perf_counter()
    with open(log_path, "wb") as logf:
        popen = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                 cwd=cwd, start_new_session=True)
    proc = ServerProcess(popen, port, log_path, 0.0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise StartError(f"{name} exited with {popen.returncode}: {proc.log_tail(800)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(f"GET {health} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    proc.started_s = time.perf_counter() - t0
                    pinning.pin_gateway(popen.pid)
                    return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.stop()
    raise StartError(f"{name} did not answer within {timeout:g}s: {proc.log_tail(800)}")


def start_litellm(install: LiteLLMInstall, config: dict[str, Any], workdir: Path, pinning: Pinning,
                  timeout: float = 90.0, log_level: str = "ERROR") -> ServerProcess:
    """`litellm --config` (JSON is YAML) on a spare port, no database, master key only."""
    assert install.python is not None
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / f"litellm-{int(time.time() * 1000)}.yaml"
    cfg.write_text(json.dumps(config, indent=1))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)}
    env.update(LITELLM_MASTER_KEY=LITELLM_MASTER_KEY, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG=log_level,
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", DISABLE_SCHEMA_UPDATE="True")
    cli = install.python.parent / "litellm"
    cmd = [str(cli), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    return _serve("litellm", cmd, port, cfg.with_suffix(".log"), pinning, "/health/liveliness", timeout, env=env, cwd=workdir)


def start_floor(upstream_v1: str, workdir: Path, pinning: Pinning, timeout: float = 30.0) -> ServerProcess:
    """benchmarks/floor_proxy.py in front of `upstream_v1`: the same hop as Charter's, ungoverned."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).with_name("floor_proxy.py")), "--upstream", upstream_v1,
           "--port", str(port)]
    return _serve("floor_proxy", cmd, port, workdir / "floor.log", pinning, "/health", timeout)


def litellm_model(name: str, model: str, api_base: str, **params: Any) -> dict[str, Any]:
    return {"model_name": name, "litellm_params": {"model": f"openai/{model}", "api_base": api_base,
                                                   "api_key": "none", **params}}


def litellm_config(models: list[dict[str, Any]], *, router: dict[str, Any] | None = None,
                   settings: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"model_list": models,
            "litellm_settings": {"telemetry": False, "drop_params": True, "turn_off_message_logging": True,
                                 **(settings or {})},
            "router_settings": router or {},
            "general_settings": {"master_key": LITELLM_MASTER_KEY}}


# -- load -------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One way to reach a model: a URL, a bearer key and the model name to ask for."""

    name: str
    url: str
    key: str | None
    model: str
    gateway_pid: int | None = None  # whose CPU to count

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.key:
            h["Authorization"] = f"Bearer {self.key}"
        return h

    def body(self, stream: bool, prompt: str = PROMPT, max_tokens: int = MAX_TOKENS) -> bytes:
        doc: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                               "max_tokens": max_tokens, "stream": stream}
        return orjson.dumps(doc)


@dataclass
class Outcome:
    latency: float
    status: int
    body: bytes


def session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, force_close=False, keepalive_timeout=60),
                                 timeout=aiohttp.ClientTimeout(total=120), skip_auto_headers=("User-Agent",))


async def one(http: aiohttp.ClientSession, target: Target, body: bytes) -> Outcome:
    t0 = time.perf_counter()
    try:
        async with http.post(target.url, data=body, headers=target.headers()) as r:
            data = await r.read()
            status = r.status
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        return Outcome(time.perf_counter() - t0, 0, repr(exc).encode())
    return Outcome(time.perf_counter() - t0, status, data)


def good(out: Outcome, stream: bool) -> bool:
    if out.status != 200:
        return False
    if stream:
        return out.body.rstrip().endswith(b"data: [DONE]") and b'"error"' not in out.body
    return b'"choices"' in out.body


@dataclass
class Run:
    latencies: list[float]
    errors: int
    wall_s: float
    cpu_s: float  # the gateway's CPU time during the run (0 for direct)
    first_error: str | None = None

    @property
    def n(self) -> int:
        return len(self.latencies)


async def closed_loop(target: Target, *, n: int, concurrency: int, stream: bool,
                      http: aiohttp.ClientSession | None = None) -> Run:
    """`concurrency` workers, each sending its next request as soon as the last one's body is read."""
    own = http is None
    http = http or session(concurrency)
    body = target.body(stream)
    lat: list[float] = []
    errors = 0
    first_error: str | None = None
    left = n

    async def worker() -> None:
        nonlocal left, errors, first_error
        while left > 0:
            left -= 1
            out = await one(http, target, body)
            if good(out, stream):
                lat.append(out.latency)
            else:
                errors += 1
                if first_error is None:
                    first_error = f"HTTP {out.status}: {out.body[:300]!r}"

    cpu0 = cpu_seconds(target.gateway_pid) if target.gateway_pid else 0.0
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        wall = time.perf_counter() - t0
        if own:
            await http.close()
    cpu1 = cpu_seconds(target.gateway_pid) if target.gateway_pid else 0.0
    return Run(lat, errors, wall, cpu1 - cpu0, first_error)


async def until(pred: Callable[[], Awaitable[bool]], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return True
        await asyncio.sleep(step)
    return False


def environment(pinning: Pinning) -> dict[str, Any]:
    import platform

    return {"charter_version": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "pinning": pinning.to_dict()}


def rmtree_quiet(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
