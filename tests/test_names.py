"""D2: names never keep line separators or invisible characters, wherever they come in.

`subscribers.validation.normalise_text` is the one home; these tests go through each way a
name arrives (the store, the subscribe page, a console user) so a path that skips it fails.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from mailer import accounts
from mailer.errors import MailerError
from subscribers import store
from subscribers.errors import InvalidInput
from subscribers.models import Channel
from subscribers.rules import Rules
from subscribers.store import Context
from subscribers.validation import normalise_name, normalise_organisation
from tests.smtp_servers import FaultServer
from tests.web_fixtures import (  # noqa: F401
    client,
    fault_server,
    make_fault_server,
    sink,
    subscribe,
    subscriber_by_email,
    web_settings,
)

HIDDEN = {"line separator": "\u2028", "paragraph separator": "\u2029",
          "zero-width space": "\u200b", "byte-order mark": "\ufeff"}
KENT_VIEWER = {"regions": ["kent"], "known_regions": ["kent"]}
ADDED = Context(channel=Channel.ADMIN, actor="coordinator", lawful_basis="legitimate_interests")


@pytest.mark.parametrize("char", HIDDEN.values(), ids=HIDDEN.keys())
def test_inside_a_name_they_are_refused(char: str) -> None:
    for check in (normalise_name, normalise_organisation):
        with pytest.raises(InvalidInput) as err:
            check(f"Sam{char}Tester")
        assert err.value.field in ("name", "organisation")


@pytest.mark.parametrize("char", ["\u200b", "\ufeff"], ids=["zero-width space", "bom"])
def test_at_the_ends_invisible_ones_are_trimmed(char: str) -> None:
    assert normalise_name(f"{char}Sam Tester{char}") == "Sam Tester"


def test_joiners_that_scripts_need_stay() -> None:
    assert normalise_name("می\u200cخواهم") == "می\u200cخواهم"


@pytest.mark.parametrize("char", HIDDEN.values(), ids=HIDDEN.keys())
def test_the_store_refuses_them(session: Session, rules: Rules, char: str) -> None:
    with pytest.raises(InvalidInput):
        store.profile_from(rules, email="a@kent.police.uk", name=f"A{char}B")
    sub = store.add_active(session, rules, store.profile_from(rules, email="b@kent.police.uk",
                                                               name="B"),
                           [store.get_topic(session, "newsletter")], ADDED)
    with pytest.raises(InvalidInput):
        store.update_profile(session, rules, sub, ADDED, organisation=f"Kent{char}Police")
    assert sub.organisation is None


@pytest.mark.parametrize("char", HIDDEN.values(), ids=HIDDEN.keys())
def test_the_subscribe_page_refuses_them(client: TestClient, sink: FaultServer,
                                         char: str) -> None:
    response = subscribe(client, "sam@kent.police.uk", name=f"Sam{char}Tester")
    assert response.status_code == 400
    assert "name" in response.text
    assert subscriber_by_email(client.app.state.web.sessions.kw["bind"],
                               "sam@kent.police.uk") is None


@pytest.mark.parametrize("char", ["\u200b", "\ufeff"], ids=["zero-width space", "bom"])
def test_a_console_users_name_refuses_them(session: Session, char: str) -> None:
    with pytest.raises(MailerError, match="invisible"):
        accounts.add_user(session, login="jo", display_name=f"Jo{char}Smith", role="viewer",
                          **KENT_VIEWER, password="a long enough password 1")


@pytest.mark.parametrize("char", ["\u2028", "\u2029"], ids=["line sep", "paragraph sep"])
def test_a_console_users_name_folds_line_separators_to_a_space(session: Session,
                                                               char: str) -> None:
    user = accounts.add_user(session, login="jo", display_name=f"Jo{char}Smith", role="viewer",
                             **KENT_VIEWER, password="a long enough password 1")
    assert user.display_name == "Jo Smith"
