"""Settings: `MAILER_*` environment variables over an optional TOML file over the defaults.

The defaults are the embedded setup: SQLite under `var/`, the web app on 127.0.0.1:8000, mail
to the dev sink. Secrets are never defaults: when none is configured, a random one is generated
on first use into `var/` with mode 0600 and reused from there.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from mailer.errors import ConfigError
from mailer.marking import SECURE_DOMAINS, ArchiveVisibility, Classification
from subscribers.rules import DEFAULT_ORGANISATION_TYPES, DEFAULT_REGIONS, DEFAULT_ROLES, Rules

CONFIG_ENV = "MAILER_CONFIG"
DEFAULT_CONFIG_FILE = "mailer.toml"


def config_file() -> Path:
    return Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG_FILE))


class DirectoryGrant(BaseModel):
    """What one app role (or group) of the directory gives in the console."""

    model_config = {"extra": "forbid", "frozen": True}

    role: Literal["viewer", "coordinator", "admin"]
    regions: list[str] = Field(default_factory=list)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAILER_", extra="forbid",
                                      validate_default=True)

    var_dir: Path = Field(Path("var"), description="Where the embedded setup keeps its files")
    database_url: str = Field("", description="SQLAlchemy URL; default SQLite in var_dir")
    base_url: str = Field("http://127.0.0.1:8000", description="Absolute URL of the web app")
    secret_key: SecretStr | None = Field(None, description="Signs tokens; generated if unset")
    suppression_key: SecretStr | None = Field(
        None, description="Keys the HMAC of suppressed addresses; generated if unset")

    smtp_url: SecretStr = Field(SecretStr("smtp://127.0.0.1:8025?tls=none"),
                                description="smtp://user:pass@host:port?tls=starttls|ssl|none")
    from_address: str = Field("msht-bulletin@example.org", description="The From address")
    from_name: str = Field("Kent & Essex MSHT Co-ordinators", description="The From name")
    contact_address: str = Field("msht-bulletin@example.org",
                                 description="Where readers write to; shown in every footer")
    list_id: str = Field("msht-bulletin.example.org", description="The RFC 2919 List-Id")
    # Named as a publication will carry it (issue 15): until publications exist, the one
    # publication is these settings.
    reply_to: str = Field("", description="The Reply-To of everything sent to readers; empty: "
                                          "the contact address")
    reader_reply_retention_days: int = Field(
        90, ge=1, description="Days a reader's reply to the bounce address is kept (and "
                              "listed on the console) after it was forwarded")

    allow_smtputf8: bool = Field(False, description="Accept non-ASCII local parts")
    check_deliverability: bool = Field(False, description="Look up MX records at sign-up")
    regions: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_REGIONS))
    organisation_types: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_ORGANISATION_TYPES))
    roles: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_ROLES))
    trusted_domains: list[str] = Field(
        default_factory=lambda: ["police.uk", "gov.uk", "nhs.net", "nhs.uk"],
        description="Sign-ups from these domains need no co-ordinator approval")
    # Named as a publication's settings will be, so one can supply them later.
    default_classification: Classification = Field(
        Classification.OFFICIAL, description="An edition's protective marking when its front "
                                             "matter names none: OFFICIAL or OFFICIAL-SENSITIVE")
    default_archive: ArchiveVisibility = Field(
        ArchiveVisibility.PUBLIC, description="An edition's archive visibility when its front "
                                              "matter names none: public, subscribers or none")
    secure_domains: list[str] = Field(
        default_factory=lambda: list(SECURE_DOMAINS),
        description="OFFICIAL-SENSITIVE goes only to these domains and their subdomains")

    rate_per_minute: int = Field(30, ge=0, description="Messages a minute; 0 means no limit")
    rate_per_day: int = Field(10_000, ge=0, description="Messages a rolling 24 h; 0: no limit")
    retry_base_seconds: int = Field(60, ge=1)
    retry_cap_seconds: int = Field(1800, ge=1)
    retry_give_up_hours: int = Field(48, ge=1)
    require_approval: bool = Field(
        True, description="An edition needs a second co-ordinator's approval before it is sent")
    bounce_address: str = Field(
        "", description="Envelope sender for list mail; with verp, bounces+REF@ its domain")
    verp: bool = Field(True, description="Give each delivery its own return path (VERP)")
    smtp_connections: int = Field(4, ge=1, le=64, description="SMTP sessions per worker")
    smtp_max_per_connection: int = Field(100, ge=1, description="Messages before reconnecting")
    smtp_timeout_seconds: float = Field(60.0, gt=0, description="Longest wait for one SMTP step")
    lease_seconds: int = Field(300, ge=5, description="How long a claimed delivery is held")
    unknown_resends: int = Field(
        1, ge=0, description="Resends (same Message-ID) when no reply came after the final dot")

    # ---- bounces and complaints (issue 8): the policy `mailer.bounce_policy` applies
    bounce_hard_threshold: int = Field(
        1, ge=1, description="Hard bounces (dead address: 5.1.x, 5.2.1, 5.4.4) that suppress")
    bounce_soft_threshold: int = Field(
        3, ge=1, description="Soft bounces (one counted a day) that disable an address ...")
    bounce_soft_min_sends: int = Field(2, ge=1, description="... across at least this many sends")
    bounce_soft_window_days: int = Field(90, ge=1, description="... within this many days")
    bounce_count_delays: bool = Field(
        False, description="Count 'delayed' notices as soft bounces (the mail may still arrive)")
    bounce_policy_rejections_suppress: bool = Field(
        False, description="Treat 5.7.x policy rejections as hard bounces; off because they "
                           "usually mean our own SPF/DKIM/DMARC is broken (an alert instead)")
    bounce_domain_alert_ratio: float = Field(
        0.5, gt=0, le=1, description="When more than this share of one send's recipients at a "
                                     "domain bounce, alert instead of disabling them")
    bounce_domain_alert_min_recipients: int = Field(
        5, ge=1, description="Smallest number of a send's recipients at a domain to alert on")
    bounce_hold_minutes: int = Field(
        60, ge=0, description="How long a bounce waits before it is acted on, so a burst from "
                              "one domain is seen whole and raises one alert")
    bounce_match_by_address: bool = Field(
        False, description="Act on bounces without our signed reference by matching the "
                           "address; off because anyone can forge such a bounce")
    bounce_raw_retention_days: int = Field(
        90, ge=1, description="Days each inbound message is kept raw")
    bounce_record_retention_days: int = Field(
        400, ge=1, description="Days the decisions and bounce events are kept (at least the "
                               "soft window)")

    # ---- retention (issue 17): the scheduler's daily purge, `mailer.retention`
    retention_unconfirmed_days: int = Field(
        30, description="Days an unconfirmed sign-up is kept after it was last asked for; "
                        "then deleted, with nothing kept")
    retention_left_months: int = Field(
        12, description="Months a person who left (unsubscribed, bounced, complained) is kept; "
                        "then erased to the keyed hash on the suppression list")
    retention_replies_months: int = Field(
        3, description="Months a delivery keeps the relay's reply (it can quote the address); "
                       "the delivery row and its status stay for the counts")
    retention_audit_years: int = Field(
        6, description="Years the audit log is kept; older entries are deleted")

    timezone: str = Field("Europe/London", description="The time zone people see")

    # ---- web (issue 5)
    previous_secret_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Retired token keys, oldest first: links signed with them keep working")
    consent_version: str = Field("2026-12", description="Version of the sign-up consent wording")
    consent_wording: str = Field(
        "I agree to receive the Kent & Essex modern slavery and human trafficking newsletter "
        "and the reminders I chose, sent by the MSHT co-ordinators of Kent Police and Essex "
        "Police. I can unsubscribe at any time from a link in every email.",
        description="The sign-up consent text; change consent_version whenever it changes")
    confirm_link_days: int = Field(7, ge=1, description="How long a confirmation link works")
    manage_link_days: int = Field(180, ge=1, description="How long a preferences link works")
    view_link_days: int = Field(
        730, ge=1, description="How long a reader's signed 'view in your browser' link to an "
                               "edition not in the public archive works")
    unsubscribe_link_years: int = Field(10, ge=3, description="How long unsubscribe links work")

    # ---- yearly reconfirmation (issue 17): `mailer.reconfirm`
    reconfirm_after_days: int = Field(
        365, ge=1, description="Days after confirming (or the last yes) a reader is asked "
                               "whether they still work with MSHT")
    reconfirm_answer_days: int = Field(
        30, ge=1, description="Days a reader has to answer before their mail stops (lapsed)")
    reconfirm_spread_days: int = Field(
        14, ge=1, description="Days the requests due are spread over: at most 1/N of them "
                              "(rounded up) are asked a day")
    reconfirm_link_days: int = Field(
        180, ge=1, description="How long the 'yes' link in a request works (answering after "
                               "lapsing brings a reader back)")
    signup_mails_per_day: int = Field(1, ge=1, description="Sign-up mails an address may get/24h")
    signup_mails_per_month: int = Field(3, ge=1, description="... and per 30 days")
    mails_per_network_day: int = Field(
        20, ge=1, description="Mails the web may send a day for requests from one /24 (or /56)")
    posts_per_network_hour: int = Field(
        60, ge=1, description="Form posts an hour from one /24 (IPv4) or /56 (IPv6) network")
    max_request_bytes: int = Field(16_384, ge=1024, description="Largest request body accepted")
    archive_dir: Path | None = Field(
        None, description="Published edition sources for /archive; default var_dir/archive")
    media_dir: Path | None = Field(
        None, description="Images for editions, served at /media/; default var_dir/media")

    # ---- operations (issue 16): backups, metrics, logs
    backup_key_file: Path | None = Field(
        None, description="The key that seals backups (`mailer backup keygen` writes one); "
                          "keep a copy away from the database's disk")
    backup_dir: Path | None = Field(
        None, description="Where the scheduler writes its backups; default var_dir/backups")
    backup_every_hours: int = Field(
        24, ge=0, description="The scheduler backs up this often when a key is set; 0: never")
    backup_keep: int = Field(14, ge=1, description="Scheduled backups kept; older are deleted")
    backup_pg_bin_dir: Path | None = Field(
        None, description="Where pg_dump and pg_restore are, when not in "
                          "/usr/lib/postgresql/<server major>/bin or on PATH")
    metrics_token: SecretStr | None = Field(
        None, description="Bearer token for /metrics; unset, /metrics answers 404")
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object a line, for log collectors")

    # ---- DKIM and the deployment doctor (issue 16)
    dkim_key_file: Path | None = Field(
        None, description="The current DKIM private key (PEM; `mailer dkim keygen`); unset: "
                          "no DKIM signature")
    dkim_selector: str = Field("", description="The current key's selector (DNS name part)")
    dkim_domain: str = Field("", description="d=: the signing domain; default From's domain")
    dkim_extra_keys: list[str] = Field(
        default_factory=list,
        description="More keys signing beside it, as selector=path: the next key during a "
                    "rotation, or an Ed25519 key for an RFC 8463 co-signature")
    dkim_sign_processes: int | None = Field(
        None, ge=0, le=64, description="Processes the worker signs in beside its SMTP loop; "
                                       "default one per CPU, 0 signs in the loop")
    dns_nameservers: list[str] = Field(
        default_factory=list,
        description="DNS servers `mailer doctor` asks (host or host:port); default the system's")
    relay_sending_ips: list[str] = Field(
        default_factory=list,
        description="Addresses the relay sends from, for the SPF check; default the relay "
                    "host's own addresses")

    # ---- sign-in with the force's directory (issue 18): `mailer.directory`
    oidc_issuer: str = Field(
        "", description="The OpenID Connect issuer, exactly, e.g. "
                        "https://login.microsoftonline.com/<tenant-id>/v2.0; empty: no "
                        "directory sign-in")
    oidc_client_id: str = Field("", description="The application (client) id registered there")
    oidc_client_secret: SecretStr | None = Field(None, description="Its client secret")
    oidc_claim: Literal["roles", "groups"] = Field(
        "roles", description="The ID token claim mapped by oidc_roles: app roles (advised) "
                             "or group object ids")
    oidc_roles: dict[str, DirectoryGrant] = Field(
        default_factory=dict,
        description='Claim value -> console role and regions, e.g. {"MSHT.Kent": {"role": '
                    '"coordinator", "regions": ["kent"]}}; a person with no mapped value is '
                    "refused")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings,
                TomlConfigSettingsSource(settings_cls, toml_file=config_file()))

    @field_validator("base_url")
    @classmethod
    def _absolute_http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an absolute http(s) URL such as https://news.example.org")
        return value.rstrip("/")

    @field_validator("retention_unconfirmed_days", "retention_left_months",
                     "retention_replies_months", "retention_audit_years")
    @classmethod
    def _positive_period(cls, value: int) -> int:
        # Said in words rather than as pydantic's "greater than or equal to 1": a zero here
        # would make the next purge delete everything of its kind at once.
        if value < 1:
            raise ValueError("a retention period must be 1 or more; zero or less would "
                             "delete every record of its kind at the next purge")
        return value

    @field_validator("reconfirm_link_days")
    @classmethod
    def _link_outlives_the_window(cls, value: int, info: ValidationInfo) -> int:
        window = info.data.get("reconfirm_answer_days")
        if window is not None and value < window:
            raise ValueError(f"the 'yes' link must work at least as long as the answer window "
                             f"(reconfirm_answer_days, {window}), or readers could not answer "
                             "in time")
        return value

    @model_validator(mode="after")
    def _directory_grants_name_known_regions(self) -> Settings:
        for value, grant in self.oidc_roles.items():
            unknown = [r for r in grant.regions if r not in self.regions]
            if unknown:
                raise ValueError(f"oidc_roles[{value!r}] names unknown region(s) "
                                 f"{', '.join(unknown)}; regions: {', '.join(self.regions)}")
            if grant.role != "admin" and not grant.regions:
                raise ValueError(f"oidc_roles[{value!r}]: a {grant.role} needs at least one "
                                 "region")
        if self.oidc_issuer and not self.oidc_client_id:
            raise ValueError("oidc_issuer is set without oidc_client_id")
        return self

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.var_dir / 'mailer.db'}"

    @property
    def dkim_signing_domain(self) -> str:
        return (self.dkim_domain or self.from_address.rpartition("@")[2]).lower()

    @property
    def reply_address(self) -> str:
        """Where a reader's reply goes: what a publication will supply, today the settings."""
        return (self.reply_to or self.contact_address).strip()

    @property
    def backups(self) -> Path:
        return self.backup_dir or self.var_dir / "backups"

    def secret(self) -> bytes:
        return self._key("secret_key", self.secret_key)

    def token_keys(self) -> list[bytes]:
        """Every key that verifies tokens, oldest first; the last (the current one) signs."""
        return [k.get_secret_value().encode() for k in self.previous_secret_keys] + [self.secret()]

    def suppression_secret(self) -> bytes:
        return self._key("suppression_key", self.suppression_key)

    def _key(self, name: str, configured: SecretStr | None) -> bytes:
        if configured is not None:
            value = configured.get_secret_value()
            if len(value) < 32:
                raise ConfigError(f"MAILER_{name.upper()} is too short",
                                  hint="use at least 32 random characters")
            return value.encode()
        path = self.var_dir / name
        try:
            return path.read_text().strip().encode()
        except FileNotFoundError:
            pass
        self.var_dir.mkdir(parents=True, exist_ok=True)
        value = secrets.token_urlsafe(48)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process generated it first: use theirs
            return path.read_text().strip().encode()
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")
        return value.encode()

    def rules(self) -> Rules:
        return Rules(
            suppression_key=self.suppression_secret(),
            regions=dict(self.regions),
            organisation_types=dict(self.organisation_types),
            roles=dict(self.roles),
            allow_smtputf8=self.allow_smtputf8,
            check_deliverability=self.check_deliverability,
            trusted_domains=tuple(d.lower() for d in self.trusted_domains),
        )

    def shown(self) -> dict[str, Any]:
        """The effective settings with every secret masked, for `mailer config show`."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = mask_url(value.get_secret_value()) if name.endswith("_url") else "********"
            elif name == "database_url":
                value = mask_url(self.database)
            elif isinstance(value, Path):
                value = str(value)
            elif name == "oidc_roles":
                value = {k: grant.model_dump() for k, grant in value.items()}
            out[name] = value
        for name in ("secret_key", "suppression_key"):
            if out[name] is None:
                out[name] = f"(generated in {self.var_dir / name})"
        return out


def mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:********@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning a validation failure into one clear `ConfigError`."""
    from pydantic import ValidationError

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}",
                          hint=f"check MAILER_* variables and {config_file()}") from None
