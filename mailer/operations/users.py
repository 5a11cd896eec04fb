"""Console accounts and API tokens: signing in and out, adding, disabling and enabling
users, passwords, the second factor, tokens. Every change, every sign-in and every refusal is
in the audit log."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from mailer import accounts, audit, directory
from mailer.accounts import Actor, ApiToken, LoginOutcome, Permission, Role, User
from mailer.config import DirectoryGrant
from mailer.errors import NotAllowed, NotFound
from mailer.operations import Caller
from subscribers.db import utcnow

# ---------------------------------------------------------------- signing in

@dataclass(frozen=True)
class SignIn:
    outcome: LoginOutcome
    actor: Actor | None = None
    token: str | None = None  # the new console session's cookie value


def sign_in(session: Session, *, via: str, ip: str | None, login: str, password: str,
            code: str = "", previous: str | None = None,
            second_factor_required: bool = False) -> SignIn:
    """Check a sign-in and, when it succeeds, start a session (ending `previous`: signing in
    again never keeps an old session). Recorded whatever the outcome. With the directory
    configured, `second_factor_required`: the password is the break-glass way in, for
    accounts with a second factor only."""
    result = accounts.authenticate(session, login, password, code,
                                   second_factor_required=second_factor_required)
    user = result.user
    if result.outcome != LoginOutcome.OK or user is None:
        audit.record(session, actor=user.login if user else "(unknown)",
                     actor_name=user.display_name if user else None, via=via, ip=ip,
                     action=f"login.{result.outcome}")
        return SignIn(result.outcome)
    accounts.end_session(session, previous)
    token = accounts.start_session(session, user, ip)
    actor = accounts.actor_of(user)
    audit.record(session, actor=actor.login, actor_name=actor.name, via=via, ip=ip,
                 action="login.ok")
    return SignIn(LoginOutcome.OK, actor, token)


def directory_sign_in(session: Session, *, via: str, ip: str | None,
                      identity: directory.Identity, grants: dict[str, DirectoryGrant],
                      known_regions: Sequence[str], previous: str | None = None) -> SignIn:
    """A person the directory vouched for: refused when none of their app roles (or groups)
    is mapped to a console role (their sessions end and their API tokens are revoked), or when
    their account here was disabled; else their account is made (first sign-in) or brought up
    to date with the role and regions the directory gives now, and a session starts. Each step
    is recorded."""
    grant = directory.grant_for(grants, identity.values)
    user = accounts.directory_account(session, identity.issuer, identity.subject)
    who = user.login if user else (identity.username or identity.email or identity.subject)
    seen = {"method": "directory", "subject": identity.subject,
            "claims": list(identity.values)[:20]}
    if grant is None:
        if user is not None:
            accounts.end_access(session, user)
        audit.record(session, actor=who, actor_name=identity.name, via=via, ip=ip,
                     action=f"login.{LoginOutcome.NO_ROLE}", detail=seen)
        return SignIn(LoginOutcome.NO_ROLE)
    if user is not None and user.disabled:  # disabled here: the directory cannot undo that
        audit.record(session, actor=who, actor_name=identity.name, via=via, ip=ip,
                     action=f"login.{LoginOutcome.DISABLED}", detail=seen)
        return SignIn(LoginOutcome.DISABLED)
    user, changed = accounts.directory_user(
        session, issuer=identity.issuer, subject=identity.subject,
        username=identity.username or identity.email or identity.subject,
        display_name=identity.name, email=identity.email, role=grant.role,
        regions=grant.regions, known_regions=known_regions)
    actor = accounts.actor_of(user)
    given = {"role": str(user.role), "regions": list(user.regions or []),
             "via_directory": True}
    if changed is None:
        audit.record(session, actor=actor.login, actor_name=actor.name, via=via, ip=ip,
                     action="user.add", target=_target(user.login), detail=given)
    elif changed:
        audit.record(session, actor=actor.login, actor_name=actor.name, via=via, ip=ip,
                     action="user.change", target=_target(user.login),
                     detail={**given, "fields": changed})
    user.last_login_at = utcnow()
    accounts.end_session(session, previous)
    token = accounts.start_session(session, user, ip)
    audit.record(session, actor=actor.login, actor_name=actor.name, via=via, ip=ip,
                 action="login.ok", detail=seen)
    return SignIn(LoginOutcome.OK, actor, token)


def directory_refused(session: Session, *, via: str, ip: str | None,
                      refusal: directory.DirectoryRefusal) -> None:
    """A directory sign-in whose answer could not be trusted or used (a bad state, a token
    that failed its checks, the provider's own refusal such as a disabled person)."""
    audit.record(session, actor="(directory)", via=via, ip=ip,
                 action=f"login.directory_{refusal.reason}", detail={"said": str(refusal)[:300]})


def sign_in_refused(session: Session, *, via: str, ip: str | None, reason: str) -> None:
    """A sign-in turned away before any account was looked at (too many from one network)."""
    audit.record(session, actor="(unknown)", via=via, ip=ip, action=f"login.{reason}")


def session_actor(session: Session, token: str | None) -> Actor | None:
    """Who a console session cookie belongs to (it is kept alive by this), or None."""
    user = accounts.session_user(session, token)
    return None if user is None else accounts.actor_of(user)


def token_actor(session: Session, presented: str | None) -> Actor | None:
    """Who an API token acts as, with at most its role, or None."""
    return accounts.token_actor(session, presented)


def sign_out(session: Session, caller: Caller, token: str | None) -> None:
    accounts.end_session(session, token)
    caller.record(session, "logout")


# ---------------------------------------------------------------- accounts

def _target(login: str) -> str:
    return f"user:{login}"


def listing(session: Session, caller: Caller) -> Sequence[User]:
    caller.require(Permission.USERS_MANAGE)
    return accounts.list_users(session)


def colleagues(session: Session, caller: Caller) -> list[tuple[str, str]]:
    """(login, name) of the colleagues a test copy may go to, the caller left out."""
    caller.require(Permission.EDITIONS_EDIT)
    return [(u.login, u.display_name) for u in accounts.colleagues(session)
            if u.login != caller.actor.login]


def get(session: Session, caller: Caller, login: str) -> User:
    caller.require(Permission.USERS_MANAGE)
    try:
        return accounts.get_user(session, login)
    except accounts.AccountError:
        raise NotFound(f"no user '{login[:60]}'") from None


def add(session: Session, caller: Caller, *, login: str, name: str, role: Role,
        regions: Sequence[str], known_regions: Sequence[str], password: str,
        email: str | None = None) -> User:
    caller.require(Permission.USERS_MANAGE)
    user = accounts.add_user(session, login=login, display_name=name, role=role,
                             password=password, regions=list(regions),
                             known_regions=known_regions, email=email)
    caller.record(session, "user.add", _target(user.login), role=str(role),
                  regions=list(user.regions or []))
    return user


def _not_yourself(caller: Caller, user: User, what: str) -> None:
    # An administrator who disables or demotes themselves could leave nobody to undo it.
    if user.id == caller.actor.user_id:
        raise NotAllowed(f"you cannot {what} your own account",
                         hint="ask another administrator to do it")


def change(session: Session, caller: Caller, login: str, *, role: Role,
           regions: Sequence[str], known_regions: Sequence[str], name: str | None = None,
           email: str | None = None) -> list[str]:
    """A user's role, regions, name or address; returns what changed (recorded, with the new
    role and regions)."""
    caller.require(Permission.USERS_MANAGE)
    user = accounts.get_user(session, login)
    if Role(role) != user.role or list(regions) != list(user.regions or []):
        _not_yourself(caller, user, "change the role or regions of")
    changed = accounts.change_user(session, user, role=role, regions=regions,
                                   known_regions=known_regions, display_name=name, email=email)
    if changed:
        caller.record(session, "user.change", _target(user.login), fields=changed,
                      role=str(user.role), regions=list(user.regions or []))
    return changed


def set_disabled(session: Session, caller: Caller, login: str, disabled: bool) -> bool:
    """Disable (ending their sessions and revoking their tokens at once) or enable a user."""
    caller.require(Permission.USERS_MANAGE)
    user = accounts.get_user(session, login)
    if disabled:
        _not_yourself(caller, user, "disable")
    changed = (accounts.disable_user if disabled else accounts.enable_user)(session, user)
    if changed or disabled:  # disabling again still ends sessions: worth its record
        caller.record(session, "user.disable" if disabled else "user.enable",
                      _target(user.login))
    return changed


def reset_password(session: Session, caller: Caller, login: str, password: str) -> None:
    caller.require(Permission.USERS_MANAGE)
    user = accounts.get_user(session, login)
    accounts.set_password(session, user, password)
    caller.record(session, "user.reset_password", _target(user.login))


def second_factor(session: Session, caller: Caller, login: str, on: bool
                  ) -> tuple[str, str] | None:
    """Turn the authenticator-app factor on (returns its secret and enrolment URI) or off."""
    caller.require(Permission.USERS_MANAGE)
    user = accounts.get_user(session, login)
    if not on:
        accounts.disable_totp(session, user)
        caller.record(session, "user.totp_off", _target(user.login))
        return None
    secret = accounts.enable_totp(session, user)
    caller.record(session, "user.totp_on", _target(user.login))
    return secret, accounts.totp_uri(user)


def create_token(session: Session, caller: Caller, login: str, *, name: str,
                 role: Role | None, days: int) -> tuple[ApiToken, str]:
    """An API token for /api/v1 (shown once; only its hash is kept)."""
    caller.require(Permission.USERS_MANAGE)
    user = accounts.get_user(session, login)
    row, plain = accounts.create_token(session, user, name=name, role=role, days=days)
    caller.record(session, "token.create", _target(user.login), prefix=row.prefix,
                  role=row.role)
    return row, plain


def revoke_token(session: Session, caller: Caller, prefix: str) -> bool:
    caller.require(Permission.USERS_MANAGE)
    changed = accounts.revoke_token(session, prefix)
    if changed:
        caller.record(session, "token.revoke", f"token:{prefix}")
    return changed
