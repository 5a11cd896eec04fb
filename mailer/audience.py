"""Who an edition may be addressed to: the one rule that an edition's audience and topic name
things that exist.

A typo in the front matter (`regions: [kent, essexx]`, `topic: newsleter`) would otherwise
pass, and the send would quietly reach fewer people than meant: Essex would miss the
newsletter. Validation, every way an edition is stored (file, console, API) and the send check
through `check`. Regions, roles and organisation types are the settings' vocabularies
(`Settings.rules()`); topics are rows in the database, so a check without one says that it
could not look at them instead of passing them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from mailer.config import Settings
from mailer.edition import Edition, EditionErrors
from mailer.errors import EditionError, MailerError
from subscribers import store
from subscribers.rules import Rules


@dataclass(frozen=True)
class Known:
    """The values an audience may name. `topics` is None when they could not be read."""

    regions: Collection[str]
    roles: Collection[str]
    organisation_types: Collection[str]
    topics: Collection[str] | None

    @classmethod
    def of(cls, rules: Rules, topics: Iterable[str] | None) -> Known:
        return cls(regions=tuple(rules.regions), roles=tuple(rules.roles),
                   organisation_types=tuple(rules.organisation_types),
                   topics=None if topics is None else tuple(topics))


def known(session: Session, settings: Settings) -> Known:
    """What the settings and this database know."""
    return Known.of(settings.rules(), (t.slug for t in store.list_topics(session)))


def problems(edition: Edition, known: Known) -> list[EditionError]:
    """Each name in the audience or topic that `known` does not have, with its line and the
    known values. Topics are not checked when `known.topics` is None."""
    found: list[EditionError] = []
    audience = edition.meta.audience
    for field, label, values, vocabulary in (
            ("regions", "region", audience.regions, known.regions),
            ("roles", "role", audience.roles, known.roles),
            ("organisation_types", "organisation type", audience.organisation_types,
             known.organisation_types)):
        for index, value in enumerate(values):
            if value not in vocabulary:
                line = edition.line_of("audience", field, index)
                found.append(EditionError(
                    f"unknown {label} '{value}'; known: {', '.join(vocabulary)}",
                    f"{edition.path}:{line}"))
    topic = edition.meta.topic
    if known.topics is not None and topic not in known.topics:
        line = edition.line_of("topic")
        found.append(EditionError(
            f"unknown topic '{topic}'; known: {', '.join(known.topics)}",
            f"{edition.path}:{line}", hint="`mailer topics add` makes a new one"))
    return found


def check(edition: Edition, known: Known) -> None:
    """Refuse the edition (EditionErrors, every problem listed) if `problems` finds any."""
    found = problems(edition, known)
    if found:
        raise EditionErrors(found)


def known_without_session(settings: Settings) -> tuple[Known, str | None]:
    """What `mailer edition validate` can know: the settings' vocabularies, and the topics
    from the configured database when it is there and current. The second value says why
    the topics could not be read (None when they were)."""
    from mailer.migrations import require_current
    from subscribers.db import make_engine, session_factory

    url = settings.database
    if url.startswith("sqlite:///") and not _sqlite_file_exists(url):
        # Opening it would create an empty file where the database should be.
        return Known.of(settings.rules(), None), "there is no database yet"
    engine = make_engine(url)
    try:
        require_current(engine)
        with session_factory(engine)() as session:
            return known(session, settings), None
    except MailerError as exc:
        return Known.of(settings.rules(), None), str(exc)
    except DBAPIError as exc:  # the driver's own words say why (refused, no such database)
        reason = str(exc.orig).splitlines()[0]
        return Known.of(settings.rules(), None), f"the database could not be read ({reason})"
    except SQLAlchemyError as exc:
        reason = str(exc).splitlines()[0]
        return Known.of(settings.rules(), None), f"the database could not be read ({reason})"
    finally:
        engine.dispose()


def _sqlite_file_exists(url: str) -> bool:
    from pathlib import Path

    from sqlalchemy.engine import make_url

    database = make_url(url).database
    return not database or database == ":memory:" or Path(database).is_file()
