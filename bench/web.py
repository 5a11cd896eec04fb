"""Benchmark the web app: one-click unsubscribe POSTs/s and subscribe POSTs/s, p50/p99 latency.

The app runs under uvicorn (its own processes); the load generator is a separate process with a
minimal keep-alive HTTP/1.1 client on loopback, so the measurement is not the client's cost.

    .venv/bin/python bench/web.py --backend sqlite
    MAILER_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/test \
        .venv/bin/python bench/web.py --backend postgresql

Each one-click POST unsubscribes a different subscriber (a real write: status, subscriptions,
consent event), with the body a mailbox provider sends. Each subscribe POST is a new address
(a real sign-up: subscriber, subscription, consent event, rate events, and a confirmation mail
handed to an SMTP port that refuses, after the response).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- load generator (own process)

async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   raw: bytes) -> tuple[int, bytes]:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    match = re.search(rb"(?i)content-length: *(\d+)", head)
    body = await reader.readexactly(int(match[1])) if match else b""
    return status, head + body


async def _run_load(port: int, requests: list[bytes], concurrency: int,
                    prime: bytes | None) -> tuple[float, list[float], dict[int, int]]:
    queue = list(reversed(requests))
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        cookie = token = b""
        if prime is not None:  # a browser-like client: fetch the form's cookie and token first
            _, page = await _request(reader, writer, prime)
            cookie = re.search(rb"(?i)set-cookie: *(csrf=[^;]+)", page)[1]
            token = re.search(rb'name="csrf_token" value="([^"]+)"', page)[1]
        while queue:
            raw = queue.pop()
            raw = raw.replace(b"XXCOOKIEXX", cookie).replace(b"XXTOKENXX", token)
            if prime is not None:  # the body length changed with the token
                head, _, body = raw.partition(b"\r\n\r\n")
                head = re.sub(rb"Content-Length: \d+", b"Content-Length: %d" % len(body), head)
                raw = head + b"\r\n\r\n" + body
            started = time.perf_counter()
            status, _ = await _request(reader, writer, raw)
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, statuses


def _generator(port: int, requests: list[bytes], concurrency: int, prime: bytes | None,
               out: multiprocessing.Queue) -> None:
    out.put(asyncio.run(_run_load(port, requests, concurrency, prime)))


def _load(port: int, requests: list[bytes], concurrency: int,
          prime: bytes | None = None) -> tuple[float, list[float], dict[int, int]]:
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()
    proc = ctx.Process(target=_generator, args=(port, requests, concurrency, prime, out))
    proc.start()
    result = out.get()
    proc.join()
    return result


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


def _post(path: str, body: bytes, content_type: str, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def _report(name: str, elapsed: float, latencies: list[float], statuses: dict[int, int]) -> None:
    lat = sorted(latencies)
    p50 = statistics.median(lat) * 1000
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
    print(f"  {name:<12} {len(lat) / elapsed:8.0f} req/s   p50 {p50:6.1f} ms   "
          f"p99 {p99:6.1f} ms   statuses {statuses}")


def run(backend: str, requests: int, concurrency: int, workers: int) -> None:
    if backend == "sqlite":
        workers = 1  # one writer: a second process would only wait on SQLite's file lock
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
            paths = _seed(url, env, requests)
            server = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "mailer.web.app:app_from_environment",
                 "--factory", "--host", "127.0.0.1", "--port", str(port), "--workers",
                 str(workers), "--log-level", "error", "--no-access-log"],
                cwd=ROOT, env={**os.environ, **env})
            try:
                _wait_ready(port)
                print(f"{backend}: {workers} uvicorn workers, {concurrency} connections, "
                      f"{requests} requests each")
                one_click = [_post(p, b"List-Unsubscribe=One-Click",
                                   "application/x-www-form-urlencoded") for p in paths]
                _report("one-click", *_load(port, one_click, concurrency))
                signups = [_post("/subscribe", urlencode({
                    "csrf_token": "XXTOKENXX", "email": f"new{n}@essex.police.uk",
                    "name": "Bench", "topics": "newsletter", "consent": "2026-12",
                    "region": "essex"}).encode(), "application/x-www-form-urlencoded",
                    "Cookie: XXCOOKIEXX\r\n") for n in range(requests)]
                prime = b"GET /subscribe HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                _report("subscribe", *_load(port, signups, concurrency, prime))
            finally:
                server.terminate()
                server.wait(20)
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
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    for backend in (["sqlite", "postgresql"] if args.backend == "both" else [args.backend]):
        run(backend, args.requests, args.concurrency, args.workers)


if __name__ == "__main__":
    main()
