"""Accounts, sign-in and the audit log against real databases: argon2id, lockout per account and
the failed-sign-in limit per network (through the console), TOTP (RFC 6238 test vectors, and
through the console), session cookies over http and https, sessions ended on the server, API
tokens and sessions stored hashed, four-eyes approval and append-only audit."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from mailer import accounts, audit, outbox
from mailer.accounts import AccountError, LoginOutcome
from mailer.config import Settings
from mailer.web.admin import LOGIN_ATTEMPTS_PER_NETWORK
from mailer.web.app import create_app
from subscribers.db import session_factory
from tests.clock import uk_noon_in
from tests.test_admin_routes import PASSWORD, app_client, login, make_user, sample_edition  # noqa
from tests.web_fixtures import (  # noqa: F401
    BASE,
    csrf_of,
    fault_server,
    make_fault_server,
    sink,
    web_settings,
)

RFC_SECRET = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"  # "12345678901234567890", RFC 6238 App. B


@pytest.mark.parametrize(("unix", "code"), [(59, "287082"), (1111111109, "081804"),
                                            (1234567890, "005924"), (2000000000, "279037")])
def test_totp_matches_the_rfc_6238_test_vectors(unix: int, code: str) -> None:
    # RFC 6238's 8-digit SHA-1 values, truncated to the 6 digits authenticator apps show.
    now = datetime.fromtimestamp(unix, UTC)
    assert accounts.totp_code(RFC_SECRET, accounts.totp_step(now)) == code


def test_a_totp_code_works_once_and_only_near_its_time() -> None:
    now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    code = accounts.totp_code(RFC_SECRET, accounts.totp_step(now))
    step = accounts.totp_match(RFC_SECRET, code, now, None)
    assert step == accounts.totp_step(now)
    assert accounts.totp_match(RFC_SECRET, code, now, step) is None  # replayed
    assert accounts.totp_match(RFC_SECRET, code, now + timedelta(minutes=5), None) is None
    assert accounts.totp_match(RFC_SECRET, "12345", now, None) is None


def test_a_totp_code_is_accepted_as_the_app_shows_it_with_a_space() -> None:
    now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    code = accounts.totp_code(RFC_SECRET, accounts.totp_step(now))
    for typed in (f"{code[:3]} {code[3:]}", f" {code} ", f"{code[:2]} {code[2:4]} {code[4:]}"):
        assert accounts.totp_match(RFC_SECRET, typed, now, None) == accounts.totp_step(now)
    assert accounts.totp_match(RFC_SECRET, f"{code[:3]}-{code[3:]}", now, None) is None


def test_a_totp_code_works_one_step_either_side_for_clock_drift_and_no_further() -> None:
    now = datetime(2026, 1, 5, 9, 0, 10, tzinfo=UTC)
    step = accounts.totp_step(now)
    for drift in (-1, 0, 1):
        code = accounts.totp_code(RFC_SECRET, step + drift)
        assert accounts.totp_match(RFC_SECRET, code, now, None) == step + drift
    for drift in (-2, 2):
        code = accounts.totp_code(RFC_SECRET, step + drift)
        assert accounts.totp_match(RFC_SECRET, code, now, None) is None


def test_after_a_lock_ends_it_takes_five_new_wrong_passwords_to_lock_again(
        session: Session) -> None:
    accounts.add_user(session, login="jo", display_name="Jo", role="viewer", password=PASSWORD,
                      regions=["kent"], known_regions=["kent"])
    now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    for _ in range(5):
        accounts.authenticate(session, "jo", "wrong password!", now=now)
    later = now + accounts.LOCK_FOR + timedelta(seconds=1)
    outcomes = [accounts.authenticate(session, "jo", "wrong password!", now=later).outcome
                for _ in range(5)]
    assert outcomes == [LoginOutcome.BAD] * 4 + [LoginOutcome.LOCKED]


def test_a_session_records_when_and_where_it_was_signed_in(session: Session) -> None:
    # For an investigation of a misused account: the audit log says who signed in, the
    # session row where from and since when, until it ends.
    user = accounts.add_user(session, login="jo", display_name="Jo", role="viewer",
                             password=PASSWORD, regions=["kent"], known_regions=["kent"])
    now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    long_ip = "fe80:0000:0000:0000:0204:61ff:fe9d:f156%ethernet0"  # 49 characters
    cookies = [accounts.start_session(session, user, ip, now=now)
               for ip in ("203.0.113.7", long_ip, "", None)]
    assert all(re.fullmatch(r"[\w-]{43}", c) for c in cookies)  # 256 bits
    rows = session.execute(text("SELECT ip, created_at FROM console_session ORDER BY id")).all()
    assert [r.ip for r in rows] == ["203.0.113.7", long_ip[:45], None, None]
    assert all(str(r.created_at).startswith("2026-01-05 09:00:00") for r in rows)


def test_a_locked_account_answers_locked_to_any_password_until_the_minute_it_ends(
        session: Session) -> None:
    user = accounts.add_user(session, login="jo", display_name="Jo", role="viewer",
                             password=PASSWORD, regions=["kent"], known_regions=["kent"])
    now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    for _ in range(5):
        accounts.authenticate(session, "jo", "wrong password!", now=now)
    for password in ("wrong password!", PASSWORD):
        result = accounts.authenticate(session, "jo", password, now=now + timedelta(minutes=1))
        assert (result.outcome, result.user) == (LoginOutcome.LOCKED, user)  # for the audit
    ends = now + accounts.LOCK_FOR
    assert accounts.authenticate(session, "jo", PASSWORD, now=ends).outcome == LoginOutcome.OK


def test_an_account_without_a_usable_password_is_refused_and_locked_never_an_error(
        session: Session) -> None:
    user = accounts.add_user(session, login="jo", display_name="Jo", role="viewer",
                             password=PASSWORD, regions=["kent"], known_regions=["kent"])
    user.password_hash = "!"  # e.g. set by hand to stop password sign-in
    now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    outcomes = [accounts.authenticate(session, "jo", PASSWORD, now=now).outcome
                for _ in range(6)]
    assert outcomes == [LoginOutcome.BAD] * 4 + [LoginOutcome.LOCKED] * 2


def test_a_password_of_twelve_characters_is_long_enough_and_a_short_one_says_how_to_choose(
        session: Session) -> None:
    # NCSC: length, not complexity rules; the refusal says how to make a strong one.
    with pytest.raises(AccountError, match="at least 12 characters") as refused:
        accounts.add_user(session, login="al", display_name="Al", role="viewer",
                          password="x" * 11, regions=["kent"], known_regions=["kent"])
    assert refused.value.hint == "three random words make a strong, memorable password"
    user = accounts.add_user(session, login="jo", display_name="Jo", role="viewer",
                             password="x" * 12, regions=["kent"], known_regions=["kent"])
    assert accounts.authenticate(session, "jo", "x" * 12).user is user
    # a passphrase may be long, up to 1,024 characters; a megabyte is refused before hashing
    accounts.set_password(session, user, "y" * 1024)
    with pytest.raises(AccountError, match=r"^the password is too long$"):
        accounts.set_password(session, user, "y" * 1025)


def test_each_refused_sign_in_is_audited_under_the_account_it_tried(session: Session) -> None:
    # An admin reading the audit log sees which account is being guessed at.
    from mailer.operations import users

    user = accounts.add_user(session, login="jo", display_name="Jo Smith", role="viewer",
                             password=PASSWORD, regions=["kent"], known_regions=["kent"])
    now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)

    def sign_in(login: str, password: str, code: str = "") -> None:
        with time_machine.travel(now, tick=False):
            users.sign_in(session, via="web", ip="192.0.2.1", login=login, password=password,
                          code=code)

    sign_in("jo", "wrong password!")
    accounts.enable_totp(session, user)
    secret, step = user.totp_secret or "", accounts.totp_step(now)
    sign_in("jo", PASSWORD)
    sign_in("jo", PASSWORD, _not_a_code_of(secret, step))
    sign_in("nobody", PASSWORD)
    accounts.disable_user(session, user)
    sign_in("jo", PASSWORD, accounts.totp_code(secret, step))
    entries = [(e.actor, e.actor_name, e.action) for e in reversed(audit.entries(session)[1])]
    assert entries == [("jo", "Jo Smith", "login.bad"), ("jo", "Jo Smith", "login.need_code"),
                       ("jo", "Jo Smith", "login.bad"), ("(unknown)", None, "login.bad"),
                       ("jo", "Jo Smith", "login.disabled")]


def _not_a_code_of(secret: str, step: int) -> str:
    """Six digits that no step near `step` accepts."""
    near = {accounts.totp_code(secret, step + d) for d in (-1, 0, 1)}
    return next(c for c in (f"{n:06d}" for n in range(1000)) if c not in near)


def test_wrong_codes_lock_the_account_too_and_a_success_starts_the_count_again(
        session: Session) -> None:
    user = accounts.add_user(session, login="jo", display_name="Jo", role="viewer",
                             password=PASSWORD, regions=["kent"], known_regions=["kent"])
    now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    wrong = ["wrong password!"] * 4
    outcomes = [accounts.authenticate(session, "jo", p, now=now).outcome
                for p in [*wrong, PASSWORD, *wrong]]
    assert outcomes == [LoginOutcome.BAD] * 4 + [LoginOutcome.OK] + [LoginOutcome.BAD] * 4
    accounts.authenticate(session, "jo", PASSWORD, now=now)  # the count starts again
    accounts.enable_totp(session, user)
    bad = _not_a_code_of(user.totp_secret or "", accounts.totp_step(now))
    outcomes = [accounts.authenticate(session, "jo", PASSWORD, bad, now=now).outcome
                for _ in range(5)]
    assert outcomes == [LoginOutcome.BAD] * 4 + [LoginOutcome.LOCKED]
    assert user.locked_until == now + accounts.LOCK_FOR


def test_a_password_hashed_with_weaker_settings_is_rehashed_at_sign_in(
        session: Session, production_hasher: PasswordHasher) -> None:
    user = accounts.add_user(session, login="jo", display_name="Jo", role="viewer",
                             password=PASSWORD, regions=["kent"], known_regions=["kent"])
    user.password_hash = PasswordHasher(time_cost=1, memory_cost=8192).hash(PASSWORD)
    assert accounts.authenticate(session, "jo", PASSWORD).outcome == LoginOutcome.OK
    assert not accounts.HASHER.check_needs_rehash(user.password_hash)
    assert accounts.authenticate(session, "jo", PASSWORD).outcome == LoginOutcome.OK


def test_passwords_are_argon2id_and_weak_ones_are_refused(
        session: Session, production_hasher: PasswordHasher) -> None:
    user = accounts.add_user(session, login="Jo", display_name="Jo  Smith", role="coordinator",
                             password=PASSWORD, regions=["kent"], known_regions=["kent"])
    assert user.login == "jo" and user.display_name == "Jo Smith"
    # RFC 9106's second recommended option (argon2-cffi's low-memory profile): 64 MiB, t=3, p=4
    assert user.password_hash.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    with pytest.raises(AccountError, match="too short"):
        accounts.add_user(session, login="al", display_name="Al", role="viewer",
                          password="short", regions=["kent"], known_regions=["kent"])
    with pytest.raises(AccountError, match="needs at least one region"):
        accounts.add_user(session, login="al", display_name="Al", role="coordinator",
                          password=PASSWORD, regions=[], known_regions=["kent"])
    with pytest.raises(AccountError, match="already"):
        accounts.add_user(session, login="jo", display_name="Jo", role="viewer",
                          password=PASSWORD, regions=["kent"], known_regions=["kent"])


def test_five_wrong_passwords_lock_the_account_even_against_the_right_one(
        session: Session) -> None:
    accounts.add_user(session, login="jo", display_name="Jo", role="viewer", password=PASSWORD,
                      regions=["kent"], known_regions=["kent"])
    now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    outcomes = [accounts.authenticate(session, "jo", "wrong password!", now=now).outcome
                for _ in range(5)]
    assert outcomes == [LoginOutcome.BAD] * 4 + [LoginOutcome.LOCKED]
    assert accounts.authenticate(session, "jo", PASSWORD, now=now).outcome == LoginOutcome.LOCKED
    later = now + accounts.LOCK_FOR + timedelta(seconds=1)
    assert accounts.authenticate(session, "jo", PASSWORD, now=later).outcome == LoginOutcome.OK
    assert accounts.authenticate(session, "nobody", PASSWORD).outcome == LoginOutcome.BAD


def test_totp_is_required_once_enabled(session: Session) -> None:
    user = accounts.add_user(session, login="jo", display_name="Jo", role="viewer",
                             password=PASSWORD, regions=["kent"], known_regions=["kent"])
    secret = accounts.enable_totp(session, user)
    now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    assert accounts.authenticate(session, "jo", PASSWORD, now=now).outcome == \
        LoginOutcome.NEED_CODE
    code = accounts.totp_code(secret, accounts.totp_step(now))
    assert accounts.authenticate(session, "jo", PASSWORD, code, now=now).outcome == \
        LoginOutcome.OK
    assert accounts.authenticate(session, "jo", PASSWORD, code, now=now).outcome == \
        LoginOutcome.BAD  # the same code again


def test_disabling_ends_sessions_and_revokes_tokens(session: Session) -> None:
    user = accounts.add_user(session, login="jo", display_name="Jo", role="coordinator",
                             password=PASSWORD, regions=["kent"], known_regions=["kent"])
    cookie = accounts.start_session(session, user, "10.0.0.1")
    _row, token = accounts.create_token(session, user, name="script")
    assert accounts.session_user(session, cookie) is user
    assert accounts.token_actor(session, token) is not None
    with pytest.raises(AccountError, match="more rights"):
        accounts.create_token(session, user, name="x", role="admin")
    accounts.disable_user(session, user)
    assert accounts.session_user(session, cookie) is None
    assert accounts.token_actor(session, token) is None
    assert accounts.authenticate(session, "jo", PASSWORD).outcome == LoginOutcome.DISABLED


def test_disabling_one_user_leaves_everyone_else_signed_in(session: Session) -> None:
    users = [accounts.add_user(session, login=login, display_name=login, role="coordinator",
                               password=PASSWORD, regions=["kent"], known_regions=["kent"])
             for login in ("jo", "al")]
    cookies = [accounts.start_session(session, u, None) for u in users]
    tokens = [accounts.create_token(session, u, name="script") for u in users]
    assert accounts.disable_user(session, users[0]) is True
    assert accounts.disable_user(session, users[0]) is False  # already: nothing more to do
    assert accounts.session_user(session, cookies[0]) is None
    assert accounts.session_user(session, cookies[1]) is users[1]
    assert accounts.token_actor(session, tokens[0][1]) is None
    assert tokens[0][0].revoked_at is not None  # the token list shows it revoked, and when
    assert tokens[1][0].revoked_at is None
    assert accounts.token_actor(session, tokens[1][1]) is not None


def test_a_tokens_last_use_is_kept_to_the_minute(session: Session) -> None:
    # Shown beside each token so that an unused one can be revoked; written at most once a
    # minute, so a script calling the API in a loop does not write on every call.
    user = accounts.add_user(session, login="jo", display_name="Jo", role="coordinator",
                             password=PASSWORD, regions=["kent"], known_regions=["kent"])
    row, token = accounts.create_token(session, user, name="script")
    first = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    for at, seen in ((first, first), (first + timedelta(seconds=60), first),
                     (first + timedelta(seconds=61), first + timedelta(seconds=61))):
        assert accounts.token_actor(session, token, now=at) is not None
        assert row.last_used_at == seen


def test_a_session_ends_after_an_idle_hour_and_after_an_eight_hour_shift(
        session: Session) -> None:
    user = accounts.add_user(session, login="jo", display_name="Jo", role="viewer",
                             password=PASSWORD, regions=["kent"], known_regions=["kent"])
    now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    idle = accounts.start_session(session, user, None, now=now)
    assert accounts.session_user(session, idle, now=now + timedelta(minutes=59)) is user
    # an hour after that last request, and not a moment later, it is over
    assert accounts.session_user(session, idle, now=now + timedelta(minutes=119)) is None
    busy = accounts.start_session(session, user, None, now=now)
    at = now
    while at < now + timedelta(hours=8) - timedelta(minutes=50):
        at += timedelta(minutes=50)  # a request every 50 minutes keeps it alive...
        assert accounts.session_user(session, busy, now=at) is user
    # ...until the shift's eight hours are up, however busy
    assert accounts.session_user(session, busy, now=now + timedelta(hours=8)) is None


def test_the_audit_log_refuses_update_and_delete_in_the_database(engine: Engine) -> None:
    with session_factory(engine)() as session:
        audit.record(session, actor="jo", action="login.ok", ip="10.0.0.1")
        session.commit()
    for statement in ("UPDATE audit_entry SET actor = 'someone else'", "DELETE FROM audit_entry"):
        with engine.connect() as conn, pytest.raises(DBAPIError, match="append-only"):
            conn.execute(text(statement))
    with session_factory(engine)() as session, pytest.raises(DBAPIError):
        session.execute(update(audit.AuditEntry).values(action="x"))
    with Session(engine) as session:
        total, rows = audit.entries(session)
        assert total == 1 and rows[0].actor == "jo"


def test_the_author_cannot_approve_and_an_edit_withdraws_approval(
        engine: Engine, settings: Settings) -> None:
    eid = sample_edition(engine, settings, author="alice")
    with session_factory(engine)() as session:
        edition = outbox.get_edition(session, eid)
        with pytest.raises(outbox.EditionConflict, match="asked"):
            outbox.approve(session, edition, "bob")
        outbox.request_approval(session, edition, "alice")
        with pytest.raises(outbox.ApprovalRefused):
            outbox.approve(session, edition, "alice")
        with pytest.raises(outbox.EditionConflict, match="only an approved"):
            outbox.send_approved(session, edition, "alice")
        assert outbox.approve(session, edition, "bob")
        when = uk_noon_in(1)
        outbox.schedule(session, edition, "bob", when)
        assert (edition.status, edition.scheduled_by) == ("scheduled", "bob")
        changed_source = edition.source.replace("Feedback and suggestions",
                                                "Feedback or suggestions")
        _edition, changed = outbox.store_edition_source(session, settings, edition.slug,
                                                        changed_source, "alice")
        assert changed
        assert (edition.status, edition.approved_by, edition.scheduled_for) == \
            ("draft", None, None)


def test_every_sign_in_attempt_is_audited_with_its_address(app_client: TestClient,
                                                       engine: Engine) -> None:
    make_user(engine, "jo")
    for _ in range(3):
        assert login(app_client, "jo", "wrong password!").status_code == 401
    assert login(app_client, "jo").status_code == 303
    with Session(engine) as session:
        _total, rows = audit.entries(session)
        assert [r.action for r in reversed(rows)] == ["login.bad"] * 3 + ["login.ok"]
        assert all(r.ip for r in rows)


def test_the_session_cookie_is_httponly_lax_and_expiring(app_client: TestClient,
                                                         engine: Engine) -> None:
    make_user(engine, "jo")
    cookie = login(app_client, "jo").headers["set-cookie"]
    assert re.search(r"HttpOnly", cookie) and re.search(r"SameSite=lax", cookie, re.I)
    assert "Max-Age=28800" in cookie
    assert "Secure" not in cookie  # http://testserver; https base URLs get Secure and __Host-


def test_failed_sign_ins_are_limited_per_network_and_successes_do_not_count(
        web_settings: Settings, engine: Engine) -> None:
    make_user(engine, "jo")
    app = create_app(web_settings)
    # Clients at addresses of their own; only the first runs the app's lifespan (shutdown
    # closes the database threads, which the others share).
    with TestClient(app, base_url=BASE, client=("10.1.2.3", 50000)) as office:
        neighbour = TestClient(app, base_url=BASE, client=("10.1.2.200", 50000))
        elsewhere = TestClient(app, base_url=BASE, client=("192.0.2.7", 50000))
        for _ in range(3):  # a morning's sign-ins from one office
            assert login(office, "jo").status_code == 303
        for i in range(LOGIN_ATTEMPTS_PER_NETWORK):  # a guesser, on other accounts
            assert login(office, f"guess{i}", "wrong password!").status_code == 401
        refused = login(neighbour, "jo")  # same /24: refused, even with the right password
        assert refused.status_code == 429 and "Too many sign-in attempts" in refused.text
        assert login(elsewhere, "jo").status_code == 303
    with Session(engine) as session:
        _total, rows = audit.entries(session, audit.AuditFilter(action="login.rate_limited"))
        assert [(r.actor, r.ip) for r in rows] == [("(unknown)", "10.1.2.200")]


def test_five_failures_lock_the_account_through_the_console(app_client: TestClient,
                                                              engine: Engine) -> None:
    make_user(engine, "jo")
    answers = [login(app_client, "jo", "wrong password!") for _ in range(accounts.LOCK_AFTER)]
    locked = login(app_client, "jo")  # the right password, too soon
    nobody = login(app_client, "no-such-login", "wrong password!")
    # Locked or not, real or not, the answer is the same: it does not tell which logins exist.
    assert {a.status_code for a in [*answers, locked, nobody]} == {401}
    assert len({_error_text(a.text) for a in [*answers, locked, nobody]}) == 1
    assert "locked for 15 minutes" in locked.text
    assert "console" not in app_client.cookies
    with Session(engine) as session:
        _total, rows = audit.entries(session)
        assert [r.action for r in reversed(rows)] == \
            ["login.bad"] * (accounts.LOCK_AFTER - 1) + ["login.locked", "login.locked",
                                                          "login.bad"]


def test_a_second_factor_is_asked_for_checked_and_not_accepted_twice(
        app_client: TestClient, web_settings: Settings, engine: Engine) -> None:
    make_user(engine, "jo")
    with session_factory(engine)() as session:
        secret = accounts.enable_totp(session, accounts.get_user(session, "jo"))
        session.commit()
    first = login(app_client, "jo")
    assert first.status_code == 401 and "Enter the 6-digit code" in first.text
    assert "this one does" in first.text
    step = accounts.totp_step(datetime.now(UTC))
    near = {accounts.totp_code(secret, s) for s in range(step - 2, step + 3)}
    wrong = next(c for c in (f"{n:06d}" for n in range(1000)) if c not in near)
    assert login(app_client, "jo", code=wrong).status_code == 401
    assert "console" not in app_client.cookies
    code = accounts.totp_code(secret, accounts.totp_step(datetime.now(UTC)))
    ok = login(app_client, "jo", code=code)
    assert ok.status_code == 303 and "console=" in ok.headers["set-cookie"]
    again = TestClient(app_client.app, base_url=BASE)  # someone who saw the code
    assert login(again, "jo", code=code).status_code == 401


def test_over_https_the_cookies_are_secure_host_only_httponly_and_lax(
        web_settings: Settings, engine: Engine) -> None:
    make_user(engine, "jo")
    https = web_settings.model_copy(update={"base_url": "https://bulletin.example"})
    with TestClient(create_app(https), base_url="https://bulletin.example") as client:
        page = client.get("/admin/login")
        assert page.headers["strict-transport-security"].startswith("max-age=")
        csrf_cookie = page.headers["set-cookie"]
        assert csrf_cookie.startswith("__Host-csrf=") and "Secure" in csrf_cookie
        token = csrf_of(page.text)
        answer = client.post("/admin/login", data={"csrf_token": token, "login": "jo",
                                                   "password": PASSWORD, "next": "/admin"},
                             follow_redirects=False)
        assert answer.status_code == 303
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith("__Host-console=")
        for flag in ("HttpOnly", "Secure", "Path=/", "Max-Age=28800"):
            assert flag in cookie, flag
        assert re.search(r"SameSite=lax", cookie, re.I) and "Domain=" not in cookie
        assert client.get("/admin").status_code == 200


def test_signing_out_or_being_disabled_ends_the_session_on_the_server(
        app_client: TestClient, engine: Engine) -> None:
    make_user(engine, "jo")
    make_user(engine, "al")
    assert login(app_client, "jo").status_code == 303
    stolen = app_client.cookies["console"]
    token = csrf_of(app_client.get("/admin").text)
    out = app_client.post("/admin/logout", data={"csrf_token": token}, follow_redirects=False)
    assert out.status_code == 303 and 'console=""' in out.headers["set-cookie"]
    app_client.cookies.set("console", stolen)  # the old cookie, replayed
    assert app_client.get("/admin", follow_redirects=False).status_code == 303
    assert login(app_client, "al").status_code == 303
    assert app_client.get("/admin").status_code == 200
    with session_factory(engine)() as session:
        accounts.disable_user(session, accounts.get_user(session, "al"))
        session.commit()
    assert app_client.get("/admin", follow_redirects=False).status_code == 303
    with Session(engine) as session:
        actions = [r.action for r in reversed(audit.entries(session)[1])]
    assert actions == ["login.ok", "logout", "login.ok"]


def test_api_tokens_are_stored_hashed_and_shown_once(session: Session) -> None:
    user = accounts.add_user(session, login="jo", display_name="Jo", role="coordinator",
                             password=PASSWORD, regions=["kent"], known_regions=["kent"])
    row, token = accounts.create_token(session, user, name="script", role="viewer")
    _label, prefix, secret = token.split("_", 2)
    assert row.prefix == prefix and len(secret) >= 40  # 256 bits, urlsafe base64
    assert row.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
    stored = session.execute(text("SELECT * FROM api_token")).one()
    assert all(secret not in str(value) for value in stored)
    actor = accounts.token_actor(session, token)
    assert actor is not None and actor.role == "viewer"  # the token's role, not the user's
    other = "B" if secret.endswith("A") else "A"  # one character off, never the same token
    assert accounts.token_actor(session, f"msht_{prefix}_{secret[:-1]}{other}") is None
    assert accounts.token_actor(session, f"msht_{prefix}") is None  # a part missing
    assert accounts.token_actor(session, f"other_{prefix}_{secret}") is None  # not ours
    user.disabled = True
    assert accounts.token_actor(session, token) is None  # a disabled account's token
    user.disabled = False
    cookie = accounts.start_session(session, user, None)
    kept = session.execute(text("SELECT token_sha256 FROM console_session")).scalar_one()
    assert kept == hashlib.sha256(cookie.encode()).hexdigest() and cookie not in kept


def test_signing_in_again_replaces_the_session(app_client: TestClient, engine: Engine) -> None:
    make_user(engine, "jo")
    assert login(app_client, "jo").status_code == 303
    first = app_client.cookies["console"]
    assert login(app_client, "jo").status_code == 303
    second = app_client.cookies["console"]
    assert first != second
    app_client.cookies.set("console", first)
    assert app_client.get("/admin", follow_redirects=False).status_code == 303
    app_client.cookies.set("console", second)
    assert app_client.get("/admin", follow_redirects=False).status_code == 200
    with Session(engine) as session:
        assert session.scalar(text("SELECT count(*) FROM console_session")) == 1


def test_a_refusal_keeps_the_signed_in_navigation(app_client: TestClient,
                                                  engine: Engine) -> None:
    make_user(engine, "jo")  # a co-ordinator: the users page is for administrators
    assert login(app_client, "jo").status_code == 303
    page = app_client.get("/admin/users")
    assert page.status_code == 403 and "You do not have permission" in page.text
    assert "Sign out" in page.text and 'aria-label="Console"' in page.text
    assert "Back to the dashboard" in page.text


def _error_text(page: str) -> str:
    import re

    found = re.search(r'class="error-summary"[^>]*>.*?<p>(.*?)</p>', page, re.S)
    assert found, "the sign-in page shows its error"
    return found.group(1).strip()


def test_a_new_password_unlocks_and_signs_out_everywhere(session: Session) -> None:
    user = accounts.add_user(session, login="jo", display_name="Jo", role="viewer",
                             password=PASSWORD, regions=["kent"], known_regions=["kent"])
    cookie = accounts.start_session(session, user, None)
    for _ in range(accounts.LOCK_AFTER):
        accounts.authenticate(session, "jo", "not the password at all")
    assert accounts.authenticate(session, "jo", PASSWORD).outcome == LoginOutcome.LOCKED
    with pytest.raises(AccountError, match="too short"):
        accounts.set_password(session, user, "x" * (accounts.MIN_PASSWORD - 1))
    accounts.set_password(session, user, "a new long passphrase")
    assert (user.failed_logins, user.locked_until) == (0, None)
    assert user.password_changed_at is not None
    assert accounts.session_user(session, cookie) is None
    assert accounts.authenticate(session, "jo", PASSWORD).outcome == LoginOutcome.BAD
    assert accounts.authenticate(session, "jo", "a new long passphrase").outcome == \
        LoginOutcome.OK


def test_a_revoked_token_stops_working_and_revoking_twice_says_so(session: Session) -> None:
    user = accounts.add_user(session, login="jo", display_name="Jo", role="coordinator",
                             password=PASSWORD, regions=["kent"], known_regions=["kent"])
    row, token = accounts.create_token(session, user, name="script")
    kept, other = accounts.create_token(session, user, name="other")
    assert accounts.revoke_token(session, row.prefix) is True
    assert row.revoked_at is not None and kept.revoked_at is None
    assert accounts.token_actor(session, token) is None
    assert accounts.token_actor(session, other) is not None
    assert accounts.revoke_token(session, row.prefix) is False
    with pytest.raises(AccountError, match="no token 'nope'"):
        accounts.revoke_token(session, "nope")


def test_enabling_an_account_again_does_not_bring_back_its_old_sessions_or_tokens(
        session: Session) -> None:
    user = accounts.add_user(session, login="jo", display_name="Jo", role="coordinator",
                             password=PASSWORD, regions=["kent"], known_regions=["kent"])
    earlier = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    old_row = accounts.create_token(session, user, name="old")[0]
    with time_machine.travel(earlier, tick=False):
        accounts.revoke_token(session, old_row.prefix)
    cookie = accounts.start_session(session, user, None)
    row, token = accounts.create_token(session, user, name="script")
    accounts.disable_user(session, user)
    assert accounts.enable_user(session, user) is True
    assert accounts.session_user(session, cookie) is None
    assert accounts.token_actor(session, token) is None and row.revoked_at is not None
    assert old_row.revoked_at == earlier  # revoked before: that date stands


def test_signing_in_prunes_the_sessions_that_have_ended(session: Session) -> None:
    users = [accounts.add_user(session, login=login, display_name=login, role="viewer",
                               password=PASSWORD, regions=["kent"], known_regions=["kent"])
             for login in ("jo", "al")]
    now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    accounts.start_session(session, users[0], None, now=now)
    accounts.start_session(session, users[1], None, now=now + timedelta(hours=1))
    # Eight hours on, the first has ended (session_user would refuse it) and goes; the
    # second, an hour younger, stays beside the new one.
    accounts.start_session(session, users[1], None, now=now + accounts.SESSION_LIFETIME)
    assert session.execute(text("SELECT count(*) FROM console_session")).scalar_one() == 2


def test_each_request_after_the_first_minute_moves_the_idle_hour_on(session: Session) -> None:
    user = accounts.add_user(session, login="jo", display_name="Jo", role="viewer",
                             password=PASSWORD, regions=["kent"], known_regions=["kent"])
    now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    cookie = accounts.start_session(session, user, None, now=now)
    seen = now + timedelta(seconds=61)
    assert accounts.session_user(session, cookie, now=seen) is user
    # idle since `seen`, not since sign-in: still on an hour after sign-in
    assert accounts.session_user(session, cookie, now=seen + timedelta(minutes=59)) is user


def test_an_api_token_lives_a_year_by_default_as_long_as_asked_or_for_ever(
        session: Session) -> None:
    user = accounts.add_user(session, login="jo", display_name="Jo", role="coordinator",
                             password=PASSWORD, regions=["kent"], known_regions=["kent"])
    made = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    with time_machine.travel(made, tick=False):
        yearly = accounts.create_token(session, user, name="nightly export")[1]
        monthly = accounts.create_token(session, user, name="trial", days=30)[1]
        lasting = accounts.create_token(session, user, name="kiosk", days=None)[1]
    for token, lifetime in ((yearly, timedelta(days=365)), (monthly, timedelta(days=30))):
        assert accounts.token_actor(session, token, now=made + lifetime - timedelta(minutes=1))
        assert accounts.token_actor(session, token, now=made + lifetime) is None
    assert accounts.token_actor(session, lasting, now=made + timedelta(days=3650)) is not None


def test_a_token_is_named_and_made_only_for_an_enabled_user(session: Session) -> None:
    user = accounts.add_user(session, login="jo", display_name="Jo", role="coordinator",
                             password=PASSWORD, regions=["kent"], known_regions=["kent"])
    blank, _ = accounts.create_token(session, user, name="   ")
    long, _ = accounts.create_token(session, user, name=" " + "n" * 150)
    assert (blank.name, long.name) == ("token", "n" * 100)
    token = accounts.create_token(session, user, name="script")[1]
    _label, prefix, secret = token.split("_", 2)
    # 48 bits to find the row, 256 to prove it: 12 hex digits and 43 URL-safe characters
    assert re.fullmatch(r"[0-9a-f]{12}", prefix) and re.fullmatch(r"[\w-]{43}", secret)
    accounts.disable_user(session, user)
    with pytest.raises(AccountError, match=r"^user 'jo' is disabled$"):
        accounts.create_token(session, user, name="after")


def test_a_coordinator_covers_only_their_own_regions() -> None:
    kent = accounts.Actor(1, "jo", "Jo", accounts.Role.COORDINATOR, ("kent",))
    both = accounts.Actor(2, "al", "Al", accounts.Role.COORDINATOR, ("kent", "essex"))
    admin = accounts.Actor(3, "ad", "Ad", accounts.Role.ADMIN, None)
    assert kent.covers(["kent"]) and kent.covers(["kent", "kent"])
    assert not kent.covers(["kent", "essex"]) and not kent.covers(["essex"])
    assert both.covers(["kent", "essex"])
    # an edition for no region goes to everyone: only one who covers every region may act
    assert not kent.covers([]) and not both.covers([]) and admin.covers([])
    assert admin.covers(["kent", "essex", "anywhere"])
