"""The links we mail to one person: unsubscribe, preferences, view online. Absolute, from the
settings (never a request's Host header), and signed for their purpose."""

from __future__ import annotations

import functools

from mailer.config import Settings
from mailer.marking import ArchiveVisibility
from mailer.render import RecipientUrls
from subscribers.tokens import Lifetimes, Purpose, Tokens

# Where each kind of link lands: the one place the recipient pages' link shapes are written.
PATHS = {Purpose.CONFIRM: "/confirm/", Purpose.UNSUBSCRIBE: "/u/", Purpose.MANAGE: "/preferences/",
         Purpose.RECONFIRM: "/still-working/", Purpose.VIEW: "/read/"}


def tokens_for(settings: Settings) -> Tokens:
    """The token issuer with the configured keys (newest last) and link lifetimes."""
    day = 86400
    return Tokens(settings.token_keys(), Lifetimes(
        confirm=settings.confirm_link_days * day,
        unsubscribe=settings.unsubscribe_link_years * 365 * day,
        manage=settings.manage_link_days * day,
        reconfirm=settings.reconfirm_link_days * day,
        view=settings.view_link_days * day))


class Links:
    def __init__(self, settings: Settings, tokens: Tokens | None = None) -> None:
        self.base = settings.base_url
        self._settings = settings
        if tokens is not None:
            self.tokens = tokens

    @functools.cached_property
    def tokens(self) -> Tokens:
        """Read (or, on an embedded install, made) only when a signed link is: a preview's
        links are not signed, so previewing an edition leaves no key behind."""
        return tokens_for(self._settings)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def page(self, purpose: Purpose, token: str, action: str = "") -> str:
        """The page a token of this purpose opens (and `action`, a step under it)."""
        return self.url(f"{PATHS[purpose]}{token}{action}")

    def confirm(self, subscriber_id: int) -> str:
        return self.page(Purpose.CONFIRM, self.tokens.confirm(subscriber_id))

    def unsubscribe(self, subscriber_id: int, topic_id: int | None = None) -> str:
        return self.page(Purpose.UNSUBSCRIBE, self.tokens.unsubscribe(subscriber_id, topic_id))

    def preferences(self, subscriber_id: int) -> str:
        return self.page(Purpose.MANAGE, self.tokens.manage(subscriber_id))

    def reconfirm(self, subscriber_id: int) -> str:
        return self.page(Purpose.RECONFIRM, self.tokens.reconfirm(subscriber_id))

    def view_online(self, edition_slug: str) -> str:
        return self.url(f"/archive/{edition_slug}")

    def view_own_copy(self, subscriber_id: int, edition_id: int) -> str:
        """A reader's signed link to an edition kept out of the public archive."""
        return self.page(Purpose.VIEW, self.tokens.view(subscriber_id, edition_id))

    def browser_link(self, subscriber_id: int, edition_slug: str, edition_id: int | None,
                     archive: str) -> str:
        """The "view in your browser" link as the edition's archive visibility allows: the
        public page, the reader's own signed link, or none (the email then shows no link)."""
        if archive == ArchiveVisibility.NONE:
            return ""
        if archive == ArchiveVisibility.SUBSCRIBERS and edition_id is not None:
            return self.view_own_copy(subscriber_id, edition_id)
        return self.view_online(edition_slug)

    def preview(self, edition_slug: str) -> RecipientUrls:
        """A preview's links: not real tokens, so a preview never carries a link that acts
        for a subscriber."""
        return RecipientUrls(unsubscribe=self.url("/unsubscribe/preview"),
                             preferences=self.url("/preferences/preview"),
                             view_online=self.view_online(edition_slug))

    def recipient(self, subscriber_id: int, topic_id: int | None, edition_slug: str,
                  edition_id: int | None = None,
                  archive: str = ArchiveVisibility.PUBLIC) -> RecipientUrls:
        return RecipientUrls(unsubscribe=self.unsubscribe(subscriber_id, topic_id),
                             preferences=self.preferences(subscriber_id),
                             view_online=self.browser_link(subscriber_id, edition_slug,
                                                           edition_id, archive))
