"""The public archive: published edition sources, shown as their view-online pages and a feed.

An edition is published by placing its source in `settings.archive_dir` (the send step will do
that, or this will read the editions table once it exists). Compiling costs MJML and premailer,
so each file is compiled once and kept until it changes on disk.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from mailer.config import Settings
from mailer.edition import load_edition
from mailer.errors import MailerError
from mailer.render import Recipient, RecipientUrls, compile_edition, personalise

SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,80}$")


@dataclass(frozen=True)
class Entry:
    slug: str
    subject: str
    preheader: str | None
    date_text: str
    updated: str  # RFC 3339, for Atom


class Archive:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.directory = settings.archive_dir or settings.var_dir / "archive"
        self._lock = threading.Lock()
        self._entries: dict[Path, tuple[float, Entry | None]] = {}
        self._pages: dict[Path, tuple[float, str]] = {}

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("*.md") if SLUG.match(p.stem))

    def entries(self) -> list[Entry]:
        """Newest first; a source that no longer validates is left out rather than shown."""
        out = []
        for path in self._files():
            mtime = path.stat().st_mtime
            with self._lock:
                cached = self._entries.get(path)
            if cached is None or cached[0] != mtime:
                try:
                    edition = load_edition(path)
                except MailerError:
                    entry = None
                else:
                    date = edition.meta.date
                    entry = Entry(slug=path.stem, subject=edition.meta.subject,
                                  preheader=edition.meta.preheader,
                                  date_text=f"{date.day} {date:%B %Y}",
                                  updated=f"{date.isoformat()}T00:00:00Z")
                with self._lock:
                    self._entries[path] = (mtime, entry)
            else:
                entry = cached[1]
            if entry is not None:
                out.append(entry)
        return sorted(out, key=lambda e: (e.updated, e.slug), reverse=True)

    def page(self, slug: str) -> str | None:
        """The view-online HTML with no personal slot filled, or None if there is no such
        published edition."""
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
            compiled = compile_edition(load_edition(path), self.settings)
        except MailerError:
            return None
        base = self.settings.base_url
        # Generic values: the page is public, so it must not carry anyone's name or tokens.
        urls = RecipientUrls(unsubscribe=f"{base}/manage", preferences=f"{base}/manage",
                             view_online=f"{base}/archive/{slug}")
        html = personalise(compiled, Recipient(email="", name=None), urls).html
        with self._lock:
            self._pages[path] = (mtime, html)
        return html
