"""`mailer demo`, the README's first command: from a fresh directory to the edition in every
demo subscriber's dev inbox, and the web app answering with a dev inbox whose mails can be
opened and followed to the real pages. The dev inbox exists only in the demo."""

from __future__ import annotations

import email
import email.policy
import mailbox
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import expect
from sqlalchemy import create_engine, func, select

from mailer.config import Settings
from mailer.devsink import DevSink
from mailer.models import Delivery, Edition
from mailer.web.app import create_app
from subscribers import store
from subscribers.models import Subscriber
from tests.waiting import answering, wait_for

SUBJECT = "MSHT newsletter, issue 2: Kent & Essex, summer 2020"
SENT_SUBJECT = f"OFFICIAL: {SUBJECT}"  # as sent: the protective marking first (mailer.marking)


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env["MAILER_CONFIG"] = str(tmp_path / "absent.toml")
    return env


def test_demo_no_serve_from_a_fresh_directory_delivers_to_every_demo_subscriber(
        tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "mailer", "demo", "--no-serve"],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr
    out = " ".join(done.stdout.split())
    assert "sent 200 of 200" in out and "the dev inbox holds 200 copies" in out
    assert "next reminders" in out and ("BST" in out or "GMT" in out)

    demo = tmp_path / "var" / "demo"
    box = mailbox.Maildir(demo / "inbox", create=False)
    received = [email.message_from_bytes(box.get_bytes(k), policy=email.policy.default)
                for k in sorted(box.keys())]
    engine = create_engine(f"sqlite:///{demo / 'mailer.db'}")
    try:
        with engine.connect() as conn:
            addresses = set(conn.scalars(select(Subscriber.email)))
            sent = conn.scalar(select(func.count()).select_from(Delivery)
                               .where(Delivery.status == "sent"))
    finally:
        engine.dispose()
    assert len(addresses) == 200 and sent == 200
    to = [m["To"].addresses[0].addr_spec for m in received]
    assert len(to) == 200 and set(to) == addresses  # each demo subscriber once
    assert {m["Subject"] for m in received} == {SENT_SUBJECT}
    assert all(a.rpartition("@")[2].endswith(".example") for a in addresses)
    assert all(m["List-Unsubscribe"].startswith("<http://127.0.0.1:8000/u/") for m in received)


def test_the_dev_inbox_exists_only_in_demo_mode(settings: Settings, tmp_path: Path) -> None:
    with TestClient(create_app(settings), base_url=settings.base_url) as client:
        assert client.get("/dev/inbox").status_code == 404
    with DevSink(tmp_path / "inbox", port=0) as sink:
        with smtplib.SMTP(sink.host, sink.port) as smtp:
            smtp.sendmail("a@example.org", ["b@example.org"],
                          b"Subject: Hello\r\nContent-Type: text/html\r\n\r\n"
                          b"<p onclick=\"x()\">hi</p><script>alert(1)</script>\r\n")
        (message,) = sink.messages()
    app = create_app(settings, dev_inbox=tmp_path / "inbox")
    with TestClient(app, base_url=settings.base_url) as client:
        listing = client.get("/dev/inbox")
        assert listing.status_code == 200 and "Hello" in listing.text
        shown = client.get(f"/dev/inbox/{message.key}")
        assert shown.status_code == 200 and "b@example.org" in shown.text
        assert "<script>alert(1)" not in shown.text  # the raw HTML is never in our page
        html = client.get(f"/dev/inbox/{message.key}/html")
        csp = html.headers["content-security-policy"]
        assert csp.startswith("sandbox ") and "allow-scripts" not in csp
        assert "script-src" not in csp and "default-src 'none'" in csp
        assert client.get("/dev/inbox/..%2f..%2fetc%2fpasswd").status_code == 404
        assert client.get("/dev/inbox/nope/html").status_code == 404


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served_demo(tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mailer", "demo", "--port", str(port)],
                            cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
    threading.Thread(target=read, daemon=True).start()
    try:
        assert wait_for(answering(base, proc), 240) and proc.poll() is None, "".join(lines)
        assert f"{base}/dev/inbox" in "".join(lines)  # it prints the URLs to open
        yield base, tmp_path / "var" / "demo", "".join(lines)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
    # Ctrl-C is the way to stop the demo: web, scheduler and worker stop cleanly, no error
    assert wait_for(lambda: any("stopped: web" in line for line in lines), 10), "".join(lines)
    output = "".join(lines)
    assert code == 0 and "error" not in output and "Traceback" not in output, output


@pytest.mark.browser
def test_open_the_dev_inbox_open_the_edition_and_follow_its_unsubscribe_link(
        browser: Any, served_demo: tuple[str, Path, str]) -> None:
    base, demo, _printed = served_demo
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    try:
        # expect() waits for each page after a click; a bare locator read could see the last one.
        page.goto(f"{base}/dev/inbox")  # 200 copies, 50 a page
        expect(page.get_by_text("200 message(s); page 1 of 4.")).to_be_visible()
        expect(page.locator("table.inbox tbody tr")).to_have_count(50)
        page.get_by_role("link", name="4", exact=True).click()
        expect(page.locator("table.inbox tbody tr")).to_have_count(50)
        expect(page.get_by_text("page 4 of 4")).to_be_visible()
        page.get_by_role("link", name=SUBJECT).first.click()
        to = page.locator("dd[data-header='To']").inner_text()
        address = to.rpartition("<")[2].rstrip(">")
        assert address.endswith(".example")
        page.get_by_role("link", name="Open the HTML version, as a reader sees it").click()
        expect(page.locator("h1").first).to_contain_text("Modern Slavery")
        page.get_by_role("link", name="Unsubscribe").first.click()
        expect(page).to_have_url(re.compile(re.escape(f"{base}/u/")))
        page.get_by_role("button", name="Unsubscribe").click()
        expect(page.locator("h1")).to_have_text("You are unsubscribed")
    finally:
        context.close()
    engine = create_engine(f"sqlite:///{demo / 'mailer.db'}")
    try:
        with engine.connect() as conn:
            subscriber_id = conn.scalar(select(Subscriber.id).where(Subscriber.email == address))
            newsletter = conn.scalar(store.segment(["newsletter"])
                                     .where(Subscriber.id == subscriber_id))
            editions = conn.scalar(select(func.count()).select_from(Edition))
    finally:
        engine.dispose()
    assert subscriber_id is not None and newsletter is None  # no more newsletters for them
    assert editions == 1


@pytest.mark.browser
def test_a_newcomer_follows_the_printed_console_address_and_sign_in_to_the_dashboard(
        browser: Any, served_demo: tuple[str, Path, str]) -> None:
    base, _demo, printed = served_demo
    said = " ".join(printed.split())
    console_url = re.search(r"the console (\S+/admin)", said)
    author = re.search(r"login demo\.author, password (\S+)", said)
    approver = re.search(r"login demo\.approver, password (\S+)", said)
    assert console_url and author and approver, said
    assert console_url[1] == f"{base}/admin"
    for login, name, password in (("demo.author", "Dana Author", author[1]),
                                  ("demo.approver", "Ash Approver", approver[1])):
        context = browser.new_context()
        page = context.new_page()
        try:
            page.goto(console_url[1])  # signed out: the sign-in page
            page.get_by_label("Login").fill(login)
            page.get_by_label("Password").fill(password)
            page.get_by_role("button", name="Sign in").click()
            expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
            expect(page.get_by_text(f"{name} (Co-ordinator")).to_be_visible()  # as them
        finally:
            context.close()
