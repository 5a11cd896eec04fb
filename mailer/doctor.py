"""`mailer doctor`: is this deployment set up so that its mail arrives and its data is safe?

Each check answers PASS, WARN or FAIL with one line of what was seen and, unless it passed, one
line of what to do. Checks read and connect; none changes anything or sends a message (the
relay check ends with QUIT before MAIL FROM).

- spf: the envelope (bounce) domain's SPF record authorises the addresses the relay sends from
- dkim: each configured key's selector publishes the public half of that very key
- dmarc: From's domain (or its parent) has a DMARC record, and SPF or DKIM aligns with From
- mx: the bounce domain has an MX, so bounces can come back
- relay: the relay answers, offers STARTTLS with a certificate we trust, accepts our login
- base_url: https, and it answers
- secrets: set, long and varied; key files readable only by us
- backup: the newest backup in MAILER_BACKUP_DIR is recent
- scheduler: a scheduler leads this database
- schema: the database schema is the code's

DNS is read with dnspython from the servers in MAILER_DNS_NAMESERVERS (else the system's).
"""

from __future__ import annotations

import ipaddress
import smtplib
import ssl
import stat
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import dns.exception
import dns.resolver

from mailer import backup, dkim, migrations, spf
from mailer.config import Settings
from mailer.errors import ConfigError, MailerError
from mailer.smtp import parse_smtp_url

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
BACKUP_MAX_AGE = timedelta(hours=26)  # a daily backup, with an hour's slack either side
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain")


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# ---- DNS

def resolver_for(settings: Settings) -> dns.resolver.Resolver:
    if not settings.dns_nameservers:
        return dns.resolver.Resolver()
    resolver = dns.resolver.Resolver(configure=False)
    hosts, ports = [], set()
    for entry in settings.dns_nameservers:
        host, port = _host_port(entry)
        hosts.append(host)
        ports.add(port)
    if len(ports) > 1:
        raise ConfigError("MAILER_DNS_NAMESERVERS name different ports",
                          hint="use one port for every server")
    resolver.nameservers = hosts
    resolver.port = ports.pop()
    resolver.lifetime = 5.0
    return resolver


def _host_port(entry: str) -> tuple[str, int]:
    entry = entry.strip()
    if entry.startswith("["):  # [::1]:53
        host, _, port = entry[1:].partition("]:")
        return host, int(port or 53)
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, int(port)
    return entry, 53


class Dns:
    """Lookups that turn "no such name" and "no such record" into [] and the rest into
    `spf.TempError`, with their answers as text."""

    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        self.resolver = resolver

    def __call__(self, name: str, rdtype: str) -> list[str]:
        try:
            answer = self.resolver.resolve(name, rdtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            raise spf.TempError(f"DNS did not answer for {name} {rdtype}: {exc}") from None
        if rdtype == "TXT":
            return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
        return [r.to_text() for r in answer]


# ---- the checks

def check_spf(settings: Settings, lookup: spf.Lookup) -> Check:
    sender = settings.bounce_address or settings.from_address
    domain = sender.rpartition("@")[2].lower()
    try:
        ips = sending_ips(settings, lookup)
    except spf.TempError as exc:
        return Check("spf", WARN, str(exc), "check MAILER_DNS_NAMESERVERS and try again")
    if not ips:
        return Check("spf", FAIL, "cannot tell which addresses the relay sends from",
                     "set MAILER_RELAY_SENDING_IPS to the relay's outbound addresses")
    results = [(ip, spf.check_host(ip, domain, sender, lookup)) for ip in ips]
    bad = [(ip, r) for ip, r in results if r.result != "pass"]
    if not bad:
        return Check("spf", PASS, f"{domain}'s SPF authorises {', '.join(ips)}")
    ip, result = bad[0]
    mechanism = f"ip{ipaddress.ip_address(ip).version}:{ip}"
    if result.result == "none":
        return Check("spf", FAIL, f"{domain} publishes no SPF record",
                     f'publish TXT at {domain}: "v=spf1 {mechanism} -all" (or your relay\'s '
                     "include:, e.g. include:spf.protection.outlook.com)")
    if result.result in ("permerror", "temperror"):
        return Check("spf", FAIL if result.result == "permerror" else WARN,
                     f"{domain}'s SPF record: {result.result}: {result.reason}",
                     "fix the record so receivers can evaluate it (at most 10 lookups)")
    return Check("spf", FAIL, f"{domain}'s SPF gives {result.result} for the relay's {ip}",
                 f"add {mechanism} (or the relay's include:) to the SPF record of {domain}")


def sending_ips(settings: Settings, lookup: spf.Lookup) -> list[str]:
    if settings.relay_sending_ips:
        return list(settings.relay_sending_ips)
    host = parse_smtp_url(settings.smtp_url.get_secret_value()).host
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    return lookup(host, "A") + lookup(host, "AAAA")


def check_dkim(settings: Settings, lookup: spf.Lookup) -> list[Check]:
    try:
        keys = dkim.load_keys(settings)
    except ConfigError as exc:
        return [Check("dkim", FAIL, str(exc), exc.hint or "fix the MAILER_DKIM_* settings")]
    if not keys:
        return [Check("dkim", WARN, "no DKIM key is set: our mail goes out unsigned",
                      "run `mailer dkim keygen --selector S`, publish the record, set "
                      "MAILER_DKIM_KEY_FILE and MAILER_DKIM_SELECTOR")]
    checks = []
    for key in keys:
        name = f"dkim {key.selector}"
        expected = dkim.txt_value(key.pem)
        try:
            records = [r for r in lookup(key.record_name, "TXT") if "p=" in r]
        except spf.TempError as exc:
            checks.append(Check(name, WARN, str(exc), "check MAILER_DNS_NAMESERVERS"))
            continue
        if not records:
            checks.append(Check(name, FAIL, f"no DKIM record at {key.record_name}",
                                f'publish TXT at {key.record_name}: "{expected}"'))
            continue
        tags = dkim.parse_record(records[0])
        if tags.get("p") != key.public_key() or tags.get("k", "rsa") != key.k:
            checks.append(Check(name, FAIL, f"{key.record_name} publishes another key than "
                                f"{key.path}", f'replace that TXT record with "{expected}"'))
            continue
        testing = " (t=y: receivers treat it as a test)" if "y" in tags.get("t", "") else ""
        checks.append(Check(name, WARN if testing else PASS,
                            f"{key.record_name} publishes this {key.k} key{testing}",
                            "remove t=y once mail verifies" if testing else ""))
    return checks


def _aligned(a: str, b: str) -> bool:
    """Relaxed alignment, approximated without the public-suffix list: one domain is the
    other or a subdomain of it."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def check_dmarc(settings: Settings, lookup: spf.Lookup) -> Check:
    from_domain = settings.from_address.rpartition("@")[2].lower()
    labels = from_domain.split(".")
    record, where = None, ""
    try:
        # From's domain, then its parents up to two labels (a stand-in for the organisational
        # domain of RFC 7489 §6.6.3, which needs the public-suffix list).
        for i in range(0, max(1, len(labels) - 1)):
            where = "_dmarc." + ".".join(labels[i:])
            found = [r for r in lookup(where, "TXT") if r.replace(" ", "").lower()
                     .startswith("v=dmarc1")]
            if found:
                record = found[0]
                break
    except spf.TempError as exc:
        return Check("dmarc", WARN, str(exc), "check MAILER_DNS_NAMESERVERS")
    if record is None:
        return Check("dmarc", FAIL, f"no DMARC record for {from_domain}",
                     f'publish TXT at _dmarc.{from_domain}: "v=DMARC1; p=none; '
                     f'rua=mailto:dmarc@{from_domain}", then tighten to p=quarantine')
    tags = dkim.parse_record(record)
    strict_spf, strict_dkim = tags.get("aspf") == "s", tags.get("adkim") == "s"
    envelope = (settings.bounce_address or settings.from_address).rpartition("@")[2]
    spf_ok = envelope.lower() == from_domain if strict_spf else _aligned(envelope, from_domain)
    signing = settings.dkim_signing_domain if settings.dkim_key_file else None
    dkim_ok = signing is not None and (signing == from_domain if strict_dkim
                                       else _aligned(signing, from_domain))
    if not spf_ok and not dkim_ok:
        return Check("dmarc", FAIL, f"neither the envelope domain {envelope} nor the DKIM "
                     f"domain ({signing or 'none'}) aligns with From's {from_domain}",
                     f"sign with MAILER_DKIM_DOMAIN={from_domain}, or set "
                     f"MAILER_BOUNCE_ADDRESS in {from_domain}")
    how = " and ".join(x for x, ok in (("SPF", spf_ok), ("DKIM", dkim_ok)) if ok)
    policy = tags.get("p", "none")
    if policy == "none":
        return Check("dmarc", WARN, f"{where}: p=none ({how} aligned with From)",
                     "move to p=quarantine once the aggregate reports show only our mail")
    return Check("dmarc", PASS, f"{where}: p={policy}; {how} aligned with From")


def check_mx(settings: Settings, lookup: spf.Lookup) -> Check:
    domain = (settings.bounce_address or settings.from_address).rpartition("@")[2].lower()
    try:
        records = lookup(domain, "MX")
    except spf.TempError as exc:
        return Check("mx", WARN, str(exc), "check MAILER_DNS_NAMESERVERS")
    hosts = [r.split()[-1].rstrip(".") for r in records]
    if not hosts or hosts == [""]:
        what = "a null MX" if records else "no MX"
        return Check("mx", FAIL, f"{domain} has {what}: bounces cannot come back",
                     f"publish an MX for {domain} pointing at the mailbox `mailer bounces "
                     "fetch` reads (or the host running `mailer bounces serve`)")
    return Check("mx", PASS, f"{domain} receives at {', '.join(sorted(hosts))}")


def check_relay(settings: Settings, timeout: float = 10.0) -> Check:
    try:
        target = parse_smtp_url(settings.smtp_url.get_secret_value())
    except ConfigError as exc:
        return Check("relay", FAIL, str(exc), exc.hint or "fix MAILER_SMTP_URL")
    user, password = target.username, target.password
    where = f"{target.host}:{target.port}"
    context = ssl.create_default_context(cafile=target.cafile)
    try:
        if target.tls == "ssl":
            client: smtplib.SMTP = smtplib.SMTP_SSL(target.host, target.port, timeout=timeout,
                                                    context=context)
        else:
            client = smtplib.SMTP(target.host, target.port, timeout=timeout,
                                  local_hostname=target.helo)
    except ssl.SSLError as exc:
        return Check("relay", FAIL, f"{where}: TLS failed: {exc}",
                     "give the relay a certificate for its name from a trusted CA")
    except OSError as exc:
        return Check("relay", FAIL, f"{where} does not answer: {exc}",
                     "check MAILER_SMTP_URL's host and port, and the firewall")
    try:
        client.ehlo()
        if target.tls == "starttls":
            if not client.has_extn("starttls"):
                return Check("relay", FAIL, f"{where} does not offer STARTTLS: our login and "
                             "mail would cross the network in clear",
                             "use a relay that offers STARTTLS (Microsoft 365: "
                             "smtp.office365.com:587) with ?tls=starttls")
            try:
                client.starttls(context=context)
            except (ssl.SSLError, ssl.CertificateError) as exc:
                return Check("relay", FAIL, f"{where}: its certificate is not valid: {exc}",
                             "give the relay a certificate for its name from a trusted CA")
            client.ehlo()
        if user is not None and password is not None:
            try:
                client.login(user, password)
            except smtplib.SMTPException as exc:
                return Check("relay", FAIL, f"{where} refused the login {user}: {exc}",
                             "check the user and password in MAILER_SMTP_URL")
        login = f", accepted the login {user}" if user else ", no login configured"
        if target.tls == "none":
            local = target.host in _LOOPBACK_NAMES or _is_loopback(target.host)
            return Check("relay", WARN if local else FAIL,
                         f"{where} answered{login}, without TLS (MAILER_SMTP_URL says tls=none)",
                         "fine for an MTA on this host; any other relay: ?tls=starttls")
        return Check("relay", PASS, f"{where} answered, TLS certificate valid{login}")
    except (smtplib.SMTPException, OSError) as exc:
        return Check("relay", FAIL, f"{where}: {type(exc).__name__}: {exc}",
                     "check MAILER_SMTP_URL and that the relay is up")
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(settings: Settings, timeout: float = 10.0) -> Check:
    url = settings.base_url
    if urlsplit(url).scheme != "https":
        return Check("base_url", FAIL, f"MAILER_BASE_URL is {url}: links in our mail would "
                     "be sent in clear, and one-click unsubscribe needs HTTPS (RFC 8058)",
                     "serve the web app behind TLS and set MAILER_BASE_URL=https://...")
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=timeout) as response:  # noqa: S310 - https only, checked above
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Check("base_url", FAIL, f"{url}/healthz does not answer: {reason}",
                     "start `mailer web` behind the proxy, and check its certificate and DNS")
    if status != 200:
        return Check("base_url", FAIL, f"{url}/healthz answered {status}",
                     "check the proxy forwards to `mailer web`")
    return Check("base_url", PASS, f"{url} answers over https")


def _strong(value: str) -> bool:
    return len(value) >= 32 and len(set(value)) >= 16


def check_secrets(settings: Settings) -> Check:
    problems, notes = [], []
    for name, configured in (("secret_key", settings.secret_key),
                             ("suppression_key", settings.suppression_key)):
        env = f"MAILER_{name.upper()}"
        if configured is not None:
            if not _strong(configured.get_secret_value()):
                problems.append(f"{env} is short or repetitive")
            continue
        path = settings.var_dir / name
        if not path.is_file():
            problems.append(f"{env} is not set and none was generated in {settings.var_dir}")
        elif _too_open(path):
            problems.append(f"{path} can be read by others")
        else:
            notes.append(f"{env} generated in {path}")
    for key in _key_files(settings):
        if _too_open(key):
            problems.append(f"{key} can be read by others")
    if problems:
        return Check("secrets", FAIL, "; ".join(problems),
                     "set 32+ random characters (python -c 'import secrets; print(secrets."
                     "token_urlsafe(48))') and chmod 600 every key file")
    detail = "set and strong" + (f" ({'; '.join(notes)}: keep them in the backups)"
                                 if notes else "")
    return Check("secrets", PASS, detail)


def _key_files(settings: Settings) -> list[Path]:
    paths = [] if settings.dkim_key_file is None else [settings.dkim_key_file]
    paths += [Path(e.partition("=")[2].strip()) for e in settings.dkim_extra_keys]
    return [p for p in paths if p.is_file()]


def _too_open(path: Path) -> bool:
    return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def check_backup(settings: Settings, now: datetime) -> Check:
    age = backup.last_backup_age(settings, now)
    if age is None:
        return Check("backup", WARN, f"no backup taken yet in {settings.backups}",
                     "take one now (`mailer backup create`) and let the scheduler take them "
                     "daily")
    if age > BACKUP_MAX_AGE:
        return Check("backup", WARN, f"the newest backup is {age.days} days "
                     f"{age.seconds // 3600} hours old", "check the scheduler's daily backup")
    return Check("backup", PASS, f"the newest backup is {int(age.total_seconds() // 3600)} "
                 "hours old")


def _missing_sqlite_file(settings: Settings) -> Path | None:
    """The SQLite file the settings name, when it does not exist (looking must not make it)."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.database)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    path = Path(str(url.database))
    return None if path.exists() else path


def check_scheduler(settings: Settings) -> Check:
    from mailer.schedule import leader_lock

    missing = _missing_sqlite_file(settings)
    if missing is not None:
        return Check("scheduler", FAIL, f"no database at {missing}, so no scheduler leads it",
                     "run `mailer db upgrade`, then start `mailer scheduler`")
    try:
        lock = leader_lock(settings.database)
        free = lock.acquire()
    except Exception as exc:
        return Check("scheduler", FAIL, f"cannot look for the scheduler's lock: {exc}",
                     "check MAILER_DATABASE_URL")
    if free:
        lock.release()
        return Check("scheduler", FAIL, "no scheduler leads this database: scheduled "
                     "editions, reminders and alerts would not go out",
                     "start `mailer scheduler` (or `mailer run` on a single host)")
    lock.release()
    return Check("scheduler", PASS, "a scheduler leads this database")


def check_schema(settings: Settings) -> Check:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    from subscribers.db import normalise_url

    missing = _missing_sqlite_file(settings)
    if missing is not None:
        return Check("schema", FAIL, f"no database at {missing}",
                     "check MAILER_DATABASE_URL, or run `mailer db upgrade` to create it")
    engine = create_engine(normalise_url(settings.database))
    try:
        migrations.require_current(engine)
    except MailerError as exc:
        return Check("schema", FAIL, str(exc), exc.hint or "run `mailer db upgrade`")
    except SQLAlchemyError as exc:
        return Check("schema", FAIL, f"cannot reach the database: {exc.__class__.__name__}",
                     "check MAILER_DATABASE_URL and that the server is up")
    finally:
        engine.dispose()
    return Check("schema", PASS, f"at {migrations.head_revision()}, the code's")


def run_checks(settings: Settings, *, now: datetime | None = None,
               lookup: spf.Lookup | None = None) -> list[Check]:
    """Every check, in the order an operator would fix them."""
    now = now or datetime.now(UTC)
    if lookup is None:
        lookup = Dns(resolver_for(settings))
    steps: list[Callable[[], Check | list[Check]]] = [
        lambda: check_spf(settings, lookup), lambda: check_dkim(settings, lookup),
        lambda: check_dmarc(settings, lookup), lambda: check_mx(settings, lookup),
        lambda: check_relay(settings), lambda: check_base_url(settings),
        lambda: check_secrets(settings), lambda: check_backup(settings, now),
        lambda: check_scheduler(settings), lambda: check_schema(settings)]
    out: list[Check] = []
    for step in steps:
        result = step()
        out.extend(result if isinstance(result, list) else [result])
    return out
