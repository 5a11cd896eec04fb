"""`mailer demo`: the whole system on one machine in one command, with nothing to configure.

A fresh SQLite database under `var/demo/` (migrated), about 200 generated first responders
across Kent and Essex (fictional people on `.example` domains), the sample edition and the
events calendar. The dev sink runs in-process; the edition is sent to it by the real worker
(rate limits off) behind a progress bar, the next reminders are planned, and then the web app
is served with a dev inbox (`/dev/inbox`) where each mail can be opened and its links followed,
while the scheduler and a worker run alongside (as `mailer run` does).

`run_all_in_one` is also what `mailer run` uses: web, scheduler and worker in one process for
the single-host setup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy.orm import Session, sessionmaker

from mailer import events, migrations, outbox, schedule
from mailer.accounts import Role
from mailer.config import Settings, load_settings
from mailer.devsink import DevSink
from mailer.operations import command_line_caller
from mailer.operations import users as user_ops
from mailer.worker import Worker, run_loop
from subscribers import store
from subscribers.db import make_engine, session_factory, session_scope, utcnow
from subscribers.models import Channel
from subscribers.rules import Rules

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_EDITION = ROOT / "editions" / "2020-q3-kent-essex.md"
DEMO_DIR = Path("var") / "demo"
DEMO_SIZE = 200
# Fictional organisations on reserved `.example` domains (RFC 2606): nothing here can reach a
# real person, whatever goes wrong. Regions are police force areas (Medway is in Kent's,
# Southend and Thurrock in Essex's), so the sample edition (Kent and Essex) reaches everyone.
ORGANISATIONS: list[tuple[str, str, str, str, tuple[str, ...]]] = [
    ("Kent Police", "police", "kent", "kent.police.example",
     ("first_responder", "spoc", "investigator", "analyst")),
    ("Essex Police", "police", "essex", "essex.police.example",
     ("first_responder", "spoc", "investigator", "analyst")),
    ("Kent County Council", "local_authority", "kent", "kent.gov.example",
     ("safeguarding", "first_responder", "manager")),
    ("Essex County Council", "local_authority", "essex", "essex.gov.example",
     ("safeguarding", "first_responder", "manager")),
    ("Medway Council", "local_authority", "kent", "medway.gov.example",
     ("safeguarding", "first_responder")),
    ("Southend-on-Sea City Council", "local_authority", "essex", "southend.gov.example",
     ("safeguarding", "first_responder")),
    ("Thurrock Council", "local_authority", "essex", "thurrock.gov.example",
     ("safeguarding", "first_responder")),
    ("Kent and Medway NHS Trust", "health", "kent", "kentmedway.nhs.example",
     ("safeguarding", "first_responder")),
    ("Mid and South Essex NHS Trust", "health", "essex", "midsouthessex.nhs.example",
     ("safeguarding", "first_responder")),
    ("Border Force, Port of Dover", "border", "kent", "dover.borderforce.example",
     ("first_responder", "investigator")),
    ("Immigration Enforcement, Harwich", "border", "essex", "harwich.homeoffice.example",
     ("first_responder", "investigator")),
    ("Harbour Light Trust", "ngo", "kent", "harbourlight.example",
     ("support_worker", "first_responder", "manager")),
    ("Open Door Essex", "ngo", "essex", "opendooressex.example",
     ("support_worker", "first_responder")),
]
# Sign-ups from the demo's public-sector domains need no approval, as police.uk would not.
DEMO_DOMAINS = sorted({org[3] for org in ORGANISATIONS if org[1] != "ngo"})
FIRST = ["Amelia", "Oliver", "Priya", "Mohammed", "Sarah", "James", "Chloe", "Daniel", "Aisha",
         "Thomas", "Emily", "Kwame", "Grace", "Liam", "Zofia", "Harry", "Fatima", "George",
         "Hannah", "Tomasz", "Ruth", "Samuel", "Niamh", "Adebayo", "Lucy", "Rajesh", "Megan",
         "Connor", "Siobhán", "Ewa", "Joseph", "Isla", "Olumide", "Rebecca", "Andrei", "Jade"]
LAST = ["Smith", "Patel", "Jones", "Khan", "Taylor", "Brown", "Williams", "Nowak", "Wilson",
        "Okafor", "Evans", "Thomas", "Roberts", "Ahmed", "Walker", "Wright", "Kowalski",
        "Hughes", "Green", "Hall", "Mensah", "Clarke", "O'Brien", "Begum", "Turner", "Murphy",
        "Popescu", "Hill", "Ward", "Adeyemi", "Cooper", "Baker", "Singh", "Lewis", "Marsh"]


@dataclass
class DemoResult:
    settings: Settings
    subscribers: int
    edition: str
    queued: int
    sent: int
    in_inbox: int
    reminders: list[schedule.AgendaItem] = field(default_factory=list)
    directory: Path = DEMO_DIR


@dataclass(frozen=True)
class DemoAccount:
    login: str
    name: str
    what: str  # what the newcomer can do with it
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12), repr=False)


# The four-eyes path needs two people: one wrote the sample edition, the other approved it.
# Their passwords are new on every run (the demo's data is wiped each time) and are printed.
DEMO_ACCOUNTS = (
    DemoAccount("demo.author", "Dana Author", "a co-ordinator, who wrote the sample edition"),
    DemoAccount("demo.approver", "Ash Approver", "a second co-ordinator, who approved it"),
)


def demo_settings(directory: Path, smtp_url: str, host: str = "127.0.0.1",
                  port: int = 8000) -> Settings:
    """The demo's own settings: everything under `directory`, mail to the dev sink, no limits."""
    directory = directory.resolve()
    defaults = Settings.model_fields["trusted_domains"].get_default(call_default_factory=True)
    return load_settings(
        var_dir=directory, database_url=f"sqlite:///{directory / 'mailer.db'}",
        smtp_url=smtp_url, base_url=f"http://{host}:{port}", rate_per_minute=0,
        rate_per_day=0, archive_dir=directory / "archive",
        trusted_domains=[*defaults, *DEMO_DOMAINS])


def generate_people(rules: Rules, count: int = DEMO_SIZE, seed: int = 2020
                    ) -> list[tuple[store.Profile, bool]]:
    """`count` plausible first responders: (profile, wants reminders). Deterministic."""
    rng = random.Random(seed)  # noqa: S311 - test data, not security
    people: list[tuple[store.Profile, bool]] = []
    used: set[str] = set()
    while len(people) < count:
        first, last = rng.choice(FIRST), rng.choice(LAST)
        name, org_type, region, domain, roles = rng.choice(ORGANISATIONS)
        local = f"{first}.{last}".lower().replace("'", "").replace("á", "a")
        address = f"{local}@{domain}"
        n = 2
        while address in used:
            address = f"{local}{n}@{domain}"
            n += 1
        used.add(address)
        profile = store.profile_from(rules, email=address, name=f"{first} {last}",
                                     organisation=name, organisation_type=org_type,
                                     role=rng.choice(roles), region=region)
        people.append((profile, rng.random() < 0.8))
    return people


def prepare(settings: Settings, count: int = DEMO_SIZE) -> sessionmaker[Session]:
    """Migrate the (fresh) database and fill it: people, their topics, the events calendar."""
    migrations.upgrade(settings.database)
    sessions = session_factory(make_engine(settings.database))
    rules = settings.rules()
    with session_scope(sessions) as session:
        newsletter, reminders = store.topics_by_slug(session, ["newsletter", "reminders"])
        people = generate_people(rules, count)
        store.bulk_add_active(
            session, rules,
            [(p, [newsletter, reminders] if wants else [newsletter]) for p, wants in people],
            store.Context(channel=Channel.IMPORT, actor="demo", lawful_basis="public_task",
                          detail={"source": "mailer demo"}))
    with session_scope(sessions) as session:
        for account in DEMO_ACCOUNTS:
            user_ops.add(session, command_line_caller(), login=account.login,
                         name=account.name, role=Role.COORDINATOR, regions=["kent", "essex"],
                         known_regions=list(settings.regions), password=account.password,
                         email=f"{account.login}@kent.police.example")
    # The view-online link of the edition reads the published source from the archive.
    settings.archive_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
    shutil.copy(SAMPLE_EDITION, settings.archive_dir / SAMPLE_EDITION.name)  # type: ignore[operator]
    return sessions


def send_with_progress(settings: Settings, sessions: sessionmaker[Session], edition_id: int,
                       console: Console) -> int:
    """Drain the outbox with the real worker on a thread, showing a progress bar; returns how
    many were sent."""
    worker = Worker(settings, sessions, poll=0.1)
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["summary"] = run_loop(worker.run(drain=True))
        except BaseException as exc:  # shown on the main thread
            outcome["error"] = exc

    def read() -> outbox.Progress:
        with session_scope(sessions) as session:
            return outbox.progress(session, outbox.get_edition(session, edition_id))

    thread = threading.Thread(target=work, name="demo-worker", daemon=True)
    thread.start()
    bar = Progress(TextColumn("sending"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=False)
    with bar:
        first = read()
        task = bar.add_task("send", total=first.total)
        while thread.is_alive():
            thread.join(0.1)
            p = read()
            bar.update(task, completed=p.total - p.remaining, total=p.total)
        p = read()
        bar.update(task, completed=p.total - p.remaining, total=p.total)
    if "error" in outcome:
        raise outcome["error"]
    return int(outcome["summary"].sent)


def run_demo(console: Console, *, directory: Path = DEMO_DIR, serve: bool = True,
             host: str = "127.0.0.1", port: int = 8000, count: int = DEMO_SIZE) -> DemoResult:
    """The demo from nothing. Wipes `directory` first: it only ever holds demo data."""
    directory = directory.resolve()
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    sink = DevSink(directory / "inbox", port=0).start()
    try:
        settings = demo_settings(directory, sink.url, host, port)
        console.print(f"demo database: {escape(settings.database)}")
        sessions = prepare(settings, count)
        with session_scope(sessions) as session:
            # The four-eyes path a real send takes: one co-ordinator writes and asks, another
            # approves; the edition's record shows both.
            edition, _ = outbox.store_edition_file(session, settings, SAMPLE_EDITION,
                                                   "demo.author")
            outbox.request_approval(session, edition, "demo.author")
            outbox.approve(session, edition, "demo.approver")
            queued = outbox.send_approved(session, edition, "demo.approver")
            # As sent: with its protective marking (mailer.marking).
            edition_id, slug, subject = edition.id, edition.slug, edition.compiled["subject"]
        console.print(f"{count} demo subscribers; edition '{escape(slug)}' queued for "
                      f"{queued} of them")
        sent = send_with_progress(settings, sessions, edition_id, console)
        in_inbox = sum(1 for m in sink.messages() if m.subject == subject)
        now = utcnow()
        with session_scope(sessions) as session:
            events.plan_reminders(session, now)
            upcoming = [i for i in schedule.agenda(session, now, days=400)
                        if i.kind == "reminder"][:4]
        result = DemoResult(settings, count, slug, queued, sent, in_inbox, upcoming, directory)
        _summary(console, result)
        if serve:
            from mailer.web.app import create_app

            app = create_app(settings, dev_inbox=sink.directory)
            base = settings.base_url
            console.print("\n[bold]Open these in a browser[/] (Ctrl-C stops the demo):")
            for label, path in (("the dev inbox", "/dev/inbox"), ("subscribe", "/subscribe"),
                                ("the archive", "/archive"), ("the console", "/admin")):
                console.print(f"  {label:14} {base}{path}")
            _sign_ins(console, result)
            run_all_in_one(settings, app, host, port, console=console)
        return result
    finally:
        sink.stop()


def _sign_ins(console: Console, r: DemoResult) -> None:
    console.print(f"\n[bold]Sign in to the console[/] at {r.settings.base_url}/admin as")
    for account in DEMO_ACCOUNTS:
        console.print(f"  {account.what}: login [bold]{account.login}[/], "
                      f"password [bold]{escape(account.password)}[/]")


def _summary(console: Console, r: DemoResult) -> None:
    console.print(f"[green]sent {r.sent} of {r.queued}[/]; the dev inbox holds {r.in_inbox} "
                  f"cop{'y' if r.in_inbox == 1 else 'ies'} of the edition "
                  f"({escape(str(r.directory / 'inbox'))})")
    if r.reminders:
        console.print("next reminders (the scheduler sends them on time):")
        for item in r.reminders:
            assert item.at is not None
            console.print(f"  {schedule.uk_time(item.at):26} ({schedule.utc_time(item.at)})  "
                          f"{escape(item.what)}")
    here = os.path.relpath(r.directory)
    command = Path(sys.executable).with_name("mailer")  # the one in this environment
    command_text = os.path.relpath(command) if command.exists() else "mailer"
    console.print(f"the command line on the demo's data (in this directory): "
                  f"MAILER_VAR_DIR={escape(here)} {escape(command_text)} subscribers list")


# ---------------------------------------------------------------- one process, one host

@contextlib.contextmanager
def _signals_end_the_server() -> Iterator[None]:
    """uvicorn stops on SIGTERM or SIGINT and then raises the signal again under the handler
    it found. The default SIGTERM handler kills the process there, before the worker has
    finished what is in flight, and SIGINT's raises KeyboardInterrupt: so the handler it
    finds is this one, which lets the shutdown below run and the process exit 0."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run_all_in_one(settings: Settings, app: Any, host: str, port: int, *,
                   console: Console | None = None,
                   ready: Callable[[], None] | None = None) -> None:
    """Serve `app` and run the scheduler and a worker beside it until Ctrl-C or SIGTERM.

    The single-host setup (`mailer run`): uvicorn owns the main thread and the signals; the
    scheduler (standby if another leads) and the worker run on threads and are stopped, the
    worker finishing what is in flight, when the server exits.
    """
    import uvicorn

    sessions = session_factory(make_engine(settings.database))
    stop = threading.Event()
    scheduler = schedule.Scheduler(settings, sessions)
    worker = Worker(settings, sessions)
    worker_loop: dict[str, asyncio.AbstractEventLoop] = {}

    async def work() -> None:
        worker_loop["loop"] = asyncio.get_running_loop()
        await worker.run()

    def run_worker() -> None:
        try:
            run_loop(work())
        except Exception:
            log.exception("the worker stopped")

    threads = [threading.Thread(target=scheduler.run, args=(stop,), name="mailer-scheduler",
                                daemon=True),
               threading.Thread(target=run_worker, name="mailer-worker", daemon=True)]
    for thread in threads:
        thread.start()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           server_header=False, proxy_headers=True))
    if ready is not None:
        ready()
    try:
        with _signals_end_the_server():
            server.run()
    finally:
        stop.set()
        loop = worker_loop.get("loop")
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(worker.stopping.set)
        for thread in threads:
            thread.join(timeout=60)
        if console is not None:
            console.print("stopped: web, scheduler and worker")

