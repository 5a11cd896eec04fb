"""The `mailer` command line: each co-ordinator task end to end, errors as one clear line."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mailer.cli import run
from mailer.config import Settings
from mailer.demo import SAMPLE_EDITION


def mailer(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_subscriber_lifecycle_from_the_command_line(
        settings: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = mailer(capsys, "subscribers", "add", "Jo.Bloggs@Kent.Police.UK",
                          "--lawful-basis", "public_task", "--name", "=cmd|' /C calc'!A0",
                          "--region", "kent")
    assert code == 1  # a name that is a spreadsheet formula is refused at the door
    code, out, _ = mailer(capsys, "subscribers", "add", "Jo.Bloggs@Kent.Police.UK",
                          "--lawful-basis", "public_task", "--name", "Jo Bloggs",
                          "--organisation", "-Kent Police", "--region", "kent",
                          "--topics", "newsletter,reminders")
    assert code == 0 and "added subscriber" in out

    code, out, _ = mailer(capsys, "subscribers", "show", "jo.bloggs@kent.police.uk", "--json")
    export = json.loads(out)
    assert export["profile"]["email"] == "Jo.Bloggs@kent.police.uk"
    assert [s["topic"] for s in export["subscriptions"]] == ["newsletter", "reminders"]
    assert export["consent_history"][0]["lawful_basis"] == "public_task"

    out_file = tmp_path / "out.csv"
    assert mailer(capsys, "subscribers", "export", "-o", str(out_file))[0] == 0
    rows = list(csv.DictReader(out_file.open(encoding="utf-8")))
    assert rows[0]["organisation"] == "'-Kent Police"  # formula-escaped
    assert rows[0]["topics"] == "newsletter|reminders"
    code, out, _ = mailer(capsys, "subscribers", "export", "--format", "json")
    assert json.loads(out)[0]["email"] == "Jo.Bloggs@kent.police.uk"

    code, out, _ = mailer(capsys, "subscribers", "unsubscribe", "1", "--topic", "reminders")
    assert code == 0 and "unsubscribed from reminders" in out
    code, out, _ = mailer(capsys, "subscribers", "unsubscribe", "1", "--topic", "reminders")
    assert code == 0 and "already unsubscribed" in out

    code, out, _ = mailer(capsys, "subscribers", "erase", "1", "--yes")
    assert code == 0 and "erased" in out
    code, _, err = mailer(capsys, "subscribers", "add", "jo.bloggs@kent.police.uk",
                          "--lawful-basis", "public_task")
    assert code == 1 and "suppressed" in err and "Traceback" not in err
    code, _, err = mailer(capsys, "subscribers", "show", "1")
    assert code == 1 and err.startswith("error: no subscriber")
    # Each change, and each copy of the list taken, is in the audit log as the console's are.
    assert _trail(settings) == [
        ("subscriber.add", "subscriber:1"), ("subscribers.export", None),
        ("subscribers.export", None), ("subscriber.unsubscribe", "subscriber:1"),
        ("subscriber.erase", "subscriber:1")]


def _trail(settings: Settings) -> list[tuple[str, str | None]]:
    from sqlalchemy import select

    from mailer.audit import AuditEntry
    from subscribers.db import make_engine, session_factory

    engine = make_engine(settings.database)
    try:
        with session_factory(engine)() as s:
            entries = s.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
            assert all(e.via == "cli" and e.actor.startswith("cli:") for e in entries)
            return [(e.action, e.target) for e in entries]
    finally:
        engine.dispose()


def test_import_is_a_dry_run_until_apply(
        settings: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "list.csv"
    path.write_text("email,name,region\njo@kent.police.uk,Jo,kent\nbad-address,X,kent\n")
    code, out, _ = mailer(capsys, "subscribers", "import", str(path), "--lawful-basis",
                          "public_task", "--apply")
    assert code == 1 and "nothing was written" in out and "bad-address" not in out
    assert "3" in out  # the bad row's line number is in the report table

    path.write_text("email,name,region\njo@kent.police.uk,Jo,kent\n")
    code, out, _ = mailer(capsys, "subscribers", "import", str(path), "--lawful-basis",
                          "public_task")
    assert code == 0 and "dry run" in out
    assert json.loads(mailer(capsys, "subscribers", "export", "--format", "json")[1]) == []
    code, out, _ = mailer(capsys, "subscribers", "import", str(path), "--lawful-basis",
                          "public_task", "--apply")
    assert code == 0 and "imported 1" in out
    code, out, _ = mailer(capsys, "subscribers", "import", str(path), "--lawful-basis",
                          "public_task", "--apply")
    assert code == 0 and "new: 0" in out


def test_import_of_a_utf16_file_with_junk_is_a_clear_refusal_not_an_internal_error(
        settings: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "junk.csv"
    path.write_bytes(b"\xff\xfe" + "email\njo@kent.police.uk\n".encode("utf-16-le") + b"\x00\xd8")
    code, out, err = mailer(capsys, "subscribers", "import", str(path), "--lawful-basis",
                            "public_task", "--apply")
    assert code == 1, (out, err)
    assert "byte-order mark but is not UTF-16 (line 3" in err
    assert "internal error" not in err and "Traceback" not in err
    assert json.loads(mailer(capsys, "subscribers", "export", "--format", "json")[1]) == []


def test_topics_list_and_add(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert mailer(capsys, "topics", "add", "op-aidant", "Operation Aidant")[0] == 0
    code, out, _ = mailer(capsys, "topics", "list")
    assert code == 0 and "newsletter" in out and "reminders" in out and "op-aidant" in out
    code, _, err = mailer(capsys, "topics", "add", "op-aidant", "again")
    assert code == 1 and "exists" in err


def test_config_show_masks_secrets(settings: Settings, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILER_SMTP_URL", "smtp://relay:Sup3rSecret@smtp.example.org:587")
    code, out, _ = mailer(capsys, "config", "show", "--json")
    shown = json.loads(out)
    assert code == 0 and "Sup3rSecret" not in out and "s" * 40 not in out
    assert shown["smtp_url"] == "smtp://relay:********@smtp.example.org:587"
    assert shown["rate_per_minute"] == 30


def test_a_bad_setting_is_one_clear_line(settings: Settings, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILER_BASE_URL", "news.example.org")
    code, _, err = mailer(capsys, "config", "show")
    assert code == 1 and "base_url" in err and "absolute" in err


def test_settings_come_from_mailer_toml_under_the_environment(
        settings: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "mailer.toml"
    toml.write_text('from_name = "Essex MSHT"\nrate_per_minute = 0\n')
    monkeypatch.setenv("MAILER_CONFIG", str(toml))
    monkeypatch.setenv("MAILER_RATE_PER_MINUTE", "12")
    shown = json.loads(mailer(capsys, "config", "show", "--json")[1])
    assert shown["from_name"] == "Essex MSHT" and shown["rate_per_minute"] == 12


def test_generated_secret_is_private_and_stable(tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path / "var")
    first = settings.secret()
    assert first == Settings(var_dir=tmp_path / "var").secret() and len(first) >= 48
    assert oct((tmp_path / "var" / "secret_key").stat().st_mode & 0o777) == "0o600"


def test_a_new_database_is_refused_until_upgraded_in_a_real_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env.update(MAILER_VAR_DIR=str(tmp_path / "var"), MAILER_CONFIG=str(tmp_path / "none.toml"))
    exe = [sys.executable, "-m", "mailer"]
    listing = subprocess.run([*exe, "subscribers", "list"], env=env, capture_output=True,
                             text=True, cwd=tmp_path, check=False)
    assert listing.returncode == 1
    assert "mailer db upgrade" in listing.stderr and "Traceback" not in listing.stderr
    upgrade = subprocess.run([*exe, "db", "upgrade"], env=env, capture_output=True, text=True,
                             cwd=tmp_path, check=False)
    assert upgrade.returncode == 0, upgrade.stderr
    status = subprocess.run([*exe, "db", "status"], env=env, capture_output=True, text=True,
                            cwd=tmp_path, check=False)
    assert status.returncode == 0 and "up to date" in status.stdout
    assert (tmp_path / "var" / "mailer.db").exists()
    # A command says what it did and nothing else: no library's warning on its way in (the
    # help imports every command's modules).
    helped = subprocess.run([*exe, "--help"], env=env, capture_output=True, text=True,
                            cwd=tmp_path, check=False)
    assert (helped.returncode, helped.stderr, upgrade.stderr, status.stderr) == (0, "", "", "")


def test_a_command_run_where_nothing_is_set_up_says_so_and_leaves_nothing_behind(
        tmp_path: Path) -> None:
    """After the demo, `mailer users list` in the checkout found no database, advised `mailer
    db upgrade` and left an empty one (and a key) behind; `edition preview` made a key too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    with socket.socket() as closed:  # a port where nothing listens
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env.update(MAILER_CONFIG=str(tmp_path / "none.toml"),
               MAILER_SMTP_URL=f"smtp://127.0.0.1:{port}?tls=none")

    def mailer_here(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mailer", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, check=False)
    listing = mailer_here("users", "list")
    said = " ".join(listing.stderr.split())
    assert listing.returncode == 1 and "there is no database at var/mailer.db" in said
    assert "mailer db upgrade" in said and not (tmp_path / "var").exists()
    preview = mailer_here("edition", "preview", str(SAMPLE_EDITION))
    assert preview.returncode == 0, preview.stderr
    assert sorted(p.name for p in (tmp_path / "var").iterdir()) == ["preview"]  # no key
    (tmp_path / "var" / "demo").mkdir()
    (tmp_path / "var" / "demo" / "mailer.db").touch()
    listing = mailer_here("subscribers", "list")
    assert "add MAILER_VAR_DIR=var/demo before the command" in " ".join(listing.stderr.split())
    sent = mailer_here("edition", "preview", str(SAMPLE_EDITION), "--to", "me@kent.police.uk")
    said = " ".join(sent.stderr.split())
    assert sent.returncode == 1 and f"nothing answers at 127.0.0.1:{port}" in said
    assert "run `mailer dev-sink` in another terminal" in said and "Traceback" not in said


def test_a_table_piped_into_another_program_is_not_cut_to_80_columns(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS" and not k.startswith("MAILER_")}
    env.update(MAILER_CONFIG=str(tmp_path / "none.toml"), MAILER_VAR_DIR=str(tmp_path))
    for args in (["db", "upgrade"], ["topics", "list"]):
        done = subprocess.run([sys.executable, "-m", "mailer", *args], env=env,
                              capture_output=True, text=True, check=True)
    row = next(line for line in done.stdout.splitlines() if "newsletter" in line)
    assert "The MSHT newsletter for first responders, sent each quarter." in row


def test_usage_errors_and_aborts_are_one_clear_message(
        settings: Settings, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = mailer(capsys, "subscribers", "add")
    assert code == 2 and "Missing argument" in err and "internal error" not in err
    code, _, err = mailer(capsys, "no-such-command")
    assert code == 2 and "No such command" in err
    assert mailer(capsys, "subscribers", "add", "jo@kent.police.uk", "--lawful-basis",
                  "public_task")[0] == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    code, _, err = mailer(capsys, "subscribers", "erase", "1")
    assert code == 130 and "nothing was changed" in err
    assert json.loads(mailer(capsys, "subscribers", "show", "1", "--json")[1])["profile"]["email"]


SAMPLE = Path(__file__).resolve().parent.parent / "editions" / "2020-q3-kent-essex.md"


def test_sending_from_the_command_line_needs_a_second_persons_approval(
        settings: Settings, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert mailer(capsys, "subscribers", "add", "jo@kent.police.uk", "--lawful-basis",
                  "public_task", "--region", "kent")[0] == 0
    code, out, _ = mailer(capsys, "edition", "send", str(SAMPLE))
    assert code == 0 and "1 recipient(s)" in out and "dry run" in out
    code, _, err = mailer(capsys, "edition", "send", str(SAMPLE), "--confirm")
    assert code == 1 and "only an approved edition" in err and "another co-ordinator" in err
    monkeypatch.setenv("MAILER_REQUIRE_APPROVAL", "false")  # one person runs everything
    code, out, _ = mailer(capsys, "edition", "send", str(SAMPLE), "--confirm")
    assert code == 0 and "queued 1 message(s)" in out
    code, out, _ = mailer(capsys, "edition", "send", str(SAMPLE), "--confirm")
    assert code == 0 and "queued 0 message(s)" in out  # the same edition again: nobody twice
    assert mailer(capsys, "edition", "pause", SAMPLE.stem)[0] == 0
    # The edition file is stored by the first send that goes ahead (a dry run stores nothing),
    # and that is an edition.save, as it is from the console and the API.
    assert [a for a, _ in _trail(settings)] == [
        "subscriber.add", "edition.save", "edition.send", "edition.send", "edition.pause"]
