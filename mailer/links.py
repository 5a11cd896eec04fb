"""The links we mail to one person: unsubscribe, preferences, view online. Absolute, from the
settings (never a request's Host header), and signed for their purpose."""

from __future__ import annotations

from mailer.config import Settings
from mailer.render import RecipientUrls
from subscribers.tokens import Lifetimes, Tokens


def tokens_for(settings: Settings) -> Tokens:
    """The token issuer with the configured keys (newest last) and link lifetimes."""
    day = 86400
    return Tokens(settings.token_keys(), Lifetimes(
        confirm=settings.confirm_link_days * day,
        unsubscribe=settings.unsubscribe_link_years * 365 * day,
        manage=settings.manage_link_days * day))


class Links:
    def __init__(self, settings: Settings, tokens: Tokens | None = None) -> None:
        self.base = settings.base_url
        self.tokens = tokens or tokens_for(settings)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def unsubscribe(self, subscriber_id: int, topic_id: int | None = None) -> str:
        return self.url(f"/u/{self.tokens.unsubscribe(subscriber_id, topic_id)}")

    def preferences(self, subscriber_id: int) -> str:
        return self.url(f"/preferences/{self.tokens.manage(subscriber_id)}")

    def view_online(self, edition_slug: str) -> str:
        return self.url(f"/archive/{edition_slug}")

    def recipient(self, subscriber_id: int, topic_id: int | None,
                  edition_slug: str) -> RecipientUrls:
        return RecipientUrls(unsubscribe=self.unsubscribe(subscriber_id, topic_id),
                             preferences=self.preferences(subscriber_id),
                             view_online=self.view_online(edition_slug))
