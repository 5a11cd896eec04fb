"""Delivery benchmark: personalised messages from the outbox to a local sink, end to end.

    .venv/bin/python bench/send.py                       # SQLite (+ PostgreSQL if configured)
    .venv/bin/python bench/send.py --n 20000 --scale     # also enqueue 10k/100k/1M on PostgreSQL
    .venv/bin/python bench/send.py --scale-only          # just that

For each backend and 1, 4 and 16 SMTP connections it queues N recipients of the sample edition
and runs `mailer worker --drain` in a child process (on PostgreSQL also two processes sharing
the outbox, the 16 connections split between them) against Debian's `smtp-sink` (the fast C
sink from the postfix package) and aiosmtpd, printing messages/s, the worker's CPU and peak
RSS, then the same again with every message DKIM-signed (an RSA-2048 key such as `mailer dkim
keygen` makes; the worker signs in processes beside its SMTP loop, `--sign-processes` of them,
by default one per CPU; `--sign-processes 0` signs inline). Beside it, on the same sink: the
bare pipelined asyncio client pushing pre-built messages (the ceiling, from bench/smtp_raw.py)
and the `mailmerge` tool from PyPI (installed into a throwaway venv under var/bench/ when the
registry is reachable). `--scale` measures how enqueue time and worker memory grow with the
audience on PostgreSQL.

A short run on a shared machine (PostgreSQL, smtp-sink, 16 connections, signed and not):

    .venv/bin/python bench/send.py --n 5000 --conns 16 --sinks smtp-sink --no-peers \\
        --postgres postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import pgdb  # noqa: E402  (a throwaway PostgreSQL database)
import smtp_raw  # noqa: E402  (the sinks and the bare client)

SAMPLE = ROOT / "editions" / "2020-q3-kent-essex.md"


def _env(url: str, var: Path, smtp_port: int, conns: int, dkim_key: Path | None = None,
         sign_processes: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env.update(MAILER_DATABASE_URL=url, MAILER_VAR_DIR=str(var), MAILER_SECRET_KEY="s" * 40,
               MAILER_SUPPRESSION_KEY="k" * 40, MAILER_RATE_PER_MINUTE="0",
               MAILER_RATE_PER_DAY="0", MAILER_SMTP_CONNECTIONS=str(conns),
               MAILER_SMTP_URL=f"smtp://127.0.0.1:{smtp_port}?tls=none",
               MAILER_SMTP_MAX_PER_CONNECTION="100000", MAILER_CONFIG=str(var / "none.toml"))
    if dkim_key is not None:
        env.update(MAILER_DKIM_KEY_FILE=str(dkim_key), MAILER_DKIM_SELECTOR="bench")
        if sign_processes is not None:
            env["MAILER_DKIM_SIGN_PROCESSES"] = str(sign_processes)
    return env


def populate(url: str, var: Path, n: int, small: int) -> None:
    """N active subscribers on the newsletter topic, inserted the way an import does; the first
    `small` of them in Essex, so a run for the slower sink can target just them."""
    from mailer import migrations
    from mailer.config import Settings
    from subscribers import store
    from subscribers.db import make_engine, session_factory
    from subscribers.models import Channel

    migrations.upgrade(url)
    engine = make_engine(url)
    rules = Settings(var_dir=var, suppression_key="k" * 40).rules()
    ctx = store.Context(channel=Channel.IMPORT, lawful_basis="public_task")
    with session_factory(engine)() as s:
        topics = store.topics_by_slug(s, ["newsletter"])
        for start in range(0, n, 5000):
            profiles = [(store.profile_from(rules, email=f"reader{i}@kent.police.uk",
                                            name=f"Reader {i}",
                                            region="essex" if i < small else "kent"), topics)
                        for i in range(start, min(n, start + 5000))]
            store.bulk_add_active(s, rules, profiles, ctx)
        store.refresh_statistics(s)  # as the importer does after a large import
        s.commit()
    engine.dispose()


def enqueue(url: str, var: Path, slug: str, regions: list[str] | None = None
            ) -> tuple[int, float]:
    """Store the sample edition under `slug` and queue it; returns (rows, seconds)."""
    from mailer import outbox
    from mailer.config import Settings
    from mailer.edition import load_edition
    from mailer.render import compile_edition
    from subscribers.db import make_engine, session_factory

    settings = Settings(var_dir=var, database_url=url, secret_key="s" * 40,
                        suppression_key="k" * 40)
    engine = make_engine(url)
    with session_factory(engine)() as s:
        parsed = load_edition(SAMPLE)
        compiled = compile_edition(parsed, settings)
        edition, _ = outbox.store_edition(
            s, slug=slug, title=parsed.meta.title, subject=parsed.meta.subject,
            topic="newsletter", regions=regions or [], roles=[], source=SAMPLE.read_text() + slug,
            compiled=compiled.to_dict(), actor="bench")
        s.commit()
        started = time.perf_counter()
        added = outbox.enqueue(s, edition)
        s.commit()
        seconds = time.perf_counter() - started
    engine.dispose()
    return added, seconds


def run_worker(url: str, var: Path, port: int, conns: int,
               stop_after: float | None = None, processes: int = 1,
               dkim_key: Path | None = None, sign_processes: int | None = None
               ) -> dict[str, float]:
    """`mailer worker --drain` in `processes` child processes at once (PostgreSQL for more
    than one); CPU is theirs together (and their signing processes'), peak RSS the largest."""
    env = _env(url, var, port, conns, dkim_key, sign_processes)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "mailer", "worker", "--drain",
                               "--name", f"bench-{i}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(processes)]
    if stop_after is not None:
        try:
            procs[0].wait(timeout=stop_after)
        except subprocess.TimeoutExpired:
            for proc in procs:
                proc.terminate()  # SIGTERM: it finishes what is in flight and exits
    sent = 0
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed: {err.strip()[-500:]}")
        sent += int(out.split("sent ", 1)[1].split(",", 1)[0])
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"sent": sent, "seconds": seconds,
            "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "rss_mb": after.ru_maxrss / 1024}


def mailmerge_rate(port: int, n: int, work: Path) -> float | None:
    """mailmerge (PyPI) on the same sink: a new venv, a CSV of n rows, the edition's text."""
    venv = ROOT / "var" / "bench" / "mailmerge-venv"
    exe = venv / "bin" / "mailmerge"
    if not exe.exists():
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], check=False)
        got = made.returncode == 0 and subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "mailmerge"], check=False,
            capture_output=True).returncode == 0
        if not got:
            return None
    (work / "mailmerge_server.conf").write_text(
        f"[smtp_server]\nhost = 127.0.0.1\nport = {port}\nsecurity = Never\nratelimit = 0\n")
    (work / "mailmerge_template.txt").write_text(
        "TO: {{email}}\nFROM: msht-bulletin@example.org\nSUBJECT: MSHT newsletter\n"
        "MIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=\"b\"\n\n--b\n"
        "Content-Type: text/plain; charset=utf-8\n\nDear {{name}},\n" + "x" * 20000 +
        "\n--b\nContent-Type: text/html; charset=utf-8\n\n<p>Dear {{name}}</p>" + "y" * 40000
        + "\n--b--\n")
    with (work / "mailmerge_database.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["email", "name"])
        writer.writerows([f"r{i}@example.org", f"Reader {i}"] for i in range(n))
    started = time.perf_counter()
    subprocess.run([str(exe), "--no-dry-run", "--no-limit", "--output-format", "raw"],
                   cwd=work, check=True, stdout=subprocess.DEVNULL)
    return n / (time.perf_counter() - started)


def scale(base: str, work: Path, port: int) -> None:
    """Enqueue time and worker peak RSS as the audience grows, on PostgreSQL."""
    print(f"\n{'recipients':>12} {'populate s':>11} {'enqueue s':>10} {'worker RSS':>11}")
    for n in (10_000, 100_000, 1_000_000):
        name, url = pgdb.create(base)
        try:
            from mailer import migrations

            migrations.upgrade(url)
            started = time.perf_counter()
            engine = create_engine(make_url(url).set(drivername="postgresql+psycopg"))
            with engine.begin() as conn:  # a data generator: plain SQL is fine in a bench
                conn.execute(text(
                    "INSERT INTO subscriber (email, email_key, email_hmac, status, "
                    "bounce_score, created_at, updated_at, region) "
                    "SELECT 'r'||g||'@kent.police.uk', 'r'||g||'@kent.police.uk', md5(g::text), "
                    "'active', 0, now(), now(), 'kent' "
                    "FROM generate_series(1, :n) g"), {"n": n})
                conn.execute(text(
                    "INSERT INTO subscription (subscriber_id, topic_id, status, created_at, "
                    "updated_at) SELECT id, (SELECT id FROM topic WHERE slug='newsletter'), "
                    "'active', now(), now() FROM subscriber"))
            engine.dispose()
            populated = time.perf_counter() - started
            _, enqueue_seconds = enqueue(url, work, f"scale-{n}")
            worker = run_worker(url, work, port, 4, stop_after=15)
            print(f"{n:>12,} {populated:>11.1f} {enqueue_seconds:>10.1f} "
                  f"{worker['rss_mb']:>8.0f} MB  (sent {worker['sent']:,} in 15 s)")
        finally:
            pgdb.drop(base, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--n-aiosmtpd", type=int, default=3000)
    parser.add_argument("--conns", default="1,4,16")
    parser.add_argument("--postgres", default=os.environ.get("MAILER_TEST_POSTGRES_URL", ""))
    parser.add_argument("--mailmerge-n", type=int, default=300)
    parser.add_argument("--scale", action="store_true")
    parser.add_argument("--workers", type=int, default=2,
                        help="also run this many worker processes at once on PostgreSQL")
    parser.add_argument("--no-signed", action="store_true",
                        help="skip the signed column (DKIM, RSA-2048)")
    parser.add_argument("--sign-processes", type=int, default=None,
                        help="MAILER_DKIM_SIGN_PROCESSES for the signed runs (default: one "
                             "per CPU; 0 signs inline in the worker's loop)")
    parser.add_argument("--no-peers", action="store_true",
                        help="skip the bare client and mailmerge (shorter runs)")
    parser.add_argument("--sinks", default="smtp-sink,aiosmtpd",
                        help="which sinks to measure against")
    parser.add_argument("--scale-only", action="store_true",
                        help="only the enqueue/RSS growth on PostgreSQL (needs --postgres)")
    args = parser.parse_args()
    if args.scale_only:
        if not args.postgres:
            parser.error("--scale-only needs --postgres or MAILER_TEST_POSTGRES_URL")
        sink, port = smtp_raw.start_sink("smtp-sink" if smtp_raw.smtp_sink_path() else "aiosmtpd")
        try:
            with tempfile.TemporaryDirectory() as tmp:
                scale(args.postgres, Path(tmp), port)
        finally:
            sink.terminate()
            sink.wait()
        return
    conns_list = [int(c) for c in args.conns.split(",")]
    print(f"{os.cpu_count()} CPUs; load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; python {sys.version.split()[0]}")

    wanted = args.sinks.split(",")
    sinks = [("aiosmtpd", args.n_aiosmtpd)] if "aiosmtpd" in wanted else []
    if smtp_raw.smtp_sink_path():
        if "smtp-sink" in wanted:
            sinks.insert(0, ("smtp-sink", args.n))
    else:
        print("smtp-sink: not installed (apt-get install postfix; no daemon needed), skipped")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dkim_key = None
        if not args.no_signed:
            from mailer import dkim

            dkim_key = work / "dkim-bench.pem"
            dkim.generate_key(dkim_key)
        backends = [("sqlite", f"sqlite:///{work / 'bench.db'}", None)]
        if args.postgres:
            name, url = pgdb.create(args.postgres)
            backends.append(("postgresql", url, name))
        print(f"\n{'backend':<11}{'sink':<10}{'conns':>6}{'msgs':>8}{'msgs/s':>9}"
              f"{'worker CPU':>12}{'peak RSS':>10}{'enqueue s':>11}"
              + ("" if dkim_key is None else f"{'signed msgs/s':>15}{'signed CPU':>12}"))

        def signed(url: str, port: int, conns: int, slug: str, regions: list[str] | None,
                   processes: int = 1) -> str:
            if dkim_key is None:
                return ""
            enqueue(url, work, slug + "-signed", regions)
            r = run_worker(url, work, port, conns, processes=processes, dkim_key=dkim_key,
                           sign_processes=args.sign_processes)
            return (f"{r['sent'] / r['seconds']:>15,.0f}"
                    f"{100 * r['cpu'] / r['seconds']:>10.0f} %")
        try:
            for backend, url, _ in backends:
                populate(url, work, max(n for _, n in sinks), args.n_aiosmtpd)
                for sink_name, _ in sinks:
                    sink, port = smtp_raw.start_sink(sink_name)
                    try:
                        for conns in conns_list:
                            small = sink_name == "aiosmtpd"  # ~300 msgs/s: a smaller audience
                            _, enq = enqueue(url, work, f"{sink_name}-{conns}",
                                                 ["essex"] if small else None)
                            r = run_worker(url, work, port, conns)
                            regions = ["essex"] if small else None
                            print(f"{backend:<11}{sink_name:<10}{conns:>6}{r['sent']:>8,}"
                                  f"{r['sent'] / r['seconds']:>9,.0f}"
                                  f"{100 * r['cpu'] / r['seconds']:>10.0f} %"
                                  f"{r['rss_mb']:>7.0f} MB{enq:>11.2f}"
                                  + signed(url, port, conns, f"{sink_name}-{conns}", regions),
                                  flush=True)
                        if backend == "postgresql" and args.workers > 1 and not small:
                            conns = max(conns_list)
                            _, enq = enqueue(url, work, f"{sink_name}-x{args.workers}")
                            r = run_worker(url, work, port, conns // args.workers,
                                           processes=args.workers)
                            print(f"{backend:<11}{sink_name:<10}"
                                  f"{f'{args.workers}x{conns // args.workers}':>6}"
                                  f"{r['sent']:>8,}{r['sent'] / r['seconds']:>9,.0f}"
                                  f"{100 * r['cpu'] / r['seconds']:>10.0f} %"
                                  f"{r['rss_mb']:>7.0f} MB{enq:>11.2f}"
                                  + signed(url, port, conns // args.workers,
                                           f"{sink_name}-x{args.workers}", None, args.workers),
                                  flush=True)
                    finally:
                        sink.terminate()
                        sink.wait()
            if args.no_peers or not sinks:
                return
            sink, port = smtp_raw.start_sink(sinks[0][0])
            try:
                bare = smtp_raw.measure(sink, port, "bare", sinks[0][1], 8)
                print(f"\npeer: bare asyncio client (pre-built messages), 8 conns, "
                      f"{sinks[0][0]}: {bare['sent'] / bare['seconds']:,.0f} msgs/s")
                rate = mailmerge_rate(port, args.mailmerge_n, work)
                print("peer: mailmerge: " + (f"{rate:,.1f} msgs/s ({args.mailmerge_n} messages)"
                                             if rate else "not installable here, skipped"))
                if args.scale and args.postgres:
                    scale(args.postgres, work, port)
            finally:
                sink.terminate()
                sink.wait()
        finally:
            for _, _, name in backends:
                if name:
                    pgdb.drop(args.postgres, name)


if __name__ == "__main__":
    main()
