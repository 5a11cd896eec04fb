"""The public archive: every newsletter that has gone out, its view-online pages and its listing.

Editions sent through the outbox are read from the editions table (public ones that have
started going out: their view-online links are in people's inboxes); older issues that never
went through this system can be published by placing their source in `settings.archive_dir`.
An edition in the table wins over a file of the same name. Pages are built once (a file's is
compiled with MJML and premailer, a sent edition's is already compiled) and kept until the
file or the edition changes.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

from mailer.config import Settings
from mailer.edition import Edition, load_edition
from mailer.errors import MailerError
from mailer.marking import ArchiveVisibility, resolve
from mailer.outbox import Published
from mailer.render import CompiledEdition, Recipient, RecipientUrls, compile_edition, personalise

SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,80}$")
NOINDEX_META = '<meta name="robots" content="noindex, nofollow">'


@dataclass(frozen=True)
class Entry:
    slug: str
    subject: str
    preheader: str | None
    date_text: str
    updated: str  # RFC 3339, for Atom
    issued: str  # ISO 8601 date the edition carries: the archive's order


class Archive:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.directory = settings.archive_dir or settings.var_dir / "archive"
        self._lock = threading.Lock()
        self._entries: dict[Path, tuple[float, Entry | None]] = {}
        self._pages: dict[Path, tuple[float, str]] = {}
        self._sent: dict[int, tuple[str, str]] = {}  # edition id -> (compiled_at, page)

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("*.md") if SLUG.match(p.stem))

    def entries(self, sent: Sequence[Published] = ()) -> list[Entry]:
        """The sent editions (`outbox.published`) and the published files, newest first; a
        file that no longer validates, or is not public, is left out rather than shown."""
        zone = ZoneInfo(self.settings.timezone)
        out = []
        for edition in sent:
            # Listed under the date the issue carries, not the day it went out: an old issue
            # sent today is still the 2020 issue (editions compiled before the date was kept
            # fall back to their sending day).
            day = (dt.date.fromisoformat(edition.issue_date) if edition.issue_date
                   else edition.started_at.astimezone(zone).date())
            out.append(Entry(slug=edition.slug, subject=edition.subject,
                             preheader=edition.preheader, date_text=f"{day.day} {day:%B %Y}",
                             updated=edition.started_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                             issued=day.isoformat()))
        taken = {e.slug for e in out}
        for path in self._files():
            mtime = path.stat().st_mtime
            with self._lock:
                cached = self._entries.get(path)
            if cached is None or cached[0] != mtime:
                try:
                    source = load_edition(path)
                except MailerError:
                    entry = None
                else:
                    date = source.meta.date
                    entry = Entry(slug=path.stem, subject=source.meta.subject,
                                  preheader=source.meta.preheader,
                                  date_text=f"{date.day} {date:%B %Y}",
                                  updated=f"{date.isoformat()}T00:00:00Z",
                                  issued=date.isoformat()) if self._public(source) else None
                with self._lock:
                    self._entries[path] = (mtime, entry)
            else:
                entry = cached[1]
            if entry is not None and entry.slug not in taken:
                out.append(entry)
        return sorted(out, key=lambda e: (e.issued, e.updated, e.slug), reverse=True)

    def _public(self, source: Edition) -> bool:
        """A file is published only if its marking and visibility allow it (mailer.marking)."""
        _marking, visibility = resolve(source.meta.classification, source.meta.archive,
                                       self.settings.default_classification,
                                       self.settings.default_archive)
        return visibility == ArchiveVisibility.PUBLIC

    def sent_page(self, edition: Published, compiled: dict[str, object]) -> str:
        """The view-online HTML of a sent edition (`outbox.published_compiled`)."""
        with self._lock:
            cached = self._sent.get(edition.id)
        if cached is not None and cached[0] == edition.compiled_at:
            return cached[1]
        html = self._generic(CompiledEdition.from_dict(dict(compiled)), edition.slug)
        with self._lock:
            self._sent[edition.id] = (edition.compiled_at, html)
        return html

    def own_page(self, edition: Published, compiled: dict[str, object], url: str) -> str:
        """A subscribers-only edition as a reader opens it from their copy (`url`, their
        signed link): the generic page, marked not to be indexed. Not cached: few readers
        open one, and the page carries their link."""
        html = self._generic(CompiledEdition.from_dict(dict(compiled)), edition.slug, url)
        return NOINDEX_META.join(re.split(r"(?<=<head>)", html, maxsplit=1)) \
            if "<head>" in html else NOINDEX_META + html

    def _generic(self, compiled: CompiledEdition, slug: str, view_online: str = "") -> str:
        base = self.settings.base_url
        # Generic values: the page may be public, so it must not carry anyone's name or
        # unsubscribe tokens.
        urls = RecipientUrls(unsubscribe=f"{base}/manage", preferences=f"{base}/manage",
                             view_online=view_online or f"{base}/archive/{slug}")
        return personalise(compiled, Recipient(email="", name=None), urls).html

    def page(self, slug: str) -> str | None:
        """The view-online HTML of a published file, no personal slot filled, or None."""
        if not SLUG.match(slug):
            return None
        path = self.directory / f"{slug}.md"
        if not path.is_file():
            return None
        mtime = path.stat().st_mtime
        with self._lock:
            cached = self._pages.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            source = load_edition(path)
            if not self._public(source):
                return None
            compiled = compile_edition(source, self.settings)
        except MailerError:
            return None
        html = self._generic(compiled, slug)
        with self._lock:
            self._pages[path] = (mtime, html)
        return html
