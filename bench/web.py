"""Benchmark the web app: one-click unsubscribe POSTs/s and subscribe POSTs/s, p50/p99 latency.

The app runs under uvicorn (its own processes); the load generator is a separate process with a
minimal keep-alive HTTP/1.1 client on loopback (an asyncio Protocol, no HTTP library), so the
measurement is not the client's cost. Each phase prints the CPU seconds the server's processes,
the generator and the whole machine spent, because on a 2-core machine shared with other work a
low rate may mean the server was starved rather than slow.

    .venv/bin/python bench/web.py --backend sqlite --runs 3
    MAILER_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/test \
        .venv/bin/python bench/web.py --backend postgresql --runs 3

uvicorn runs one worker on SQLite and two on PostgreSQL unless --workers says otherwise. Two
SQLite workers take turns on the database through a lock file (mailer.web.runtime.SqliteTurns),
so they are correct, but the one-click rate hardly moves: the turns, not the CPU, are the limit.

Each one-click POST unsubscribes a different subscriber (a real write: subscription status and a
consent event), with the body a mailbox provider sends. Each subscribe POST is a new address
(a real sign-up: subscriber, subscription, consent event, rate events, and a confirmation mail
handed to an SMTP port that refuses, after the response).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import queue
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_TICK = os.sysconf("SC_CLK_TCK")
_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


def _importable(name: str) -> bool:
    """Whether uvicorn's "auto" choice will find this module (httptools, uvloop)."""
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- load generator (own process)

class _Connection(asyncio.Protocol):
    """One keep-alive connection, one request in flight. Responses are read by Content-Length,
    which every response of this app has (none is chunked)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        match = _LENGTH.search(self.buffer, 0, end + 2)
        total = end + 4 + (int(match[1]) if match else 0)
        if len(self.buffer) >= total:
            response = bytes(self.buffer[:total])
            del self.buffer[:total]
            waiter, self.waiter = self.waiter, None
            waiter.set_result(response)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionError("the server closed the connection"))

    def request(self, raw: bytes) -> asyncio.Future[bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return self.waiter


@dataclass
class Result:
    elapsed: float
    latencies: list[float]
    statuses: dict[int, int]
    cpu: float  # the generator's own CPU seconds


async def _run_load(port: int, requests: list[bytes], concurrency: int,
                    prime: bytes | None) -> Result:
    loop = asyncio.get_running_loop()
    pending = list(reversed(requests))
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    connections = [(await loop.create_connection(_Connection, "127.0.0.1", port))[1]
                   for _ in range(concurrency)]

    async def worker(conn: _Connection) -> None:
        cookie = token = b""
        if prime is not None:  # a browser-like client: fetch the form's cookie and token first
            page = await conn.request(prime)
            cookie = re.search(rb"(?i)set-cookie: *(csrf=[^;]+)", page)[1]  # type: ignore[index]
            token = re.search(rb'name="csrf_token" value="([^"]+)"', page)[1]  # type: ignore[index]
        clock = time.perf_counter
        while pending:
            raw = pending.pop()
            if prime is not None:  # the body length changes with the token
                head, _, body = raw.partition(b"\r\n\r\n")
                body = body.replace(b"XXTOKENXX", token)
                head = head.replace(b"XXCOOKIEXX", cookie).replace(
                    b"XXLENGTHXX", b"%d" % len(body))
                raw = head + b"\r\n\r\n" + body
            started = clock()
            response = await conn.request(raw)
            latencies.append(clock() - started)
            status = int(response[9:12])
            statuses[status] = statuses.get(status, 0) + 1
        assert conn.transport is not None
        conn.transport.close()

    cpu = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    return Result(time.perf_counter() - started, latencies, statuses, time.process_time() - cpu)


def _generator(port: int, requests: list[bytes], concurrency: int, prime: bytes | None,
               out: multiprocessing.Queue) -> None:
    try:
        import uvloop  # the client's own overhead, kept as small as the server's
    except ImportError:
        out.put(asyncio.run(_run_load(port, requests, concurrency, prime)))
    else:
        out.put(uvloop.run(_run_load(port, requests, concurrency, prime)))


def _load(port: int, requests: list[bytes], concurrency: int,
          prime: bytes | None = None) -> Result:
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()
    proc = ctx.Process(target=_generator, args=(port, requests, concurrency, prime, out))
    proc.start()
    while True:  # a generator that died (a bug, a refused connection) must not hang us
        try:
            result = out.get(timeout=1)
            break
        except queue.Empty:
            if not proc.is_alive():
                raise SystemExit(f"the load generator died (exit code {proc.exitcode})") from None
    proc.join()
    return result


# ---------------------------------------------------------------- CPU accounting (Linux /proc)

def _tree_cpu(root: int) -> float:
    """CPU seconds used so far by `root` and its live descendants (uvicorn's workers)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICK
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        grew = bool(more)
        tree |= more
    return sum(times.get(pid, 0.0) for pid in tree)


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / _TICK, sum(values) / _TICK


# ---------------------------------------------------------------- setup

def _database(backend: str, tmp: Path) -> tuple[str, str | None]:
    if backend == "sqlite":
        return f"sqlite:///{tmp / 'bench.db'}", None
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from subscribers.db import normalise_url

    admin_url = os.environ.get("MAILER_TEST_POSTGRES_URL")
    if not admin_url:
        raise SystemExit("set MAILER_TEST_POSTGRES_URL for --backend postgresql")
    name = f"mailer_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(normalise_url(admin_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = make_url(normalise_url(admin_url)).set(database=name)
    return url.render_as_string(hide_password=False), name


def _drop(name: str | None) -> None:
    if name is None:
        return
    from sqlalchemy import create_engine, text

    from subscribers.db import normalise_url

    admin = create_engine(normalise_url(os.environ["MAILER_TEST_POSTGRES_URL"]),
                          isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _seed(url: str, env: dict[str, str], count: int) -> list[str]:
    """`count` active subscribers on the newsletter; their one-click URLs' paths."""
    os.environ.update(env)
    from mailer import migrations
    from mailer.config import Settings
    from subscribers import store
    from subscribers.db import make_engine, session_factory, session_scope
    from subscribers.models import Channel
    from subscribers.tokens import Tokens

    migrations.upgrade(url)
    settings = Settings()
    rules = settings.rules()
    engine = make_engine(url)
    with session_scope(session_factory(engine)) as session:
        topic = store.get_topic(session, "newsletter")
        profiles = [(store.profile_from(rules, email=f"reader{n}@kent.police.uk"), [topic])
                    for n in range(count)]
        store.bulk_add_active(session, rules, profiles,
                              store.Context(channel=Channel.IMPORT, lawful_basis="bench"))
        ids = [s.id for s in store.list_subscribers(session, limit=count)[1]]
        topic_id = topic.id
    engine.dispose()
    tokens = Tokens(settings.token_keys())
    return [f"/u/{tokens.unsubscribe(i, topic_id)}" for i in ids]


def _post(path: str, body: bytes, content_type: str, extra: str = "",
          length: str | None = None) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length or len(body)}\r\n{extra}\r\n").encode() + body


@dataclass
class Phase:
    rate: float
    p50: float
    p99: float


def _measure(name: str, server: int, port: int, requests: list[bytes], concurrency: int,
             prime: bytes | None = None) -> Phase:
    server_cpu, (busy, total) = _tree_cpu(server), _machine_busy()
    result = _load(port, requests, concurrency, prime)
    server_cpu = _tree_cpu(server) - server_cpu
    busy2, total2 = _machine_busy()
    lat = sorted(result.latencies)
    phase = Phase(len(lat) / result.elapsed, statistics.median(lat) * 1000,
                  lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000)
    cores = (total2 - total) / result.elapsed  # every core's seconds per second of wall time
    print(f"  {name:<10} {phase.rate:6.0f} req/s  p50 {phase.p50:6.1f} ms  p99 {phase.p99:6.1f} ms"
          f"  | CPU ms/req: server {server_cpu / len(lat) * 1000:4.2f}, generator "
          f"{result.cpu / len(lat) * 1000:4.2f}; machine busy "
          f"{(busy2 - busy) / (total2 - total) * 100:3.0f}% of {cores:.0f} cores"
          f"  {result.statuses}", flush=True)
    return phase


def _summary(name: str, phases: list[Phase]) -> None:
    if len(phases) < 2:
        return
    rates = [p.rate for p in phases]
    best = max(phases, key=lambda p: p.rate)
    print(f"  {name:<10} best {best.rate:.0f} req/s (p50 {best.p50:.1f} ms, p99 {best.p99:.1f} "
          f"ms), median {statistics.median(rates):.0f} req/s over {len(phases)} runs")


def run(backend: str, requests: int, signups: int, concurrency: int, workers: int, runs: int,
        http: str = "auto", loop: str = "auto") -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        url, pg_name = _database(backend, tmp)
        port = _free_port()
        env = {"MAILER_DATABASE_URL": url, "MAILER_VAR_DIR": str(tmp / "var"),
               "MAILER_CONFIG": str(tmp / "absent.toml"), "MAILER_SECRET_KEY": "b" * 40,
               "MAILER_SUPPRESSION_KEY": "c" * 40, "MAILER_BASE_URL": f"http://127.0.0.1:{port}",
               "MAILER_SMTP_URL": f"smtp://127.0.0.1:{_free_port()}?tls=none",
               "MAILER_POSTS_PER_NETWORK_HOUR": "100000000",
               "MAILER_MAILS_PER_NETWORK_DAY": "100000000"}
        try:
            paths = _seed(url, env, requests * runs)
            # The refused confirmation mails log a warning each: kept out of the report.
            log = (tmp / "server.log").open("wb")
            server = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "mailer.web.app:app_from_environment",
                 "--factory", "--host", "127.0.0.1", "--port", str(port), "--workers",
                 str(workers), "--log-level", "warning", "--no-access-log", "--http", http,
                 "--loop", loop],
                cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=log)
            try:
                _wait_ready(port)
                if http == "auto":
                    http = "httptools" if _importable("httptools") else "h11"
                if loop == "auto":
                    loop = "uvloop" if _importable("uvloop") else "asyncio"
                print(f"{backend}: {workers} uvicorn worker(s) ({http}, {loop}), {concurrency} "
                      f"connections, {requests} one-click and {signups} subscribe requests a "
                      f"run; load average "
                      f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
                click_phases: list[Phase] = []
                forms_phases: list[Phase] = []
                prime = b"GET /subscribe HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                for run_no in range(runs):
                    one_click = [_post(p, b"List-Unsubscribe=One-Click",
                                       "application/x-www-form-urlencoded")
                                 for p in paths[run_no * requests:(run_no + 1) * requests]]
                    click_phases.append(_measure("one-click", server.pid, port, one_click,
                                                 concurrency))
                    forms = [_post("/subscribe", urlencode({
                        "csrf_token": "XXTOKENXX", "email": f"new{run_no}x{n}@essex.police.uk",
                        "name": "Bench", "topics": "newsletter", "consent": "2026-12",
                        "region": "essex"}).encode(), "application/x-www-form-urlencoded",
                        "Cookie: XXCOOKIEXX\r\n", "XXLENGTHXX") for n in range(signups)]
                    forms_phases.append(_measure("subscribe", server.pid, port, forms,
                                                 concurrency, prime))
                _summary("one-click", click_phases)
                _summary("subscribe", forms_phases)
                print(f"  load average after: "
                      f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
            finally:
                server.terminate()
                server.wait(20)
                log.close()
        finally:
            _drop(pg_name)


def _wait_ready(port: int) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--requests", type=int, default=3000,
                        help="one-click POSTs in each run")
    parser.add_argument("--signups", type=int, default=1000,
                        help="subscribe POSTs in each run (each is ten one-clicks' work)")
    parser.add_argument("--concurrency", type=int, default=16, help="keep-alive connections")
    parser.add_argument("--workers", type=int, default=None,
                        help="uvicorn worker processes (default: 1 on SQLite, 2 on PostgreSQL)")
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat both phases N times and print best and median (the machine "
                             "is shared, so one figure is noisy)")
    parser.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto",
                        help="uvicorn's HTTP parser (auto: httptools when installed)")
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                        help="uvicorn's event loop (auto: uvloop when installed)")
    args = parser.parse_args()
    for backend in (["sqlite", "postgresql"] if args.backend == "both" else [args.backend]):
        workers = args.workers or (1 if backend == "sqlite" else 2)
        run(backend, args.requests, args.signups, args.concurrency, workers, args.runs,
            args.http, args.loop)


if __name__ == "__main__":
    main()
