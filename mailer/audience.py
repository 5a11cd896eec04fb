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

from mailer import segments
from mailer.config import Settings
from mailer.edition import Edition, EditionErrors
from mailer.errors import EditionError, MailerError
from mailer.segments import AudienceFields
from subscribers import store
from subscribers.rules import Rules


@dataclass(frozen=True)
class Known:
    """The values an audience may name. `topics` is None when they could not be read."""

    regions: Collection[str]
    roles: Collection[str]
    organisation_types: Collection[str]
    topics: Collection[str] | None
    # Saved segments' slugs (mailer.segments); None when they could not be read, like topics.
    segments: Collection[str] | None = None

    @classmethod
    def of(cls, rules: Rules, topics: Iterable[str] | None,
           segments: Iterable[str] | None = None) -> Known:
        return cls(regions=tuple(rules.regions), roles=tuple(rules.roles),
                   organisation_types=tuple(rules.organisation_types),
                   topics=None if topics is None else tuple(topics),
                   segments=None if segments is None else tuple(segments))


def known(session: Session, settings: Settings) -> Known:
    """What the settings and this database know."""
    return Known.of(settings.rules(), (t.slug for t in store.list_topics(session)),
                    segments.slugs(session))


def field_problems(fields: AudienceFields, known: Known) -> list[tuple[str, int, str]]:
    """Each unknown name in an audience's lists: (field, index, message). The one check for
    an edition's, an event's and a saved segment's fields."""
    found: list[tuple[str, int, str]] = []
    for field, label, values, vocabulary in (
            ("regions", "region", fields.regions, known.regions),
            ("roles", "role", fields.roles, known.roles),
            ("organisation_types", "organisation type", fields.organisation_types,
             known.organisation_types),
            ("topics", "topic", fields.topics, known.topics)):
        if vocabulary is None:
            continue
        for index, value in enumerate(values):
            if value not in vocabulary:
                found.append((field, index,
                              f"unknown {label} '{value}'; known: {', '.join(vocabulary)}"))
    return found


def check_fields(fields: AudienceFields, known: Known, where: str) -> None:
    """Refuse an audience (an event's, a segment's) naming something unknown, every problem
    listed, each with `where` and its field."""
    found = field_problems(fields, known)
    if found:
        raise EditionErrors([EditionError(f"{field}: {message}", where)
                             for field, _index, message in found])


def segment_problem(slug: str, known: Known) -> str | None:
    """Why `slug` names no saved segment (with the known slugs), or None."""
    if known.segments is None or slug in known.segments:
        return None
    return f"unknown segment '{slug}'; known: {', '.join(known.segments) or '(none yet)'}"


def resolve(session: Session, segment: str | None, inline: AudienceFields) -> AudienceFields:
    """The audience an edition or event goes to: the named segment's fields, else the
    fields given inline."""
    if segment is None:
        return inline
    return AudienceFields.of(segments.get_segment(session, segment))


def problems(edition: Edition, known: Known) -> list[EditionError]:
    """Each name in the audience or topic that `known` does not have, with its line and the
    known values. Topics are not checked when `known.topics` is None."""
    found: list[EditionError] = []
    audience = edition.meta.audience
    inline = AudienceFields(list(audience.regions), list(audience.roles),
                            list(audience.organisation_types), list(audience.topics))
    for field, index, message in field_problems(inline, known):
        line = edition.line_of("audience", field, index)
        found.append(EditionError(message, f"{edition.path}:{line}"))
    if edition.meta.segment is not None:
        problem = segment_problem(edition.meta.segment, known)
        if problem:
            found.append(EditionError(problem, f"{edition.path}:{edition.line_of('segment')}",
                                      hint="`mailer segments add` makes a new one"))
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
