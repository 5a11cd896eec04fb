"""Sign-in with the force's directory (issue 18), against a real OpenID Connect provider.

`tests/oidc_provider.mjs` runs `oidc-provider` (npm, installed by .ci/setup) on a free loopback
port, with this app registered as its client and test accounts in a JSON file each test writes
(app roles, groups, disabled). The test plays the browser: the console's pages through the
TestClient, the provider's through httpx, following each redirect to whichever of the two it
names, and submitting the provider's sign-in form. Nothing of Authlib or the provider is
mocked; a tampered ID token is made by the provider itself on its way out of its token
endpoint (`/test/tamper`), as a man in the middle would.

Under CI=true a missing node or oidc-provider fails these tests; elsewhere they skip.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import select
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
import time_machine
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy import select as sql_select

from mailer import accounts, directory
from mailer.accounts import NO_PASSWORD, SESSION_LIFETIME, User
from mailer.audit import AuditEntry
from mailer.config import DirectoryGrant, Settings, load_settings
from mailer.errors import ConfigError
from mailer.web.admin import LOGIN_ATTEMPTS_PER_NETWORK
from mailer.web.app import create_app
from subscribers.db import session_factory, utcnow
from tests.test_admin_routes import PASSWORD, login, make_user
from tests.web_fixtures import (  # noqa: F401
    BASE,
    csrf_of,
    fault_server,
    make_fault_server,
    make_settings,
    sink,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "oidc_provider.mjs"
MODULES = ROOT / "var" / "oidc" / "node_modules"
CLIENT_ID = "msht-console"
CLIENT_SECRET = "a-client-secret-for-the-tests-only"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
KENT = "MSHT.Kent.Coordinator"
ADMIN = "MSHT.Admin"
ESSEX_GROUP = "5b0a9d3e-7c1f-4f0e-9a52-3f1d2c4b6e80"  # a group object id, as Entra sends them
ROLES = {KENT: {"role": "coordinator", "regions": ["kent"]}, ADMIN: {"role": "admin"}}
GROUPS = {ESSEX_GROUP: {"role": "viewer", "regions": ["essex"]}}


def _require(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason}, and CI=true requires it", pytrace=False)
    pytest.skip(reason)


class Provider:
    """The running provider: its issuer, and the test's controls over it."""

    def __init__(self, issuer: str, accounts_file: Path,
                 console: socket.socket | None = None) -> None:
        self.issuer, self.accounts_file = issuer, accounts_file
        # A listening loopback socket registered with the provider, for the console under a
        # real server (the Chromium test): a redirect must be known to the provider in advance.
        self.console = console

    def accounts(self, **people: dict[str, Any]) -> None:
        """Replace the directory's people: key -> claims (name, roles, groups, disabled...)."""
        self.accounts_file.write_text(json.dumps({
            key: {"name": key.title(), "preferred_username": f"{key}@kent.police.uk",
                  "email": f"{key}@kent.police.uk", "oid": f"oid-{key}", **claims}
            for key, claims in people.items()}))

    def control(self, what: str, **value: Any) -> None:
        httpx.post(f"{self.issuer}/test/{what}", json=value, timeout=10).raise_for_status()


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    node = shutil.which("node")
    if node is None:
        _require("node is not on PATH")
    if not (MODULES / "oidc-provider" / "lib" / "index.js").exists():
        _require(f"oidc-provider is not installed in {MODULES} (bash .ci/setup)")
    assert node is not None
    console = socket.socket()
    console.bind(("127.0.0.1", 0))
    console.listen(64)
    folder = tmp_path_factory.mktemp("oidc")
    accounts_file = folder / "accounts.json"
    accounts_file.write_text("{}")
    config = folder / "config.json"
    config.write_text(json.dumps({
        "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
        "redirect_uri": f"{BASE}/admin/login/directory/callback",
        "more_redirect_uris": [f"http://127.0.0.1:{console.getsockname()[1]}"
                               "/admin/login/directory/callback"],
        "accounts_file": str(accounts_file)}))
    with (folder / "provider.log").open("wb") as log:
        process = subprocess.Popen([node, str(SCRIPT), str(MODULES), str(config)],
                                   stdout=subprocess.PIPE, stderr=log)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        line = process.stdout.readline() if ready else b""
        if not line:
            pytest.fail(f"the provider did not start: {(folder / 'provider.log').read_text()}")
        yield Provider(json.loads(line)["issuer"], accounts_file, console)
    finally:
        process.terminate()
        process.wait(10)
        console.close()


@pytest.fixture
def idp(provider: Provider) -> Provider:
    """The provider as each test starts it: nobody in the directory, nothing tampered, its
    clock the real one."""
    provider.accounts()
    provider.control("tamper", mode="")
    provider.control("clock", offset_ms=0)
    return provider


def _settings(sink: Any, tmp_path: Path, idp: Provider, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"oidc_issuer": idp.issuer, "oidc_client_id": CLIENT_ID,
                              "oidc_client_secret": CLIENT_SECRET, "oidc_roles": ROLES}
    values.update(overrides)
    return make_settings(sink, tmp_path, **values)


@pytest.fixture
def app(settings: Settings, sink: Any, tmp_path: Path, idp: Provider) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(sink, tmp_path, idp)), base_url=BASE) as client:
        yield client


class Browser:
    """One person's browser: the console through the TestClient, the provider over HTTP, each
    with its own cookies, following redirects from one to the other."""

    def __init__(self, app: TestClient) -> None:
        self.app = app
        self.web = httpx.Client(timeout=10)

    def go(self, url: str, data: dict[str, str] | None = None) -> tuple[str, httpx.Response]:
        method = "POST" if data is not None else "GET"
        for _ in range(20):
            client = self.app if url.startswith(BASE) else self.web
            response = client.request(method, url, data=data, follow_redirects=False)
            if response.status_code not in (302, 303):
                return url, response
            url, method, data = urljoin(url, response.headers["location"]), "GET", None
        raise AssertionError("too many redirects")

    def sign_in(self, account: str) -> httpx.Response:
        """From the console's sign-in page, through the directory's, back to the console."""
        page = self.app.get("/admin/login")
        start = re.search(r'href="([^"]+)">Sign in with your force account', page.text)
        assert start is not None, "the sign-in page offers no directory sign-in"
        url, response = self.go(unescape(start.group(1)))
        if "/interaction/" in url:  # the directory's own sign-in page (no session there yet)
            action = re.search(r'action="([^"]+)"', response.text)
            assert action is not None
            url, response = self.go(urljoin(url, action.group(1)), {"login": account})
        assert url.startswith(BASE), f"stopped at the provider: {url} {response.text[:300]}"
        return response


def _user(engine: Engine, login: str) -> User | None:
    with session_factory(engine)() as session:
        user = session.scalar(sql_select(User).where(User.login == login))
        if user is not None:
            session.expunge(user)
        return user


def _audit(engine: Engine) -> list[tuple[str, str]]:
    with session_factory(engine)() as session:
        return [(e.actor, e.action) for e in session.scalars(
            sql_select(AuditEntry).order_by(AuditEntry.id))]


def _signed_in(app: TestClient) -> bool:
    response = app.get("/admin", follow_redirects=False)
    assert response.status_code in (200, 303), response.status_code
    return response.status_code == 200


# ---------------------------------------------------------------- signing in

@pytest.mark.parametrize(("claim", "values", "role", "regions"), [
    ("roles", [KENT], "coordinator", ["kent"]),
    ("groups", [ESSEX_GROUP, "an-unmapped-group"], "viewer", ["essex"]),
])
def test_first_sign_in_makes_the_account_with_the_mapped_role_and_regions(
        settings: Settings, sink: Any, tmp_path: Path, idp: Provider, engine: Engine,
        claim: str, values: list[str], role: str, regions: list[str]) -> None:
    idp.accounts(alice={claim: values, "name": "Alice Example"})
    mapping = ROLES if claim == "roles" else GROUPS
    with TestClient(create_app(_settings(sink, tmp_path, idp, oidc_claim=claim,
                                         oidc_roles=mapping)), base_url=BASE) as app:
        page = Browser(app).sign_in("alice")
        assert page.status_code == 200 and "Alice Example" in page.text
        assert _signed_in(app)
    user = _user(engine, "alice")
    assert user is not None
    assert (user.role, user.regions) == (role, regions)
    assert (user.directory_issuer, user.directory_subject) == (idp.issuer, "oid-alice")
    assert user.password_hash == NO_PASSWORD and user.email == "alice@kent.police.uk"
    assert _audit(engine) == [("alice", "user.add"), ("alice", "login.ok")]


def test_a_changed_role_is_applied_at_the_next_sign_in(app: TestClient, idp: Provider,
                                                       engine: Engine) -> None:
    idp.accounts(alice={"roles": [KENT]})
    Browser(app).sign_in("alice")
    idp.accounts(alice={"roles": [ADMIN, KENT]})
    again = Browser(app)
    assert again.sign_in("alice").status_code == 200
    user = _user(engine, "alice")
    assert user is not None and (user.role, user.regions) == ("admin", [])
    assert again.app.get("/admin/users").status_code == 200  # an administrator's page
    assert _audit(engine) == [("alice", "user.add"), ("alice", "login.ok"),
                              ("alice", "user.change"), ("alice", "login.ok")]


def test_someone_removed_from_the_role_is_refused_once_the_session_runs_out(
        app: TestClient, idp: Provider, engine: Engine) -> None:
    idp.accounts(alice={"roles": [KENT]})
    start = utcnow()
    browser = Browser(app)
    browser.sign_in("alice")
    token = app.cookies["console"]
    with session_factory(engine)() as session:
        _, api_token = accounts.create_token(session, accounts.get_user(session, "alice"),
                                             name="script")
        session.commit()
    idp.accounts(alice={"roles": []})  # removed from the app role in the directory
    assert _signed_in(app)  # the session is bounded, not re-checked at every request...

    later = start + SESSION_LIFETIME + dt.timedelta(minutes=1)
    # The provider's clock moves with ours: its tokens must not look expired or early to us.
    idp.control("clock", offset_ms=int((later - utcnow()).total_seconds() * 1000))
    with time_machine.travel(later, tick=True):
        app.cookies.set("console", token)  # the browser would still send it
        assert not _signed_in(app)  # ...and it runs out: sign in again, through the directory
        refused = browser.sign_in("alice")  # the directory still knows her: no password asked
        assert refused.status_code == 403
        assert "does not give you access to the console" in refused.text
        assert "Try again" in refused.text  # not a dead end
        assert not _signed_in(app)
        with session_factory(engine)() as session:  # her API token stops with her role
            assert accounts.token_actor(session, api_token) is None
    assert _audit(engine)[-1] == ("alice", "login.no_role")


def test_someone_disabled_in_the_directory_is_refused(app: TestClient, idp: Provider,
                                                     engine: Engine) -> None:
    idp.accounts(alice={"roles": [KENT]})
    Browser(app).sign_in("alice")
    app.post("/admin/logout", data={"csrf_token": csrf_of(app.get("/admin").text)})
    assert not _signed_in(app)
    idp.accounts(alice={"roles": [KENT], "disabled": True})
    refused = Browser(app).sign_in("alice")
    assert refused.status_code == 401 and "You could not be signed in" in refused.text
    assert "disabled" in refused.text
    assert not _signed_in(app)
    assert _audit(engine)[-2:] == [("alice", "logout"),
                                   ("(directory)", "login.directory_provider_error")]


def test_a_group_overage_is_refused_with_what_to_do(settings: Settings, sink: Any,
                                                    tmp_path: Path, idp: Provider,
                                                    engine: Engine) -> None:
    idp.accounts(alice={"overage": True})
    with TestClient(create_app(_settings(sink, tmp_path, idp, oidc_claim="groups",
                                         oidc_roles=GROUPS)), base_url=BASE) as app:
        refused = Browser(app).sign_in("alice")
        assert refused.status_code == 401 and "too many groups" in refused.text
        assert "app role" in refused.text and "Try again" in refused.text
        assert not _signed_in(app)
    assert _audit(engine) == [("(directory)", "login.directory_groups_overage")]


def test_an_account_disabled_here_stays_disabled_whatever_the_directory_says(
        app: TestClient, idp: Provider, engine: Engine) -> None:
    idp.accounts(alice={"roles": [KENT]})
    Browser(app).sign_in("alice")
    with session_factory(engine)() as session:
        accounts.disable_user(session, accounts.get_user(session, "alice"))
        session.commit()
    assert not _signed_in(app)
    refused = Browser(app).sign_in("alice")
    assert refused.status_code == 403 and "Your account is disabled" in refused.text
    assert not _signed_in(app)
    assert _audit(engine)[-1] == ("alice", "login.disabled")


@pytest.mark.parametrize("tamper", ["payload", "audience", "nonce"])
def test_a_tampered_id_token_is_refused(app: TestClient, idp: Provider, engine: Engine,
                                        tamper: str) -> None:
    # "payload": the roles raised to administrator, the provider's signature kept; "audience"
    # and "nonce": properly signed by the provider's key, but for other applications (naming
    # us as its authorised party, so that only the audience check can catch it) or for
    # another sign-in.
    idp.accounts(alice={"roles": [KENT]})
    idp.control("tamper", mode=tamper)
    refused = Browser(app).sign_in("alice")
    assert refused.status_code == 401 and "ID token was not valid" in refused.text
    assert not _signed_in(app)
    assert _user(engine, "alice") is None
    assert _audit(engine) == [("(directory)", "login.directory_id_token")]


def test_an_answer_to_a_sign_in_that_did_not_start_here_is_refused(
        app: TestClient, idp: Provider, engine: Engine) -> None:
    refused = app.get("/admin/login/directory/callback?code=stolen&state=guessed")
    assert refused.status_code == 401 and "did not start here" in refused.text
    assert _audit(engine) == [("(directory)", "login.directory_state")]


def test_refused_answers_count_against_the_network_like_wrong_passwords(
        app: TestClient, idp: Provider, engine: Engine) -> None:
    for _ in range(LOGIN_ATTEMPTS_PER_NETWORK):
        assert app.get("/admin/login/directory/callback?code=x&state=y").status_code == 401
    limited = app.get("/admin/login/directory/callback?code=x&state=y")
    assert limited.status_code == 429 and "Wait 15 minutes" in limited.text
    idp.accounts(alice={"roles": [KENT]})
    assert Browser(app).sign_in("alice").status_code == 429  # a good answer waits too
    actions = [a for _, a in _audit(engine)]
    assert actions == ["login.directory_state"] * LOGIN_ATTEMPTS_PER_NETWORK + [
        "login.rate_limited"] * 2


# ---------------------------------------------------------------- the mapping

def test_several_mapped_values_give_the_highest_role_with_its_regions() -> None:
    grants = {k: DirectoryGrant(role=v["role"], regions=v["regions"]) for k, v in {
        "kent": {"role": "coordinator", "regions": ["kent"]},
        "essex": {"role": "coordinator", "regions": ["essex"]},
        "medway.view": {"role": "viewer", "regions": ["medway"]},
        "admin": {"role": "admin", "regions": []}}.items()}
    assert directory.grant_for(grants, ("kent", "medway.view", "essex", "kent")) == \
        DirectoryGrant(role="coordinator", regions=["kent", "essex"])
    assert directory.grant_for(grants, ("medway.view", "admin")) == \
        DirectoryGrant(role="admin", regions=[])
    assert directory.grant_for(grants, ("medway.view",)) == \
        DirectoryGrant(role="viewer", regions=["medway"])
    assert directory.grant_for(grants, ("Kent", "unmapped")) is None  # values match exactly


@pytest.mark.parametrize(("mapping", "said"), [
    ({"X": {"role": "coordinator", "regions": ["atlantis"]}}, "unknown region(s) atlantis"),
    ({"X": {"role": "viewer"}}, "a viewer needs at least one region"),
    ({"X": {"role": "superuser"}}, "oidc_roles.X.role"),
])
def test_a_mapping_that_could_not_work_is_refused_when_the_settings_load(
        settings: Settings, mapping: dict[str, Any], said: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(said)):
        load_settings(oidc_issuer="https://login.example/v2.0", oidc_client_id="x",
                      oidc_roles=mapping)


# ---------------------------------------------------------------- break glass

def test_break_glass_local_sign_in_with_a_second_factor_still_works(
        app: TestClient, idp: Provider, engine: Engine) -> None:
    make_user(engine, "root", role="admin", regions=())
    make_user(engine, "bob")
    with session_factory(engine)() as session:
        secret = accounts.enable_totp(session, accounts.get_user(session, "root"))
        session.commit()
    code = accounts.totp_code(secret, accounts.totp_step(utcnow()))
    assert login(app, "root", PASSWORD, code).status_code == 303
    assert _signed_in(app)
    app.cookies.clear()
    # With the directory set up, a password alone is not a way in any more.
    refused = login(app, "bob", PASSWORD)
    assert refused.status_code == 403 and "Sign in with your force account" in refused.text
    assert not _signed_in(app)
    # An account the directory made has no password at all.
    idp.accounts(alice={"roles": [ADMIN]})
    Browser(app).sign_in("alice")
    app.cookies.clear()
    assert login(app, "alice", PASSWORD).status_code == 401
    assert [a for a in _audit(engine) if a[1].startswith("login.")] == [
        ("root", "login.ok"), ("bob", "login.no_second_factor"), ("alice", "login.ok"),
        ("alice", "login.bad")]


def test_without_a_directory_the_sign_in_page_is_as_before(client_without: TestClient) -> None:
    page = client_without.get("/admin/login")
    assert "Sign in with your force account" not in page.text
    assert client_without.get("/admin/login/directory").status_code == 404
    assert csrf_of(page.text)


def test_a_directory_that_cannot_be_reached_is_said_so_with_a_way_on(
        settings: Settings, sink: Any, tmp_path: Path, free_tcp_port: int) -> None:
    nobody = f"http://127.0.0.1:{free_tcp_port}"  # nothing listens there
    with TestClient(create_app(_settings(sink, tmp_path, Provider(nobody, tmp_path / "x"))),
                    base_url=BASE) as app:
        page = app.get("/admin/login/directory")
    assert page.status_code == 503 and "cannot be reached" in page.text
    assert "Try again" in page.text and "Back to sign in" in page.text


@pytest.fixture
def client_without(settings: Settings, sink: Any, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(sink, tmp_path)), base_url=BASE) as client:
        yield client


# Once, on the embedded default: the other tests here cover both databases, and the provider
# knows one loopback port for a real server.
@pytest.mark.browser
@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_directory_sign_in_in_chromium_and_its_pages_pass_axe(
        browser: Any, settings: Settings, sink: Any, tmp_path: Path, idp: Provider,
        engine: Engine) -> None:
    """The whole round trip in a real browser, the cookies its own: the console's sign-in page,
    the directory's, and back signed in; then the refusals a person can meet. Each of the
    console's pages on the way passes axe-core (the console's axe walk runs without a
    directory, so these pages are checked here)."""
    from tests.test_web_e2e import AXE, _axe

    if not AXE.exists():
        _require(f"axe-core missing at {AXE}")
    assert idp.console is not None
    base = f"http://127.0.0.1:{idp.console.getsockname()[1]}"
    served = _settings(sink, tmp_path, idp, base_url=base)
    server = uvicorn.Server(uvicorn.Config(create_app(served), log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [idp.console]},
                              daemon=True)
    thread.start()
    idp.accounts(kim={"roles": [KENT]}, lee={"roles": ["Some.Other.App"]})
    context = browser.new_context(bypass_csp=True)  # to add axe-core to each page
    page = context.new_page()
    problems: list[str] = []
    try:
        page.goto(f"{base}/admin/login")
        problems += _axe(page)
        page.get_by_role("link", name="Sign in with your force account").click()
        page.get_by_label("Account").fill("kim")
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{base}/admin")
        assert "Kim" in page.inner_text("header")
        kim = _user(engine, "kim")
        assert kim is not None and (kim.role, kim.regions) == ("coordinator", ["kent"])

        refused = browser.new_context(bypass_csp=True).new_page()  # someone with no mapped role
        refused.goto(f"{base}/admin/login")
        refused.get_by_role("link", name="Sign in with your force account").click()
        refused.get_by_label("Account").fill("lee")
        refused.get_by_role("button", name="Sign in").click()
        refused.wait_for_url(re.compile(r".*/admin/login/directory/callback.*"))
        assert refused.get_by_role("link", name="Back to sign in").is_visible()
        problems += _axe(refused)
        refused.goto(f"{base}/admin/login/directory/callback?state=forged&code=x")
        assert refused.get_by_role("link", name="Try again").is_visible()
        problems += _axe(refused)
        refused.context.close()
    finally:
        context.close()
        server.should_exit = True
        thread.join(10)
    assert problems == []
