"""An edition's audience and topic name things that exist: a typo is an error with its line and
the known values, wherever the edition comes in (validate, a file sent, the console's or the
API's text), never a send that quietly misses a region."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailer import audience, outbox
from mailer.config import Settings
from mailer.edition import EditionErrors, parse_edition
from mailer.models import Edition
from subscribers import store
from subscribers.models import Channel

SAMPLE = Path(__file__).resolve().parent.parent / "editions" / "2020-q3-kent-essex.md"
# The sample's front matter: topic on line 7, regions on line 9.
TYPOS = (SAMPLE.read_text(encoding="utf-8")
         .replace("topic: newsletter", "topic: newsleter")
         .replace("regions: [kent, essex]", "regions: [kent, essexx]")
         .replace("roles: []", "roles: [spoc, spocc]\n  organisation_types: [police, polise]"))


def _messages(exc: pytest.ExceptionInfo[EditionErrors]) -> list[str]:
    return [str(e) for e in exc.value.errors]


def test_each_unknown_name_is_an_error_with_its_line_and_the_known_values() -> None:
    edition = parse_edition(TYPOS, "typo.md")
    known = audience.Known(regions=("kent", "essex", "medway"), roles=("spoc", "analyst"),
                           organisation_types=("police", "ngo"), topics=("newsletter",))
    assert [str(p) for p in audience.problems(edition, known)] == [
        "typo.md:9: unknown region 'essexx'; known: kent, essex, medway",
        "typo.md:10: unknown role 'spocc'; known: spoc, analyst",
        "typo.md:11: unknown organisation type 'polise'; known: police, ngo",
        "typo.md:7: unknown topic 'newsleter'; known: newsletter",
    ]
    # Without a database the topic cannot be known, and is not guessed at.
    unknown_topics = audience.Known(known.regions, known.roles, known.organisation_types, None)
    assert not any("topic" in str(p) for p in audience.problems(edition, unknown_topics))
    good = parse_edition(SAMPLE.read_text(encoding="utf-8"), "sample.md")
    assert audience.problems(good, known) == []


def test_the_console_and_api_path_refuses_a_typo_and_stores_nothing(
        settings: Settings, session: Session) -> None:
    with pytest.raises(EditionErrors) as info:
        outbox.store_edition_source(session, settings, "typo", TYPOS, "alice")
    found = " | ".join(_messages(info))
    assert "typo.md:9: unknown region 'essexx'; known: kent, essex, medway" in found
    assert "typo.md:7: unknown topic 'newsleter'; known: newsletter, reminders" in found
    assert session.scalar(select(func.count()).select_from(Edition)) == 0


def test_a_file_sent_from_the_command_line_is_refused_before_anything_is_queued(
        settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mailer.cli import run

    path = tmp_path / "typo.md"
    path.write_text(TYPOS.replace("topic: newsleter", "topic: newsletter"), encoding="utf-8")
    assert run(["db", "upgrade"]) == 0
    capsys.readouterr()
    assert run(["edition", "send", str(path), "--confirm"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"{path}:9: unknown region 'essexx'" in err and "Traceback" not in err
    assert run(["edition", "list"]) == 0
    assert "typo" not in capsys.readouterr().out


def test_validate_checks_topics_against_the_database_when_it_can(
        settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mailer.cli import run

    path = tmp_path / "topic.md"
    path.write_text(SAMPLE.read_text(encoding="utf-8").replace("topic: newsletter",
                                                               "topic: newsleter"))
    assert run(["edition", "validate", str(path)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"{path}:7: unknown topic 'newsleter'; known: newsletter, reminders" in err
    assert run(["edition", "validate", str(SAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "ok:" in out and "not checked" not in out


def test_validate_without_a_database_checks_the_rest_and_says_the_topic_was_not_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import os

    from mailer.cli import run

    for key in list(os.environ):
        if key.startswith("MAILER_") and not key.startswith("MAILER_TEST_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MAILER_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("MAILER_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("MAILER_SECRET_KEY", "s" * 40)
    monkeypatch.setenv("MAILER_SUPPRESSION_KEY", "k" * 40)
    path = tmp_path / "typo.md"
    path.write_text(TYPOS, encoding="utf-8")
    assert run(["edition", "validate", str(path)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "unknown region 'essexx'" in err and "unknown role 'spocc'" in err
    assert "unknown organisation type 'polise'" in err and "topic" not in err

    path.write_text(SAMPLE.read_text(encoding="utf-8").replace("topic: newsletter",
                                                               "topic: newsleter"))
    assert run(["edition", "validate", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "note: the topic was not checked: there is no database yet" in out
    assert not (tmp_path / "var" / "mailer.db").exists()  # looking did not create one


def test_an_audience_by_organisation_type_reaches_those_types_only(
        settings: Settings, session: Session) -> None:
    rules = settings.rules()
    topics = store.topics_by_slug(session, ["newsletter"])
    for email, kind in (("p@kent.police.uk", "police"), ("n@charity.example.org", "ngo"),
                        ("h@nhs.net", "health"), ("x@kent.gov.uk", None)):
        store.add_active(session, rules, store.profile_from(
            rules, email=email, region="kent", organisation_type=kind), topics,
            store.Context(channel=Channel.IMPORT, lawful_basis="public_task"))
    source = SAMPLE.read_text(encoding="utf-8").replace(
        "roles: []", "roles: []\n  organisation_types: [police, ngo]")
    edition, _ = outbox.store_edition_source(session, settings, "by-type", source, "alice")
    assert edition.organisation_types == ["police", "ngo"]
    assert outbox.enqueue(session, edition) == 2
    everyone, _ = outbox.store_edition_source(session, settings, "everyone",
                                              SAMPLE.read_text(encoding="utf-8"), "alice")
    assert everyone.organisation_types == [] and outbox.enqueue(session, everyone) == 4
