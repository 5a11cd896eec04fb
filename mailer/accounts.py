"""Co-ordinator accounts, console sessions and API tokens: the tables and every query on them.

Passwords are argon2id (argon2-cffi's RFC 9106 low-memory profile: 64 MiB, t=3, p=4, above the
OWASP floor). Console sessions and API tokens are random secrets of which only a SHA-256 is
stored: they carry 256 bits of entropy, so a slow hash would add nothing but latency, and a
copy of the database does not let anyone sign in. Disabling a user ends their sessions and
revokes their tokens in the same transaction.

The optional second factor is TOTP (RFC 6238: HMAC-SHA1, 30 s steps, 6 digits), implemented
here with the standard library; a code is accepted one step either side of now, and never twice.

An account made at its first sign-in with the force's directory (`directory_user`) carries the
directory's issuer and subject, and no usable password: it signs in only through the directory.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import re
import secrets
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from urllib.parse import quote

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    delete,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from mailer.errors import MailerError
from subscribers.db import Base, UTCDateTime, utcnow
from subscribers.errors import InvalidInput
from subscribers.models import _check_in
from subscribers.validation import normalise_name


class AccountError(MailerError):
    """A request about accounts that cannot be done as asked (unknown login, weak password...)."""


class Role(StrEnum):
    VIEWER = "viewer"  # reads figures, lists and progress in their regions; changes nothing
    COORDINATOR = "coordinator"  # manages subscribers and editions in their regions
    ADMIN = "admin"  # everything, every region, and the accounts themselves


RANK = {Role.VIEWER: 0, Role.COORDINATOR: 1, Role.ADMIN: 2}


class Permission(StrEnum):
    VIEW = "view"
    SUBSCRIBERS_EDIT = "subscribers.edit"
    SUBSCRIBERS_EXPORT = "subscribers.export"
    SUBSCRIBERS_IMPORT = "subscribers.import"
    SUBSCRIBERS_ERASE = "subscribers.erase"
    EDITIONS_EDIT = "editions.edit"
    EDITIONS_APPROVE = "editions.approve"
    EDITIONS_SEND = "editions.send"
    AUDIT_VIEW = "audit.view"
    USERS_MANAGE = "users.manage"
    PRIVACY_REPORT = "privacy.report"
    # Readers' replies are their own words, not figures: co-ordinators and admins, no viewer.
    REPLIES_VIEW = "replies.view"


# The privacy report counts every region's records at once, so it is not a region-scoped
# co-ordinator's to read.
_COORDINATOR = frozenset(Permission) - {Permission.USERS_MANAGE, Permission.PRIVACY_REPORT}
PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.VIEW}),
    Role.COORDINATOR: _COORDINATOR,
    Role.ADMIN: frozenset(Permission),
}

LOGIN_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,59}$")
MIN_PASSWORD = 12  # NCSC: length beats complexity rules; three random words pass easily
MAX_PASSWORD = 1024  # argon2 takes any length; this only stops a megabyte "password"
LOCK_AFTER = 5  # failed attempts in a row ...
LOCK_FOR = timedelta(minutes=15)  # ... lock the account this long (then it may try again)
SESSION_LIFETIME = timedelta(hours=8)  # one working shift, then sign in again
SESSION_IDLE = timedelta(hours=1)
TOTP_STEP = 30

HASHER = PasswordHasher()
# Stored in place of a hash for an account that signs in only through the directory: argon2
# cannot parse it, so no password ever matches it.
NO_PASSWORD = "!directory"  # noqa: S105 (a marker, not a secret)


@functools.cache
def _dummy_hash() -> str:
    """Verified when the login is unknown, so that the answer takes as long as for a real
    account. Made on first use: hashing at import cost every CLI command a quarter second."""
    return HASHER.hash(secrets.token_urlsafe(16))


class User(Base):
    __tablename__ = "console_user"
    __table_args__ = (CheckConstraint(_check_in("role", Role), name="role"),
                      Index("uq_console_user_directory", "directory_issuer",
                            "directory_subject", unique=True))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    login: Mapped[str] = mapped_column(String(60), unique=True)
    display_name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str | None] = mapped_column(String(254))  # where test sends go
    password_hash: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
    regions: Mapped[list[str]] = mapped_column(JSON, default=list)  # co-ordinators and viewers
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    totp_secret: Mapped[str | None] = mapped_column(String(64))
    totp_last_step: Mapped[int | None] = mapped_column(Integer)  # no code is accepted twice
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    password_changed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Made at a directory sign-in: the directory's issuer and its stable id for the person
    # (Entra's `oid`). Empty for a local account.
    directory_issuer: Mapped[str | None] = mapped_column(String(300))
    directory_subject: Mapped[str | None] = mapped_column(String(255))

    def __repr__(self) -> str:
        return f"<User {self.login} {self.role}>"


class ConsoleSession(Base):
    """A signed-in browser. Server-side, so signing out or disabling a user really ends it."""

    __tablename__ = "console_session"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("console_user.id", ondelete="CASCADE"),
                                         index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    ip: Mapped[str | None] = mapped_column(String(45))


class ApiToken(Base):
    """A credential for /api/v1: acts as its user, with at most the role it was given."""

    __tablename__ = "api_token"
    __table_args__ = (CheckConstraint(_check_in("role", Role), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)  # the public half, for lookup
    secret_sha256: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int] = mapped_column(ForeignKey("console_user.id", ondelete="CASCADE"),
                                         index=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


# ---------------------------------------------------------------- roles and scope

@dataclass(frozen=True)
class Actor:
    """Who is acting, with what role and over which regions (None: every region)."""

    user_id: int
    login: str
    name: str
    role: Role
    regions: tuple[str, ...] | None
    email: str | None = None

    def can(self, permission: Permission) -> bool:
        return permission in PERMISSIONS[self.role]

    def covers(self, regions: Iterable[str | None]) -> bool:
        """Whether every one of these regions is in scope. An edition with no regions goes to
        everyone, so only someone who covers every region may act on it."""
        if self.regions is None:
            return True
        wanted = list(regions)
        return bool(wanted) and all(r in self.regions for r in wanted)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.login})"


def actor_of(user: User, role: Role | None = None) -> Actor:
    effective = Role(user.role) if role is None else min(Role(user.role), role,
                                                         key=RANK.__getitem__)
    regions = None if Role(user.role) == Role.ADMIN else tuple(user.regions or ())
    return Actor(user.id, user.login, user.display_name, effective, regions, user.email)


# ---------------------------------------------------------------- users

def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password is too short: use at least {MIN_PASSWORD} characters",
                           hint="three random words make a strong, memorable password")
    if len(password) > MAX_PASSWORD:
        raise AccountError("the password is too long")


def _check_regions(role: Role, regions: Sequence[str], known: Iterable[str]) -> list[str]:
    known = set(known)
    unknown = [r for r in regions if r not in known]
    if unknown:
        raise AccountError(f"unknown region(s): {', '.join(unknown)}",
                           hint=f"regions: {', '.join(sorted(known))}")
    if role == Role.ADMIN:
        return []  # an administrator covers everything; a list would only mislead
    if not regions:
        raise AccountError(f"a {role} needs at least one region", hint="e.g. --region kent")
    return list(dict.fromkeys(regions))


def add_user(session: Session, *, login: str, display_name: str, role: Role | str,
             password: str, regions: Sequence[str] = (), known_regions: Iterable[str] = (),
             email: str | None = None) -> User:
    login = login.strip().lower()
    if not LOGIN_RE.match(login):
        raise AccountError(f"'{login}' cannot be a login",
                           hint="2-60 characters: lower-case letters, digits, '.', '_' or '-'")
    if session.scalar(select(User.id).where(User.login == login)) is not None:
        raise AccountError(f"there is already a user '{login}'")
    try:
        # A user's name comes in like a reader's: the same normal form, one home.
        name = normalise_name(" ".join(display_name.split()))
    except InvalidInput as exc:
        raise AccountError(str(exc)) from None
    if not name:
        raise AccountError("give the person's name (up to 100 characters)")
    role = Role(role)
    _check_password(password)
    user = User(login=login, display_name=name, role=role, email=(email or None),
                regions=_check_regions(role, regions, known_regions),
                password_hash=HASHER.hash(password), disabled=False, failed_logins=0)
    session.add(user)
    session.flush()
    return user


def change_user(session: Session, user: User, *, role: Role | str, regions: Sequence[str],
                known_regions: Iterable[str], display_name: str | None = None,
                email: str | None = None) -> list[str]:
    """A new role and regions (and name or address); returns the fields that changed. A
    change of role or regions signs the person out, so the next page they open is under
    the new rights."""
    role = Role(role)
    new: dict[str, object] = {"role": role,
                              "regions": _check_regions(role, regions, known_regions)}
    if display_name is not None:
        try:
            new["display_name"] = normalise_name(" ".join(display_name.split()))
        except InvalidInput as exc:
            raise AccountError(str(exc)) from None
        if not new["display_name"]:
            raise AccountError("give the person's name (up to 100 characters)")
    if email is not None:
        new["email"] = email.strip() or None
    changed = [name for name, value in new.items() if getattr(user, name) != value]
    for name in changed:
        setattr(user, name, new[name])
    if {"role", "regions"} & set(changed):
        session.execute(delete(ConsoleSession).where(ConsoleSession.user_id == user.id))
    session.flush()
    return changed


def directory_account(session: Session, issuer: str, subject: str) -> User | None:
    """The account made for this person at an earlier directory sign-in, if any."""
    return session.scalar(select(User).where(User.directory_issuer == issuer,
                                             User.directory_subject == subject))


def _free_login(session: Session, wanted: str) -> str:
    """A login for a new directory account: the part before the @ of the person's directory
    name, made to fit LOGIN_RE, with a number added when a local or earlier account has it
    (never a match to an existing account: that would hand it to whoever has the name)."""
    base = re.sub(r"[^a-z0-9._-]+", "-", wanted.split("@")[0].lower()).strip("-._")[:54]
    base = base if len(base) >= 2 else "user"
    taken = set(session.scalars(select(User.login).where(
        User.login.startswith(base, autoescape=True))))
    login, n = base, 1
    while login in taken:
        n += 1
        login = f"{base}-{n}"
    return login


def directory_user(session: Session, *, issuer: str, subject: str, username: str,
                   display_name: str, email: str | None, role: Role | str,
                   regions: Sequence[str], known_regions: Iterable[str]
                   ) -> tuple[User, list[str] | None]:
    """The account of a person the directory vouched for: made at their first sign-in
    (returns it with None), else brought to the role, regions, name and address the directory
    gives now (returns it with the fields that changed)."""
    try:
        name = (normalise_name(" ".join(display_name.split())) or "")[:100] or username[:100]
    except InvalidInput:
        name = username[:100]
    user = directory_account(session, issuer, subject)
    if user is None:
        role = Role(role)
        user = User(login=_free_login(session, username), display_name=name, role=role,
                    email=email or None, regions=_check_regions(role, regions, known_regions),
                    password_hash=NO_PASSWORD, disabled=False, failed_logins=0,
                    directory_issuer=issuer, directory_subject=subject)
        session.add(user)
        session.flush()
        return user, None
    changed = change_user(session, user, role=role, regions=regions, known_regions=known_regions,
                          display_name=name, email=email or "")
    return user, changed


def colleagues(session: Session, logins: Sequence[str] | None = None) -> list[User]:
    """Enabled accounts with an address, by name: whom a test copy may go to. With `logins`,
    exactly those, each of which must be such an account."""
    found = list(session.scalars(select(User).where(
        User.disabled.is_(False), User.email.is_not(None)).order_by(User.display_name)))
    if logins is None:
        return found
    by_login = {u.login: u for u in found}
    missing = [login for login in logins if login not in by_login]
    if missing:
        raise AccountError(f"no colleague with an address for test sends: {', '.join(missing)}",
                           hint="choose from the list; an administrator adds addresses")
    return [by_login[login] for login in dict.fromkeys(logins)]


def get_user(session: Session, login: str) -> User:
    user = session.scalar(select(User).where(User.login == login.strip().lower()))
    if user is None:
        raise AccountError(f"no user '{login}'", hint="`mailer users list` shows them")
    return user


def user_by_id(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


def list_users(session: Session) -> Sequence[User]:
    return session.scalars(select(User).order_by(User.login)).all()


def disable_user(session: Session, user: User) -> bool:
    """Stop a user signing in; ends their sessions and revokes their tokens now."""
    end_access(session, user)
    if user.disabled:
        return False
    user.disabled = True
    session.flush()
    return True


def enable_user(session: Session, user: User) -> bool:
    if not user.disabled:
        return False
    user.disabled, user.failed_logins, user.locked_until = False, 0, None
    session.flush()
    return True


def set_password(session: Session, user: User, password: str) -> None:
    """A new password; also unlocks the account and signs out every session."""
    _check_password(password)
    user.password_hash = HASHER.hash(password)
    user.password_changed_at = utcnow()
    user.failed_logins, user.locked_until = 0, None
    session.execute(delete(ConsoleSession).where(ConsoleSession.user_id == user.id))
    session.flush()


# ---------------------------------------------------------------- TOTP (RFC 6238)

def new_totp_secret() -> str:
    return base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=")


def _key(secret: str) -> bytes:
    return base64.b32decode(secret.upper() + "=" * (-len(secret) % 8))


def totp_code(secret: str, step: int) -> str:
    """The 6-digit code for one 30-second step (RFC 4226 dynamic truncation)."""
    digest = hmac.new(_key(secret), struct.pack(">Q", step), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    number = struct.unpack(">I", digest[offset:offset + 4])[0] & 0x7FFFFFFF
    return f"{number % 1_000_000:06d}"


def totp_step(now: datetime) -> int:
    return int(now.timestamp()) // TOTP_STEP


def totp_match(secret: str, code: str, now: datetime, last_step: int | None) -> int | None:
    """The step `code` belongs to (now, or one either side, for clock drift), if it is valid
    and later than the last one used: a code seen once (over a shoulder) is spent."""
    code = code.strip().replace(" ", "")
    if not (len(code) == 6 and code.isdigit()):
        return None
    current = totp_step(now)
    for step in (current - 1, current, current + 1):
        if (last_step is None or step > last_step) and hmac.compare_digest(
                totp_code(secret, step), code):
            return step
    return None


def totp_uri(user: User, issuer: str = "MSHT bulletin") -> str:
    assert user.totp_secret
    label = quote(f"{issuer}:{user.login}")
    return f"otpauth://totp/{label}?secret={user.totp_secret}&issuer={quote(issuer)}"


def enable_totp(session: Session, user: User) -> str:
    user.totp_secret = new_totp_secret()
    user.totp_last_step = None
    session.flush()
    return user.totp_secret


def disable_totp(session: Session, user: User) -> None:
    user.totp_secret, user.totp_last_step = None, None
    session.flush()


# ---------------------------------------------------------------- signing in

class LoginOutcome(StrEnum):
    OK = "ok"
    BAD = "bad"  # wrong login, password or code: the person is told only "not recognised"
    NEED_CODE = "need_code"  # right password; this account has a second factor
    LOCKED = "locked"
    DISABLED = "disabled"
    # With the directory configured, a local password is for break-glass accounts with a
    # second factor only: right password, no second factor on the account.
    NO_SECOND_FACTOR = "no_second_factor"
    NO_ROLE = "no_role"  # the directory vouched for the person, but gave no mapped role


@dataclass(frozen=True)
class LoginResult:
    outcome: LoginOutcome
    user: User | None = None


def authenticate(session: Session, login: str, password: str, code: str = "",
                 now: datetime | None = None, *,
                 second_factor_required: bool = False) -> LoginResult:
    """Check a sign-in; counts failures on the account and locks it after LOCK_AFTER. With
    `second_factor_required`, a right password on an account without a second factor is
    refused (NO_SECOND_FACTOR)."""
    now = now or utcnow()
    user = session.scalar(select(User).where(User.login == login.strip().lower()[:60]))
    if user is None:
        with contextlib.suppress(VerificationError):
            HASHER.verify(_dummy_hash(), password[:MAX_PASSWORD])
        return LoginResult(LoginOutcome.BAD)
    if user.locked_until is not None and user.locked_until > now:
        # Hashed all the same: an answer that came back sooner would tell a guesser which
        # logins exist (only a real account can be locked).
        with contextlib.suppress(VerificationError, InvalidHashError):
            HASHER.verify(user.password_hash, password[:MAX_PASSWORD])
        return LoginResult(LoginOutcome.LOCKED, user)
    try:
        HASHER.verify(user.password_hash, password[:MAX_PASSWORD])
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return LoginResult(_failed(session, user, now), user)
    if user.totp_secret:
        if not code.strip():
            return LoginResult(LoginOutcome.NEED_CODE, user)
        step = totp_match(user.totp_secret, code, now, user.totp_last_step)
        if step is None:
            return LoginResult(_failed(session, user, now), user)
        user.totp_last_step = step
    if user.disabled:  # checked after the password, so a guesser learns nothing from it
        return LoginResult(LoginOutcome.DISABLED, user)
    if second_factor_required and not user.totp_secret:
        return LoginResult(LoginOutcome.NO_SECOND_FACTOR, user)
    if HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = HASHER.hash(password)
    user.failed_logins, user.locked_until, user.last_login_at = 0, None, now
    session.flush()
    return LoginResult(LoginOutcome.OK, user)


def _failed(session: Session, user: User, now: datetime) -> LoginOutcome:
    user.failed_logins += 1
    if user.failed_logins >= LOCK_AFTER:
        user.locked_until = now + LOCK_FOR
        user.failed_logins = 0
        session.flush()
        return LoginOutcome.LOCKED
    session.flush()
    return LoginOutcome.BAD


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def start_session(session: Session, user: User, ip: str | None,
                  now: datetime | None = None) -> str:
    """A new console session; returns the cookie value (only its hash is stored)."""
    now = now or utcnow()
    token = secrets.token_urlsafe(32)
    session.add(ConsoleSession(token_sha256=_sha(token), user_id=user.id, created_at=now,
                               expires_at=now + SESSION_LIFETIME, last_seen_at=now,
                               ip=(ip or None) and ip[:45]))
    # Old sessions of anyone are pruned here rather than by a job: signing in is rare.
    session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at <= now))
    session.flush()
    return token


def session_user(session: Session, token: str | None,
                 now: datetime | None = None) -> User | None:
    """The user a session cookie belongs to, if the session is current; touches it."""
    if not token or len(token) > 100:
        return None
    now = now or utcnow()
    row = session.scalar(select(ConsoleSession).where(ConsoleSession.token_sha256 == _sha(token)))
    if row is None:
        return None
    if row.expires_at <= now or row.last_seen_at + SESSION_IDLE <= now:
        session.delete(row)
        session.flush()
        return None
    user = session.get(User, row.user_id)
    if user is None or user.disabled:
        return None
    if now - row.last_seen_at > timedelta(minutes=1):  # one write a minute, not per request
        row.last_seen_at = now
    return user


def end_access(session: Session, user: User) -> None:
    """End every console session of `user` and revoke their API tokens, now (the account is
    disabled, or the directory no longer gives them a role)."""
    session.execute(delete(ConsoleSession).where(ConsoleSession.user_id == user.id))
    session.execute(update(ApiToken).where(ApiToken.user_id == user.id,
                                           ApiToken.revoked_at.is_(None))
                    .values(revoked_at=utcnow()))


def end_session(session: Session, token: str | None) -> None:
    if token:
        session.execute(delete(ConsoleSession).where(ConsoleSession.token_sha256 == _sha(token)))


# ---------------------------------------------------------------- API tokens

TOKEN_PREFIX = "msht"  # noqa: S105 (a label, not a secret)


def create_token(session: Session, user: User, *, name: str, role: Role | str | None = None,
                 days: int | None = 365) -> tuple[ApiToken, str]:
    """A new API token for `user`, with at most the user's role. Returns (row, the token);
    the token is shown once and cannot be recovered later."""
    role = Role(role or user.role)
    if RANK[role] > RANK[Role(user.role)]:
        raise AccountError(f"a token cannot have more rights ({role}) than its user "
                           f"({user.role})")
    if user.disabled:
        raise AccountError(f"user '{user.login}' is disabled")
    prefix, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    row = ApiToken(prefix=prefix, secret_sha256=_sha(secret), user_id=user.id,
                   name=name.strip()[:100] or "token", role=role,
                   expires_at=utcnow() + timedelta(days=days) if days else None)
    session.add(row)
    session.flush()
    return row, f"{TOKEN_PREFIX}_{prefix}_{secret}"


def token_actor(session: Session, presented: str | None,
                now: datetime | None = None) -> Actor | None:
    """The actor an API token stands for, or None if it is unknown, expired or revoked."""
    if not presented or len(presented) > 200:
        return None
    parts = presented.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        return None
    now = now or utcnow()
    row = session.scalar(select(ApiToken).where(ApiToken.prefix == parts[1]))
    if row is None or not hmac.compare_digest(row.secret_sha256, _sha(parts[2])):
        return None
    if row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
        return None
    user = session.get(User, row.user_id)
    if user is None or user.disabled:
        return None
    if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=1):
        row.last_used_at = now
    return actor_of(user, Role(row.role))


def list_tokens(session: Session, user: User | None = None) -> Sequence[ApiToken]:
    query = select(ApiToken).order_by(ApiToken.id)
    if user is not None:
        query = query.where(ApiToken.user_id == user.id)
    return session.scalars(query).all()


def revoke_token(session: Session, prefix: str) -> bool:
    row = session.scalar(select(ApiToken).where(ApiToken.prefix == prefix))
    if row is None:
        raise AccountError(f"no token '{prefix}'")
    if row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    session.flush()
    return True
