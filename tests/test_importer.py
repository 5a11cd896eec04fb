"""CSV import: all or nothing, every bad row named with its line and reason, never re-adds
people who left, and a second import of the same file is a no-op."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from subscribers import importer, store
from subscribers.db import session_factory
from subscribers.errors import ImportFileError
from subscribers.models import Channel, ConsentEvent, Subscriber
from subscribers.rules import Rules

HEADER = ["email", "name", "organisation", "organisation_type", "role", "region", "topics"]
GOOD = [
    ["jo.bloggs@kent.police.uk", "Jo Bloggs", "Kent Police", "police", "first_responder", "kent",
     "newsletter|reminders"],
    ["a.khan@essex.gov.uk", "Aisha Khan", "Essex County Council", "Local authority", "spoc",
     "Essex", ""],
    ["zoe.obrien@nhs.net", "Zoë O’Brien", "NHS Kent", "health", "safeguarding", "kent",
     "reminders"],
    ["s.patel@salvationarmy.example.org", "Sam Patel", "Salvation Army", "ngo", "support_worker",
     "essex", "newsletter"],
    ["b.force@homeoffice.gov.uk", "", "", "border", "", "", ""],
]
# (cells, field the report must name, a fragment of its reason): each a different kind of bad row.
BAD = [
    (["", "No Address"], "email", "missing"),
    (["not-an-address"], "email", "not a valid"),
    (["two@@kent.police.uk"], "email", "not a valid"),
    (["Jo Bloggs <jo2@kent.police.uk>"], "email", "bare address"),
    (["a@kent.police.uk, b@kent.police.uk"], "email", "several"),
    (["jo blogs@kent.police.uk"], "email", "not a valid"),
    (["jo..bloggs@kent.police.uk"], "email", "not a valid"),
    ([".jo@kent.police.uk"], "email", "not a valid"),
    (["jo@localhost"], "email", "not a valid"),
    (["jo@[192.0.2.1]"], "email", "not a valid"),
    (['"jo"@kent.police.uk'], "email", "not a valid"),
    (["a" * 65 + "@kent.police.uk"], "email", "64 characters"),
    (["j@" + ".".join(["d" * 60] * 5) + ".uk"], "email", "not a valid"),
    (["józef@kent.police.uk"], "email", "not a valid"),
    (["jo@example.invalid"], "email", "not a valid"),
    (["jo@bad_domain.org"], "email", "not a valid"),
    (["jo@-kent.police.uk"], "email", "not a valid"),
    (["jo\u200bx@kent.police.uk"], "email", "not a valid"),
    (["jo@kent.police.uk."], "email", "not a valid"),
    (["test@gmаil.com"], "email", "alphabets"),
    (["long@kent.police.uk", "N" * 101], "name", "100 characters"),
    (["bell@kent.police.uk", "Jo\x07Bloggs"], "name", "control character"),
    (["bidi@kent.police.uk", "Jo\u202eBloggs"], "name", "text-direction"),
    (["formula@kent.police.uk", '=HYPERLINK("http://evil.example","x")'], "name", "formula"),
    (["inject@kent.police.uk", "Hi =?UTF-8?Q?=0A?=Bcc: x@evil.example"], "name", "encoded-word"),
    (["org@kent.police.uk", "Jo", "O" * 201], "organisation", "200 characters"),
    (["region@kent.police.uk", "Jo", "", "", "", "Narnia"], "region", "unknown region"),
    (["role@kent.police.uk", "Jo", "", "", "Wizard"], "role", "unknown role"),
    (["orgtype@kent.police.uk", "Jo", "", "pirates"], "organisation_type", "unknown"),
    (["topic@kent.police.uk", "", "", "", "", "", "gossip"], "topics", "unknown topic"),
    (["cells@kent.police.uk", "a", "b", "c", "d", "e", "f", "surplus"], "row", "8 cells"),
    (["nul@kent.police.uk", "Jo\x00"], "name", "NUL"),
    (["JO.BLOGGS@Kent.Police.UK", "Duplicate"], "email", "same address as line 2"),
    # Last, because its quoted line break makes the row span two lines of the file.
    (["jo\r\nBcc: x@evil.example@kent.police.uk"], "email", "line break"),
]


def _write(path: Path, rows: list[list[str]], delimiter: str = ",",
           encoding: str = "utf-8") -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\r\n")
    writer.writerow(HEADER)
    writer.writerows(rows)
    path.write_bytes(buffer.getvalue().encode(encoding))
    return path


OPTIONS = importer.Options(lawful_basis="public_task", actor="coord.kent")


@pytest.fixture
def sessions(engine) -> sessionmaker[Session]:
    return session_factory(engine)


def _count(sessions: sessionmaker[Session]) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(Subscriber)) or 0


def test_hostile_rows_write_nothing_and_each_is_named(
        tmp_path: Path, sessions: sessionmaker[Session], rules: Rules) -> None:
    assert len({reason for _, _, reason in BAD} | {cells[0][:8] for cells, _, _ in BAD}) >= 25
    rows = GOOD + [cells for cells, _, _ in BAD]
    path = _write(tmp_path / "mixed.csv", rows)

    report = importer.import_file(sessions, rules, path, OPTIONS, apply=True)

    assert not report.applied and _count(sessions) == 0
    first_bad_line = 2 + len(GOOD)
    by_line = {p.line: p for p in report.errors}
    for offset, (_cells, field, reason) in enumerate(BAD):
        problem = by_line.get(first_bad_line + offset)
        assert problem is not None, f"line {first_bad_line + offset} ({reason}) not reported"
        assert problem.field == field, (problem, reason)
        assert reason in problem.message, (problem, reason)
    assert len(report.errors) == len(BAD)
    assert report.new == len(GOOD)  # what would have been added


def test_good_rows_alone_import_and_a_second_import_is_a_no_op(
        tmp_path: Path, sessions: sessionmaker[Session], rules: Rules) -> None:
    path = _write(tmp_path / "good.csv", GOOD)
    dry = importer.import_file(sessions, rules, path, OPTIONS)
    assert dry.ok and dry.new == len(GOOD) and not dry.applied and _count(sessions) == 0

    first = importer.import_file(sessions, rules, path, OPTIONS, apply=True)
    assert first.applied and first.new == len(GOOD) and _count(sessions) == len(GOOD)

    with sessions() as s:
        events_before = s.scalar(select(func.count()).select_from(ConsentEvent))
        jo = store.find_by_email(s, rules, "jo.bloggs@kent.police.uk")
        assert jo is not None and jo.lawful_basis == "public_task" and jo.region == "kent"
        assert store.active_topics(s, jo.id) == ["newsletter", "reminders"]
        aisha = store.find_by_email(s, rules, "a.khan@essex.gov.uk")
        assert aisha is not None
        assert (aisha.organisation_type, aisha.region) == ("local_authority", "essex")
        assert store.active_topics(s, aisha.id) == ["newsletter"]  # the default topics
        event = store.consent_history(s, jo.id)[0]
        assert event.action == "import" and event.detail["file_sha256"] == first.sha256

    second = importer.import_file(sessions, rules, path, OPTIONS, apply=True)
    assert second.ok and second.new == 0 and len(second.existing) == len(GOOD)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(ConsentEvent)) == events_before
    assert _count(sessions) == len(GOOD)


def test_an_import_never_brings_back_people_who_left_or_were_erased(
        tmp_path: Path, sessions: sessionmaker[Session], rules: Rules) -> None:
    importer.import_file(sessions, rules, _write(tmp_path / "a.csv", GOOD), OPTIONS, apply=True)
    ctx = store.Context(channel=Channel.ONE_CLICK)
    with sessions() as s:
        store.unsubscribe(s, store.get_by_email(s, rules, "jo.bloggs@kent.police.uk"), ctx)
        store.erase(s, store.get_by_email(s, rules, "a.khan@essex.gov.uk"), ctx)
        s.commit()

    report = importer.import_file(sessions, rules, _write(tmp_path / "b.csv", GOOD), OPTIONS,
                                  apply=True)
    assert report.ok and report.new == 0
    reasons = sorted(p.message for p in report.kept_out)
    assert len(reasons) == 2
    assert "unsubscribed" in reasons[1] and "suppressed" in reasons[0]
    with sessions() as s:
        jo = store.find_by_email(s, rules, "jo.bloggs@kent.police.uk")
        assert jo is not None and jo.status == "unsubscribed"
        assert store.find_by_email(s, rules, "a.khan@essex.gov.uk") is None


def test_semicolons_bom_and_windows_1252_are_read(
        tmp_path: Path, sessions: sessionmaker[Session], rules: Rules) -> None:
    rows = [["zoe@kent.police.uk", "Zoë Café", "", "", "", "kent", ""]]
    semi = _write(tmp_path / "semi.csv", rows, delimiter=";", encoding="utf-8-sig")
    report = importer.import_file(sessions, rules, semi, OPTIONS)
    assert (report.delimiter, report.encoding, report.new) == (";", "utf-8", 1)

    cp = _write(tmp_path / "excel.csv", rows, encoding="cp1252")
    report = importer.import_file(sessions, rules, cp, OPTIONS, apply=True)
    assert report.encoding == "windows-1252" and report.warnings
    with sessions() as s:
        zoe = store.find_by_email(s, rules, "zoe@kent.police.uk")
        assert zoe is not None and zoe.name == "Zoë Café"


def test_files_that_cannot_be_read_are_refused_clearly(
        tmp_path: Path, sessions: sessionmaker[Session], rules: Rules) -> None:
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "noemail.csv").write_text("name,region\nJo,kent\n")
    (tmp_path / "binary.csv").write_bytes(b"email\n\x81\x8d\x90\xff\xfe\x00garbage\n")
    (tmp_path / "utf16.csv").write_bytes("email,name\nu16@kent.police.uk,Jo\n".encode("utf-16"))
    with pytest.raises(ImportFileError, match="empty"):
        importer.import_file(sessions, rules, tmp_path / "empty.csv", OPTIONS)
    with pytest.raises(ImportFileError, match="no email column"):
        importer.import_file(sessions, rules, tmp_path / "noemail.csv", OPTIONS)
    with pytest.raises(ImportFileError, match="not UTF-8"):
        importer.import_file(sessions, rules, tmp_path / "binary.csv", OPTIONS)
    assert importer.import_file(sessions, rules, tmp_path / "utf16.csv", OPTIONS).new == 1


# A byte-order mark followed by what that encoding cannot read: an odd trailing byte, a lone
# surrogate, a code point past U+10FFFF, and the big-endian marks too.
BOM_JUNK = {
    "utf16-odd": "email\nx@kent.police.uk\n".encode("utf-16")[:-1],
    "utf16-surrogate": b"\xff\xfe" + "email\n".encode("utf-16-le") + b"\x00\xd8a\x00",
    "utf16be-surrogate": b"\xfe\xff" + "email\n".encode("utf-16-be") + b"\xdc\x00",
    "utf32-range": b"\xff\xfe\x00\x00" + "email\n".encode("utf-32-le") + b"\xff\xff\xff\x7f",
    "utf32be-short": b"\x00\x00\xfe\xff" + "email\n".encode("utf-32-be") + b"\x00\x00",
}


@pytest.mark.parametrize("name", sorted(BOM_JUNK))
def test_a_byte_order_mark_followed_by_junk_is_refused_clearly_and_nothing_is_stored(
        name: str, tmp_path: Path, sessions: sessionmaker[Session], rules: Rules) -> None:
    path = tmp_path / f"{name}.csv"
    path.write_bytes(BOM_JUNK[name])
    with pytest.raises(ImportFileError, match=r"byte-order mark but is not UTF-(16|32) \(line 2"):
        importer.import_file(sessions, rules, path, OPTIONS, apply=True)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Subscriber)) == 0


def test_a_utf32_file_with_its_mark_is_read(
        tmp_path: Path, sessions: sessionmaker[Session], rules: Rules) -> None:
    path = tmp_path / "utf32.csv"
    path.write_bytes("email,name\nu32@kent.police.uk,Zoë\n".encode("utf-32"))
    report = importer.import_file(sessions, rules, path, OPTIONS)
    assert (report.encoding, report.new, report.errors) == ("utf-32", 1, [])


def test_unknown_columns_are_ignored_with_a_warning_and_quoting_errors_name_the_line(
        tmp_path: Path, sessions: sessionmaker[Session], rules: Rules) -> None:
    (tmp_path / "extra.csv").write_text("E-mail Address,Phone\nx@kent.police.uk,07700900000\n")
    report = importer.import_file(sessions, rules, tmp_path / "extra.csv", OPTIONS)
    assert report.new == 1 and any("Phone" in w for w in report.warnings)

    (tmp_path / "quote.csv").write_text('email,name\nok@kent.police.uk,Jo\nq@kent.police.uk,"Jo\n'
                                        'x"y,z\n')
    report = importer.import_file(sessions, rules, tmp_path / "quote.csv", OPTIONS)
    assert not report.ok and report.errors[0].line == 3


def test_a_topic_named_twice_in_a_row_is_subscribed_once(
        tmp_path: Path, sessions: sessionmaker[Session], rules: Rules) -> None:
    rows = [["twice@kent.police.uk", "", "", "", "", "", "newsletter|reminders|Newsletter"]]
    report = importer.import_file(sessions, rules, _write(tmp_path / "twice.csv", rows), OPTIONS,
                                  apply=True)
    assert report.applied and report.new == 1
    with sessions() as s:
        twice = store.get_by_email(s, rules, "twice@kent.police.uk")
        assert store.active_topics(s, twice.id) == ["newsletter", "reminders"]
        [event] = store.consent_history(s, twice.id)
        assert event.detail["topics"] == ["newsletter", "reminders"]


def test_bulk_add_gives_each_subscriber_their_own_topics_and_event_across_chunks(
        sessions: sessionmaker[Session], rules: Rules, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "_BULK_CHUNK", 3)
    ctx = store.Context(channel=Channel.IMPORT, actor="coord.kent", lawful_basis="public_task",
                        detail={"source": "x.csv"})
    with sessions() as s:
        newsletter, reminders = store.topics_by_slug(s, ["newsletter", "reminders"])
        choices = [[newsletter], [reminders], [reminders, newsletter]]
        wanted = {f"reader{i}@kent.police.uk": choices[i % 3] for i in range(8)}
        profiles = [(store.profile_from(rules, email=e), t) for e, t in wanted.items()]
        assert store.bulk_add_active(s, rules, profiles, ctx) == 8
        s.commit()
    with sessions() as s:
        for email, topics in wanted.items():
            subscriber = store.get_by_email(s, rules, email)
            assert subscriber.status == "active" and subscriber.source == "x.csv"
            assert store.active_topics(s, subscriber.id) == sorted(t.slug for t in topics)
            [event] = store.consent_history(s, subscriber.id)
            assert (event.action, event.channel, event.actor, event.lawful_basis) == (
                "import", "import", "coord.kent", "public_task")
            assert event.detail == {"source": "x.csv", "topics": [t.slug for t in topics]}
            assert event.occurred_at == subscriber.created_at


@given(st.lists(st.sampled_from(["a", ",", '"', "\r", "\n", "\r\n", "é", " "]),
                max_size=60).map("".join))
@settings(max_examples=300, deadline=None)
def test_the_lines_are_split_as_a_file_opened_with_newline_empty_splits_them(text: str) -> None:
    # What csv is given instead of io.StringIO (which held another copy of the file).
    assert list(importer._lines(text)) == list(io.StringIO(text, newline=""))
