"""`mailer run`: web, scheduler and worker in one process, the single-host setup. A real
`mailer run` process on each backend serves the pages, and its scheduler and worker send a
scheduled edition and a reminder that fell due while nothing ran, to a real SMTP sink; SIGTERM
stops all three cleanly."""

from __future__ import annotations

import email
import email.policy
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from mailer import events, outbox
from mailer.config import Settings
from mailer.devsink import DevSink
from mailer.events import Event, EventSpec, Reminder, ReminderStatus
from mailer.models import EditionStatus
from subscribers import store
from subscribers.db import session_factory, utcnow
from subscribers.models import Channel
from subscribers.rules import Rules
from tests.waiting import answering, wait_for

SAMPLE = Path(__file__).resolve().parent.parent / "editions" / "2020-q3-kent-essex.md"
PEOPLE = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _due_while_nothing_ran(sessions: sessionmaker[Session], settings: Settings,
                           rules: Rules) -> tuple[list[str], str]:
    """Readers; an approved edition scheduled for a minute ago; a reminder due a minute ago.
    Returns the readers' addresses and the reminder's event name."""
    now = utcnow()
    emails = [f"reader{i}@kent.police.uk" for i in range(PEOPLE)]
    with sessions() as s:
        s.execute(delete(Event))  # the migration's dates must not fall due here too
        topics = store.topics_by_slug(s, ["newsletter", "reminders"])
        store.bulk_add_active(s, rules, [
            (store.profile_from(rules, email=e, name=f"Reader {i}", region="kent"), topics)
            for i, e in enumerate(emails)], store.Context(channel=Channel.IMPORT))
        edition, _ = outbox.store_edition_file(s, settings, SAMPLE, "author")
        outbox.request_approval(s, edition, "author")
        outbox.approve(s, edition, "approver")
        edition.status, edition.scheduled_for = EditionStatus.SCHEDULED, now - timedelta(minutes=1)
        event, _ = events.add_event(s, EventSpec(name="Drill day", offsets=[1],
                                                 starts_on=(now + timedelta(days=3)).date()),
                                    now=now - timedelta(days=30))
        s.add(Reminder(event_id=event.id, occurrence=event.starts_on, offset_days=1,
                       send_at=now - timedelta(minutes=1), not_after=now + timedelta(hours=12),
                       status=ReminderStatus.PLANNED, updated_at=now))
        s.commit()
    return emails, "Drill day"


def test_mailer_run_serves_the_pages_and_sends_what_fell_due(
        settings: Settings, engine, rules: Rules, tmp_path: Path) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    settings = settings.model_copy(update={"base_url": base})
    emails, event_name = _due_while_nothing_ran(session_factory(engine), settings, rules)
    with DevSink(tmp_path / "sink", port=0) as sink:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
        env.update(MAILER_DATABASE_URL=settings.database, MAILER_VAR_DIR=str(settings.var_dir),
                   MAILER_SECRET_KEY="s" * 40, MAILER_SUPPRESSION_KEY="k" * 40,
                   MAILER_CONFIG=str(tmp_path / "absent.toml"), MAILER_SMTP_URL=sink.url,
                   MAILER_BASE_URL=base, MAILER_RATE_PER_MINUTE="0", MAILER_RATE_PER_DAY="0")
        proc = subprocess.Popen([sys.executable, "-m", "mailer", "run", "--port", str(port)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        lines: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            assert wait_for(answering(base, proc), 60) and proc.poll() is None, "".join(lines)
            assert wait_for(lambda: len(sink.messages()) >= 2 * PEOPLE, 60), "".join(lines)
            received = [email.message_from_bytes(sink.raw(m.key), policy=email.policy.default)
                        for m in sink.messages()]
            # the unsubscribe link a reader got is answered by this same process (a page
            # with a button: a GET changes nothing)
            link = re.match(r"<([^>]+)>", received[0]["List-Unsubscribe"])
            assert link is not None and link[1].startswith(f"{base}/u/")
            with urllib.request.urlopen(link[1], timeout=10) as page:  # noqa: S310
                assert page.status == 200 and "<form" in page.read().decode()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(10)
            reader.join(10)
        assert len(sink.messages()) == 2 * PEOPLE  # nothing more after the first of each
    output = "".join(lines)
    assert code == 0 and "stopped: web, scheduler and worker" in output, output
    assert "Traceback" not in output, output
    by_subject: dict[str, list[str]] = {}
    for message in received:
        by_subject.setdefault(str(message["Subject"]), []).append(
            message["To"].addresses[0].addr_spec)
    reminder = next(s for s in by_subject if s.startswith(f"Reminder: {event_name}"))
    newsletter = next(s for s in by_subject if s != reminder)
    assert len(by_subject) == 2
    assert sorted(by_subject[newsletter]) == sorted(by_subject[reminder]) == sorted(emails)
