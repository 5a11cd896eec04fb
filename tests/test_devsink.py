"""The dev sink: real SMTP into a real Maildir, in-process and as the `mailer dev-sink` command."""

from __future__ import annotations

import asyncio
import mailbox
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailer.cli import run
from mailer.devsink import DevSink
from mailer.smtp import Outcome, SmtpPool, deliver_once

MESSAGE = (b"From: MSHT <bulletin@news.example.org>\r\nTo: <reader@example.org>\r\n"
           b"Subject: Quarterly bulletin\r\nMessage-ID: <q4.1@news.example.org>\r\n\r\n"
           b".dotted line\r\nbody\r\n")


@pytest.fixture
def sink(tmp_path: Path) -> DevSink:
    with DevSink(tmp_path / "devsink", port=0) as running:
        yield running


def test_a_message_is_stored_in_the_maildir_with_its_envelope(sink: DevSink) -> None:
    result = deliver_once(sink.url, "bounces@news.example.org", "reader@example.org", MESSAGE,
                          timeout=5)
    assert result.outcome is Outcome.SENT
    [stored] = sink.messages()
    assert stored.mail_from == "bounces@news.example.org"
    assert stored.rcpt_to == ("reader@example.org",)
    assert (stored.subject, stored.message_id) == ("Quarterly bulletin", "<q4.1@news.example.org>")
    assert sink.raw(stored.key).endswith(MESSAGE)  # the message bytes exactly as sent
    # A plain stdlib Maildir reader sees the same message.
    [key] = mailbox.Maildir(sink.directory, create=False).keys()
    assert key == stored.key


def test_messages_are_listed_oldest_first(sink: DevSink) -> None:
    async def send_all() -> list[Outcome]:
        async with SmtpPool(sink.url, size=2, timeout=5) as pool:
            results = []
            for i in range(12):  # in order, so the arrival order is known
                data = MESSAGE.replace(b"Quarterly bulletin", f"n{i}".encode())
                results.append(await pool.send("b@example.org", f"r{i}@example.org", data))
            return [r.outcome for r in results]

    assert asyncio.run(send_all()) == [Outcome.SENT] * 12
    assert [m.subject for m in sink.messages()] == [f"n{i}" for i in range(12)]
    assert sink.clear() == 12
    assert sink.messages() == []


def test_the_listing_survives_a_restart(tmp_path: Path) -> None:
    with DevSink(tmp_path / "box", port=0) as first:
        deliver_once(first.url, "b@example.org", "r@example.org", MESSAGE, timeout=5)
    assert [m.rcpt_to for m in DevSink(tmp_path / "box").messages()] == [("r@example.org",)]


def _cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env.update(MAILER_CONFIG=str(tmp_path / "absent.toml"), MAILER_VAR_DIR=str(tmp_path / "var"),
               COLUMNS="300")
    return env


def test_cli_lists_what_is_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in _cli_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    with DevSink(tmp_path / "var" / "devsink", port=0) as running:  # the default --dir
        deliver_once(running.url, "b@example.org", "reader@example.org", MESSAGE, timeout=5)
    assert run(["dev-sink", "--list"]) == 0
    out = capsys.readouterr().out
    assert "reader@example.org" in out and "Quarterly bulletin" in out
    assert "1 message(s)" in out


def test_cli_runs_until_sigterm_and_stores_what_arrives(tmp_path: Path) -> None:
    box = tmp_path / "box"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from mailer.cli import main; main()", "dev-sink", "--port", "0",
         "--dir", str(box)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_cli_env(tmp_path),
        cwd=Path(__file__).resolve().parent.parent)
    try:
        assert proc.stdout is not None
        output = b""
        deadline = time.monotonic() + 30
        while b"Ctrl-C" not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
            if not ready:
                break
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            output += chunk
        match = re.search(rb"smtp://127\.0\.0\.1:(\d+)\?tls=none", output)
        assert match, output
        result = deliver_once(f"smtp://127.0.0.1:{int(match.group(1))}?tls=none",
                              "b@example.org", "reader@example.org", MESSAGE, timeout=5)
        assert result.outcome is Outcome.SENT
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    assert [m.rcpt_to for m in DevSink(box).messages()] == [("reader@example.org",)]
