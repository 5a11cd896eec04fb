"""Import benchmark: generate N subscriber rows, import them with `--apply`, print rows/s and
peak RSS, on SQLite and (when MAILER_TEST_POSTGRES_URL or --postgres is given) PostgreSQL.

    .venv/bin/python bench/import_subscribers.py --rows 100000 --runs 3 \
        --postgres postgresql://postgres@127.0.0.1:5432/test

Each run is a child process of its own, so its peak RSS is its own, and imports into a fresh
database (a second import of the same file would add nothing).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

REGIONS = ["kent", "essex", "medway", "southend", "thurrock"]
TYPES = ["police", "local_authority", "ngo", "health", "border", "other"]
ROLES = ["first_responder", "spoc", "safeguarding", "investigator", "analyst", "manager"]
DOMAINS = ["kent.police.uk", "essex.police.uk", "kent.gov.uk", "essex.gov.uk", "nhs.net",
           "example.org"]


def generate(path: Path, rows: int, seed: int = 7) -> None:
    rnd = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["email", "name", "organisation", "organisation_type", "role", "region",
                         "topics"])
        for i in range(rows):
            writer.writerow([
                f"first.last{i}@{rnd.choice(DOMAINS)}", f"Person {i}", "Some Organisation",
                rnd.choice(TYPES), rnd.choice(ROLES), rnd.choice(REGIONS),
                rnd.choice(["newsletter", "newsletter|reminders", ""]),
            ])


def one(url: str, csv_path: Path) -> dict[str, float]:
    from mailer import migrations
    from mailer.config import Settings
    from subscribers import importer
    from subscribers.db import make_engine, session_factory

    migrations.upgrade(url)
    engine = make_engine(url)
    rules = Settings(var_dir=csv_path.parent, suppression_key="b" * 40).rules()
    options = importer.Options(lawful_basis="public_task", actor="bench")
    started = time.perf_counter()
    report = importer.import_file(session_factory(engine), rules, csv_path, options, apply=True)
    elapsed = time.perf_counter() - started
    assert report.applied and report.new == report.rows, report.errors[:3]
    engine.dispose()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": report.rows, "seconds": elapsed, "rows_per_s": report.rows / elapsed,
            "peak_rss_mb": rss}


def _fresh_database(admin: Engine) -> str:
    """A new empty PostgreSQL database on the server; returns its name."""
    name = f"bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--postgres", default=os.environ.get("MAILER_TEST_POSTGRES_URL", ""))
    parser.add_argument("--runs", type=int, default=1,
                        help="imports per backend, each into a fresh database (the machine is "
                             "shared, so one figure is noisy); prints best and median")
    parser.add_argument("--child", nargs=2, metavar=("URL", "CSV"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child[0], Path(args.child[1]))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "subscribers.csv"
        started = time.perf_counter()
        generate(csv_path, args.rows)
        print(f"generated {args.rows:,} rows ({csv_path.stat().st_size / 2**20:.1f} MiB) in "
              f"{time.perf_counter() - started:.1f} s")
        backends = ["sqlite"] + (["postgresql"] if args.postgres else [])
        admin = (create_engine(make_url(args.postgres).set(drivername="postgresql+psycopg"),
                               isolation_level="AUTOCOMMIT") if args.postgres else None)
        print(f"{'backend':<12}{'rows':>10}{'seconds':>10}{'rows/s':>10}{'peak RSS':>12}")
        for backend in backends:
            rates = []
            for run in range(args.runs):
                pg_db = None
                if backend == "sqlite":
                    url = f"sqlite:///{Path(tmp) / f'bench{run}.db'}"
                else:
                    assert admin is not None
                    pg_db = _fresh_database(admin)
                    url = make_url(args.postgres).set(database=pg_db).render_as_string(
                        hide_password=False)
                try:
                    out = subprocess.run([sys.executable, __file__, "--child", url,
                                          str(csv_path)], capture_output=True, text=True,
                                         check=True)
                finally:
                    if admin is not None and pg_db:
                        with admin.connect() as conn:
                            conn.execute(text(f'DROP DATABASE IF EXISTS "{pg_db}" WITH (FORCE)'))
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rates.append(r["rows_per_s"])
                print(f"{backend:<12}{r['rows']:>10,}{r['seconds']:>10.1f}"
                      f"{r['rows_per_s']:>10,.0f}{r['peak_rss_mb']:>9.0f} MB")
            if args.runs > 1:
                print(f"{backend:<12}best {max(rates):,.0f} rows/s, "
                      f"median {statistics.median(rates):,.0f} rows/s over {args.runs} runs")
        if admin is not None:
            admin.dispose()


if __name__ == "__main__":
    main()
