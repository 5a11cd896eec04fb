"""Benchmark the structured editor's live preview: the sample edition's form, one figures cell
changed each time, posted to /admin/editions/compose/preview (what editor.js sends as the
author types) and answered with the new preview's key and the preflight warnings per section.
Goal: under 150 ms p99 server time.

The app runs in process (Starlette's TestClient: no socket, so the figure is the server's own
time: reading the form, `edition_form.to_source`, validation, the audience check in the
database, rendering with MJML and CSS inlining, preflight). Also prints the library's share
(`edition_ops.draft_preview` alone).

    .venv/bin/python bench/editor_preview.py [--runs 200]
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SAMPLE = ROOT / "editions" / "2020-q3-kent-essex.md"
PASSWORD = secrets.token_urlsafe(16)  # a throwaway account in a throwaway database


def _fields(form: object) -> dict[str, str]:
    """The editor's fields for an `EditionForm`, named as the page names them."""
    from mailer import edition_form as ef

    assert isinstance(form, ef.EditionForm)
    out = {"title": form.title, "issue": form.issue, "date": form.date,
           "subject": form.subject, "preheader": form.preheader, "topic": form.topic,
           "from_name": form.from_name, "intro": form.intro, "roles": ", ".join(form.roles),
           "sections": str(len(form.sections)), "slug": "bench"}
    for i, s in enumerate(form.sections):
        out |= {f"s{i}.heading": s.heading, f"s{i}.layout": s.layout, f"s{i}.body": s.body,
                f"s{i}.tables": str(len(s.tables))}
        for t, grid in enumerate(s.tables):
            out |= {f"s{i}.t{t}.rows": str(len(grid)), f"s{i}.t{t}.cols": str(len(grid[0]))}
            for r, row in enumerate(grid):
                for c, cell in enumerate(row):
                    out[f"s{i}.t{t}.r{r}c{c}"] = cell
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-editor-"))
    os.environ.update({"MAILER_CONFIG": str(tmp / "absent.toml"), "MAILER_VAR_DIR": str(tmp),
                       "MAILER_DATABASE_URL": f"sqlite:///{tmp / 'mailer.db'}",
                       "MAILER_SECRET_KEY": "b" * 40, "MAILER_SUPPRESSION_KEY": "k" * 40,
                       "MAILER_BASE_URL": "https://news.example.org"})
    from fastapi.testclient import TestClient

    from mailer import accounts, migrations
    from mailer import edition_form as ef
    from mailer.config import Settings
    from mailer.operations import Caller
    from mailer.operations import editions as edition_ops
    from mailer.web.app import create_app
    from subscribers.db import make_engine, session_factory, session_scope

    settings = Settings()
    migrations.upgrade(settings.database)
    engine = make_engine(settings.database)
    with session_scope(session_factory(engine)) as session:
        accounts.add_user(session, login="bench", display_name="Bench", role="coordinator",
                          password=PASSWORD, regions=["kent", "essex"],
                          known_regions=["kent", "essex"], email=None)
    form = ef.from_source(SAMPLE.read_text(encoding="utf-8"))
    fields = _fields(form)
    fields["regions"] = "kent"
    times: list[float] = []
    cpu: list[float] = []
    with TestClient(create_app(settings), base_url="https://news.example.org") as client:
        client.post("/admin/login", data={
            "login": "bench", "password": PASSWORD,
            "csrf_token": re.search(r'name="csrf_token" value="([^"]+)"',
                                    client.get("/admin/login").text)[1]})  # type: ignore[index]
        page = client.get("/admin/editions/compose").text
        token = re.search(r'name="csrf_token" value="([^"]+)"', page)[1]  # type: ignore[index]
        body = {**fields, "csrf_token": token}
        for run in range(args.runs + 5):
            body["s3.t0.r1c1"] = str(70 + run)  # Kent North: a change each time
            start, start_cpu = time.perf_counter(), time.process_time()
            answer = client.post("/admin/editions/compose/preview", data=body)
            took, took_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            assert answer.status_code == 200 and answer.json()["preview"], answer.text
            if run >= 5:  # warm: imports, template caches
                times.append(took)
                cpu.append(took_cpu)
    print(f"preview round trip (form -> source -> validated, rendered preview + preflight), "
          f"{args.runs} runs: p50 {statistics.median(times) * 1000:.1f} ms, "
          f"p99 {percentile(times, 0.99) * 1000:.1f} ms, worst {max(times) * 1000:.1f} ms")
    # CPU seconds this process spent per round trip: on a shared machine, wall time well
    # above it means the server waited for a core, not that it worked longer.
    print(f"  CPU per round trip: p50 {statistics.median(cpu) * 1000:.1f} ms, "
          f"p99 {percentile(cpu, 0.99) * 1000:.1f} ms; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with session_scope(session_factory(engine)) as session:
        actor = accounts.Actor(user_id=1, login="bench", name="Bench",
                               role=accounts.Role.COORDINATOR, regions=("kent", "essex"))
        caller = Caller(actor=actor, via="console")
        source = ef.to_source(form)
        library: list[float] = []
        for _ in range(min(args.runs, 50)):
            start = time.perf_counter()
            edition_ops.draft_preview(session, caller, settings, "bench", source)
            library.append(time.perf_counter() - start)
    print(f"  of which draft_preview (validate, audience check, render, personalise): "
          f"p50 {statistics.median(library) * 1000:.1f} ms, "
          f"p99 {percentile(library, 0.99) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
