"""Backup benchmark: create, verify and restore a database of N subscribers and their outbox.

    .venv/bin/python bench/backup.py                      # SQLite (+ PostgreSQL if configured)
    .venv/bin/python bench/backup.py --n 100000 --postgres postgresql://postgres@127.0.0.1/test

Each subscriber is active on the newsletter with one consent event, and has one delivery of a
sent edition (the sample, as the worker leaves it: sent, reply 250). Prints, per backend, the
seconds for `backup.create` (dump, manifest, encryption), `backup.verify` and `backup.restore`
into a fresh database (decrypt, check, load, pause, release), the dump's and the sealed file's
size, and the row counts restored.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pgdb  # noqa: E402  (a throwaway PostgreSQL database)

SAMPLE = ROOT / "editions" / "2020-q3-kent-essex.md"


def populate(url: str, var: Path, n: int) -> None:
    """N subscribers, subscriptions and consent events in bulk SQL; then the sample edition
    enqueued through `outbox.enqueue` and marked sent, as a finished send leaves it."""
    from mailer import migrations, outbox
    from mailer.config import Settings
    from subscribers.db import make_engine, session_factory

    migrations.upgrade(url)
    engine = make_engine(url, poolclass=NullPool)
    series = ("generate_series(1, :n) AS g(x)" if engine.dialect.name == "postgresql" else
              "(WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < :n) "
              "SELECT x FROM s) AS g")
    now = "CURRENT_TIMESTAMP"
    with engine.begin() as conn:  # a data generator: plain SQL is fine in a bench
        conn.execute(text(
            "INSERT INTO subscriber (email, email_key, email_hmac, name, status, bounce_score, "  # noqa: S608
            "created_at, updated_at, region) SELECT 'reader' || x || '@kent.police.uk', "
            "'reader' || x || '@kent.police.uk', 'h' || x, 'Reader ' || x, 'active', 0, "
            f"{now}, {now}, 'kent' FROM {series}"), {"n": n})
        conn.execute(text(
            "INSERT INTO subscription (subscriber_id, topic_id, status, created_at, updated_at) "  # noqa: S608
            "SELECT id, (SELECT id FROM topic WHERE slug = 'newsletter'), 'active', "
            f"{now}, {now} FROM subscriber"))
        conn.execute(text(
            "INSERT INTO consent_event (subscriber_id, action, channel, topic, lawful_basis, "  # noqa: S608
            f"occurred_at) SELECT id, 'subscribe', 'import', 'newsletter', 'public_task', {now} "
            "FROM subscriber"))
    settings = Settings(var_dir=var, database_url=url, secret_key="s" * 40,
                        suppression_key="k" * 40)
    with session_factory(engine)() as s:
        edition, _ = outbox.store_edition_file(s, settings, SAMPLE, "bench")
        outbox.enqueue(s, edition)
        s.commit()
    with engine.begin() as conn:
        conn.execute(text("UPDATE delivery SET status = 'sent', attempts = 1, last_code = 250, "  # noqa: S608
                          f"last_reply = '250 2.0.0 OK queued', sent_at = {now}, "
                          f"last_attempt_at = {now}"))
        conn.execute(text("UPDATE edition SET status = 'sent'"))
    engine.dispose()


def measure(backend: str, url: str, fresh: str, work: Path, n: int) -> None:
    from mailer import backup
    from mailer.config import Settings

    key = work / f"{backend}.key"
    backup.make_key_file(key)
    settings = Settings(var_dir=work / "var", database_url=url, secret_key="s" * 40,
                        suppression_key="k" * 40, backup_key_file=key)
    started = time.perf_counter()
    populate(url, work, n)
    populated = time.perf_counter() - started

    path = work / f"{backend}.mbak"
    started = time.perf_counter()
    made = backup.create(settings, path)
    created = time.perf_counter() - started
    started = time.perf_counter()
    backup.verify(settings, path)
    verified = time.perf_counter() - started
    target = settings.model_copy(update={"database_url": fresh})
    started = time.perf_counter()
    done = backup.restore(target, path)
    restored = time.perf_counter() - started
    counts = done.manifest.row_counts
    print(f"{backend:<11}{n:>9,}{populated:>10.1f}{created:>9.2f}{verified:>9.2f}"
          f"{restored:>10.2f}{made.manifest.dump_bytes / 1e6:>10.1f} MB"
          f"{made.size / 1e6:>9.1f} MB   {counts['subscriber']:,} subscribers, "
          f"{counts['delivery']:,} deliveries, {counts['consent_event']:,} consent events")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--postgres", default=os.environ.get("MAILER_TEST_POSTGRES_URL", ""))
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; python {sys.version.split()[0]}")
    print(f"\n{'backend':<11}{'readers':>9}{'fill s':>10}{'create s':>9}{'verify s':>9}"
          f"{'restore s':>10}{'dump':>13}{'sealed':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        measure("sqlite", f"sqlite:///{work / 'bench.db'}",
                f"sqlite:///{work / 'restored.db'}", work, args.n)
        if args.postgres:
            source, url = pgdb.create(args.postgres)
            target, fresh = pgdb.create(args.postgres)
            try:
                measure("postgresql", url, fresh, work, args.n)
            finally:
                pgdb.drop(args.postgres, source)
                pgdb.drop(args.postgres, target)
        else:
            print("postgresql: skipped (give --postgres or MAILER_TEST_POSTGRES_URL)")


if __name__ == "__main__":
    main()
