"""Sign-in with the force's directory: OpenID Connect, as Microsoft Entra ID offers it.

The map, in three steps:
- `start`: the console sends the browser to the provider's authorization endpoint (found by
  discovery at `<issuer>/.well-known/openid-configuration`), authorization code flow with PKCE
  (S256), a random `state` and a random `nonce`. The three secrets travel in a signed,
  short-lived cookie (`seal` / `unseal`), never in the database.
- `finish`: the provider sends the browser back with a code; the state must match, the code is
  swapped for tokens at the token endpoint (with the PKCE verifier and the client secret),
  and the ID token is checked: its signature against the provider's published keys (JWKS), its
  issuer, its audience (our client id), its expiry and its nonce. Any failure is a
  `DirectoryRefusal` with a short reason for the audit log.
- `grant_for`: the token's app roles (the `roles` claim; or `groups`, by setting) are mapped to
  a console role and regions by `Settings.oidc_roles`; no mapped value, no access.

Who a person is: the `oid` claim when present (Entra's stable object id: an address or display
name may change, `oid` does not), else `sub`, always together with the issuer.

The OAuth and OpenID Connect work is Authlib's (its httpx client builds the authorization URL
with PKCE and swaps the code; its `CodeIDToken` checks the claims of an OpenID Connect ID
token, with `joserfc`, Authlib's own JOSE library, checking the signature). No database here:
`mailer.accounts` keeps the accounts and `mailer.operations.users` decides and records.
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from itsdangerous import BadSignature, URLSafeTimedSerializer

from mailer.config import DirectoryGrant, Settings
from mailer.errors import MailerError

if TYPE_CHECKING:
    import httpx
    from authlib.integrations.httpx_client import OAuth2Client

CALLBACK_PATH = "/admin/login/directory/callback"
SCOPE = "openid profile email"
PENDING_SECONDS = 600  # the time a person has at the provider's sign-in page
TIMEOUT_SECONDS = 10.0
LEEWAY_SECONDS = 60  # clock difference allowed between the provider and us
# Asymmetric algorithms only: an HS256 token "signed" with our own client secret, or "none",
# must never pass for the provider's word.
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
RANK = {"viewer": 0, "coordinator": 1, "admin": 2}


class DirectoryRefusal(MailerError):
    """The provider's answer could not be trusted or used; `reason` is recorded in the audit log
    (state, provider_error, token, id_token, unreachable)."""

    def __init__(self, message: str, reason: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason


@dataclass(frozen=True)
class Pending:
    """What the console remembers between sending the browser away and its return."""

    state: str
    nonce: str
    verifier: str
    next_path: str


@dataclass(frozen=True)
class Identity:
    """A person as the directory vouched for them, from a checked ID token."""

    issuer: str
    subject: str
    name: str
    username: str | None
    email: str | None
    values: tuple[str, ...]  # the app roles (or groups) the token carries


def enabled(settings: Settings) -> bool:
    return bool(settings.oidc_issuer and settings.oidc_client_id)


def redirect_uri(settings: Settings) -> str:
    return settings.base_url + CALLBACK_PATH


def _serializer(settings: Settings) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(settings.secret(), salt="mailer.directory.pending")


def seal(settings: Settings, pending: Pending) -> str:
    return _serializer(settings).dumps([pending.state, pending.nonce, pending.verifier,
                                        pending.next_path])


def unseal(settings: Settings, value: str | None) -> Pending | None:
    if not value or len(value) > 2000:
        return None
    try:
        state, nonce, verifier, next_path = _serializer(settings).loads(
            value, max_age=PENDING_SECONDS)
    except (BadSignature, ValueError, TypeError):
        return None
    return Pending(str(state), str(nonce), str(verifier), str(next_path))


# Authlib, joserfc and httpx are imported at a sign-in, not with this module: the command line
# imports it (through mailer.operations) and would otherwise load them, a tenth of a second,
# for every command.

def _client(settings: Settings, meta: dict[str, Any]) -> OAuth2Client:
    with warnings.catch_warnings():
        # Authlib 1.9 announces its move to httpx2 when this is imported; we pin authlib<2.
        warnings.simplefilter("ignore", DeprecationWarning)
        from authlib.integrations.httpx_client import OAuth2Client

    secret = settings.oidc_client_secret
    # HTTP Basic unless the provider says it takes the secret only in the form (both are
    # RFC 6749's; Entra ID takes either).
    offered = meta.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
    method = ("client_secret_post" if "client_secret_basic" not in offered
              and "client_secret_post" in offered else "client_secret_basic")
    return OAuth2Client(client_id=settings.oidc_client_id,
                        client_secret=secret.get_secret_value() if secret else None,
                        scope=SCOPE, redirect_uri=redirect_uri(settings),
                        code_challenge_method="S256", token_endpoint_auth_method=method,
                        timeout=TIMEOUT_SECONDS)


def _get_json(client: httpx.Client, url: str, what: str) -> dict[str, Any]:
    import httpx

    try:
        response = client.get(url)
        response.raise_for_status()
        data = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise DirectoryRefusal(f"the directory's {what} could not be read ({exc})",
                               "unreachable",
                               hint="try again in a minute; if it goes on, tell an "
                                    "administrator") from None
    if not isinstance(data, dict):
        raise DirectoryRefusal(f"the directory's {what} is not a JSON object", "unreachable")
    return data


def discover(settings: Settings) -> dict[str, Any]:
    """The provider's metadata. Read at each sign-in (they are rare), so a change of keys or
    endpoints at the provider needs no restart here."""
    import httpx

    issuer = settings.oidc_issuer.rstrip("/")
    with httpx.Client(timeout=TIMEOUT_SECONDS) as client:
        meta = _get_json(client, f"{issuer}/.well-known/openid-configuration", "configuration")
    if meta.get("issuer") != settings.oidc_issuer:
        raise DirectoryRefusal(f"the directory calls itself {meta.get('issuer')!r}, not "
                               f"{settings.oidc_issuer!r}", "unreachable",
                               hint="check MAILER_OIDC_ISSUER: it must be the issuer exactly")
    return meta


def start(settings: Settings, next_path: str) -> tuple[str, Pending]:
    """The provider's URL to send the browser to, and what to remember until it returns."""
    meta = discover(settings)
    # RFC 7636's verifier: 43 to 128 unreserved characters (token_urlsafe's are)
    pending = Pending(state=secrets.token_urlsafe(24), nonce=secrets.token_urlsafe(24),
                      verifier=secrets.token_urlsafe(48), next_path=next_path)
    with _client(settings, meta) as client:
        url, _ = client.create_authorization_url(
            meta["authorization_endpoint"], state=pending.state, nonce=pending.nonce,
            code_verifier=pending.verifier)
    return url, pending


def finish(settings: Settings, pending: Pending | None, params: dict[str, str]) -> Identity:
    """Check the provider's answer (the callback's query) and return the person it vouches for.
    Raises `DirectoryRefusal` for anything untrustworthy."""
    if pending is None or not params.get("state") or params["state"] != pending.state:
        raise DirectoryRefusal("the sign-in did not start here, or took too long", "state",
                               hint="start again from the console's sign-in page")
    if params.get("error"):
        described = params.get("error_description") or params["error"]
        raise DirectoryRefusal(f"the directory refused the sign-in: {described[:200]}",
                               "provider_error")
    if not params.get("code"):
        raise DirectoryRefusal("the directory sent no code", "provider_error")
    meta = discover(settings)
    with _client(settings, meta) as client:
        try:
            token = client.fetch_token(meta["token_endpoint"], code=params["code"],
                                       code_verifier=pending.verifier)
        except Exception as exc:  # Authlib raises OAuthError or httpx's errors
            raise DirectoryRefusal(f"the code could not be exchanged ({exc})"[:300],
                                   "token") from None
        jwks = _get_json(client, meta["jwks_uri"], "keys")
    return _identity(settings, token, pending.nonce, jwks)


def _identity(settings: Settings, token: dict[str, Any], nonce: str,
              jwks: dict[str, Any]) -> Identity:
    from authlib.oidc.core import CodeIDToken
    from joserfc import jwt
    from joserfc.errors import JoseError
    from joserfc.jwk import KeySet
    from joserfc.jws import JWSRegistry

    id_token = token.get("id_token")
    if not isinstance(id_token, str):
        raise DirectoryRefusal("the directory sent no ID token", "id_token")
    try:
        decoded = jwt.decode(id_token, KeySet.import_key_set(jwks),  # type: ignore[arg-type]
                             registry=JWSRegistry(algorithms=ALGORITHMS))
        claims = CodeIDToken(
            decoded.claims, decoded.header,
            {"iss": {"essential": True, "value": settings.oidc_issuer},
             "aud": {"essential": True, "value": settings.oidc_client_id},
             "sub": {"essential": True}, "exp": {"essential": True}},
            {"nonce": nonce, "client_id": settings.oidc_client_id,
             "access_token": token.get("access_token")})
        claims.validate(leeway=LEEWAY_SECONDS)
    except (JoseError, ValueError) as exc:
        raise DirectoryRefusal(f"the ID token was not valid ({exc})"[:300], "id_token") from None
    if settings.oidc_claim == "groups" and "groups" in (claims.get("_claim_names") or {}):
        # Entra's "overage": past about 200 groups the token names a Graph call instead of
        # the groups. Said plainly rather than refused as "no role".
        raise DirectoryRefusal("the directory left your groups out of the token (you are in "
                               "too many groups for it to list)", "groups_overage",
                               hint="ask the directory's administrator to give you the "
                                    "console's app role instead (MAILER_OIDC_CLAIM=roles)")
    values = claims.get(settings.oidc_claim) or []
    if not isinstance(values, list):
        values = [values]
    subject = claims.get("oid") or claims["sub"]
    username = claims.get("preferred_username") or None
    email = claims.get("email") or None
    return Identity(issuer=str(claims["iss"]), subject=str(subject),
                    name=str(claims.get("name") or username or email or subject),
                    username=str(username) if username else None,
                    email=str(email) if email else None,
                    values=tuple(str(v) for v in values))


def grant_for(mapping: dict[str, DirectoryGrant], values: tuple[str, ...]
              ) -> DirectoryGrant | None:
    """The role and regions the claim values give: the highest role among the mapped values,
    with the regions of the values that carry that role (an administrator has none). None when
    no value is mapped."""
    grants = [mapping[v] for v in values if v in mapping]
    if not grants:
        return None
    top = max(grants, key=lambda g: RANK[g.role]).role
    if top == "admin":
        return DirectoryGrant(role="admin", regions=[])
    regions = [r for g in grants if g.role == top for r in g.regions]
    return DirectoryGrant(role=top, regions=list(dict.fromkeys(regions)))
