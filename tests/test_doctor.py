"""`mailer doctor` against a real DNS server, SMTP relay and HTTPS server on loopback: a correct
deployment passes every check; each broken zone or relay fails its own check, says how to fix
it, and makes the command exit non-zero. The SPF evaluator on its own, against RFC 7208."""

from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailer import dkim, spf
from mailer.cli import run
from mailer.config import Settings
from mailer.schedule import leader_lock
from tests.dns_server import DnsServer, serving
from tests.smtp_servers import (  # noqa: F401
    TEST_PASSWORD,
    TEST_USER,
    FaultServer,
    TlsFiles,
    make_fault_server,
)

FROM = "bulletin@news.example.org"
BOUNCE = "bounces@news.example.org"
STRONG = "Vq3x9LmZ2pT7rKc4YwN8bHs6JdF1gQe5"  # 32 characters, 32 different


# ---- a test CA and a certificate for 127.0.0.1 and localhost, made with `cryptography`

class Pki:
    def __init__(self, folder: Path) -> None:
        # Valid a year either side: the handshake checks it against OpenSSL's clock, which a
        # suite run at another time of day (tests/moved_clock) does not move.
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "doctor test CA")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(days=365))
              .not_valid_after(now + dt.timedelta(days=365))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                           False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=365))
                .not_valid_after(now + dt.timedelta(days=365))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"),
                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .add_extension(x509.ExtendedKeyUsage(
                    [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        self.ca = folder / "ca.pem"
        self.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.files = TlsFiles(folder / "leaf.pem", folder / "leaf.key")
        self.files.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        self.files.key.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def https_url(pki: Pki) -> Iterator[str]:
    """The web app's stand-in: HTTPS on loopback, /healthz answers 200."""
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    server.socket = pki.files.server_context().wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def dkim_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("doctor-dkim")
    keys = {"ours": folder / "ours.pem", "stranger": folder / "stranger.pem"}
    for path in keys.values():
        dkim.generate_key(path)
    return keys


def good_zone(dkim_keys: dict[str, Path]) -> dict[tuple[str, str], list[str]]:
    record = " ".join(f'"{s}"' for s in dkim.txt_strings(
        dkim.txt_value(dkim_keys["ours"].read_bytes())))
    return {
        ("news.example.org", "TXT"): ['"v=spf1 include:_spf.example.org -all"'],
        ("_spf.example.org", "TXT"): ['"v=spf1 ip4:192.0.2.0/24 ip4:127.0.0.0/8 ~all"'],
        ("news.example.org", "MX"): ["10 mx.news.example.org."],
        ("mx.news.example.org", "A"): ["192.0.2.25"],
        ("_dmarc.news.example.org", "TXT"): ['"v=DMARC1; p=quarantine; adkim=s; '
                                             'rua=mailto:dmarc@news.example.org"'],
        ("mail2026._domainkey.news.example.org", "TXT"): [record],
    }


@pytest.fixture
def deployment(settings: Settings, pki: Pki, https_url: str, dkim_keys: dict[str, Path],
               make_fault_server: Callable[..., FaultServer], tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    """A correct deployment, in the environment as an operator would set it: the test may
    break one part (`zone`, `env`) before calling `doctor`."""
    relay = make_fault_server(tls="starttls", tls_files=pki.files, auth=True)
    backups = tmp_path / "backups"
    backups.mkdir()
    taken = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)  # what the scheduler names them
    (backups / f"mailer-{taken:%Y%m%dT%H%M%SZ}.mbak").write_bytes(b"a backup")
    env = {
        "MAILER_FROM_ADDRESS": FROM, "MAILER_BOUNCE_ADDRESS": BOUNCE,
        "MAILER_SMTP_URL": relay.url(TEST_USER, TEST_PASSWORD, trust=False)
        + f"&cafile={pki.ca}",
        "MAILER_BASE_URL": https_url,
        "MAILER_DKIM_KEY_FILE": str(dkim_keys["ours"]), "MAILER_DKIM_SELECTOR": "mail2026",
        "MAILER_SECRET_KEY": STRONG, "MAILER_SUPPRESSION_KEY": STRONG[::-1],
        "MAILER_BACKUP_DIR": str(backups),
    }
    # the web stand-in's certificate is signed by the test CA: trust it as the system would
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    lock = leader_lock(settings.database)  # a scheduler leads
    assert lock.acquire()
    with serving(good_zone(dkim_keys)) as dns:
        env["MAILER_DNS_NAMESERVERS"] = json.dumps([dns.address])
        try:
            yield {"env": env, "zone": dns.zone, "dns": dns, "monkeypatch": monkeypatch,
                   "relay": relay, "lock": lock}
        finally:
            lock.release()


def doctor(deployment: dict[str, object], capsys: pytest.CaptureFixture[str]
           ) -> tuple[int, dict[str, dict[str, str]]]:
    monkeypatch = deployment["monkeypatch"]
    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    for name, value in deployment["env"].items():  # type: ignore[attr-defined]
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    code = run(["doctor", "--json"])
    out = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in out["checks"]}
    assert out["ok"] == (code == 0)
    return code, checks


def test_a_correct_deployment_passes_every_check(
        deployment: dict[str, object], capsys: pytest.CaptureFixture[str]) -> None:
    code, checks = doctor(deployment, capsys)
    assert {name: c["status"] for name, c in checks.items()} == {
        "spf": "PASS", "dkim mail2026": "PASS", "dmarc": "PASS", "mx": "PASS",
        "relay": "PASS", "base_url": "PASS", "secrets": "PASS", "backup": "PASS",
        "scheduler": "PASS", "schema": "PASS"}, checks
    assert code == 0
    assert "accepted the login relay-user" in checks["relay"]["detail"]
    assert checks["relay"]["detail"].count("TLS certificate valid") == 1
    # it asked the loopback server, and never sent a message through the relay
    dns = deployment["dns"]
    assert isinstance(dns, DnsServer)
    assert ("mail2026._domainkey.news.example.org.", "TXT") in dns.queries
    relay = deployment["relay"]
    assert isinstance(relay, FaultServer) and relay.handler.accepted() == 0

    # and in words, for people
    code_words = run(["doctor"])
    words = capsys.readouterr().out
    assert code_words == 0 and words.count("PASS") == 10 and "FAIL" not in words


def _no_spf(d: dict) -> None:
    del d["zone"][("news.example.org", "TXT")]


def _dkim_for_another_key(d: dict, keys: dict[str, Path]) -> None:
    d["zone"][("mail2026._domainkey.news.example.org", "TXT")] = [
        " ".join(f'"{s}"' for s in dkim.txt_strings(dkim.txt_value(
            keys["stranger"].read_bytes())))]


def _no_dmarc(d: dict) -> None:
    del d["zone"][("_dmarc.news.example.org", "TXT")]


def _relay_without_starttls(d: dict, make_fault_server: Callable[..., FaultServer]) -> None:
    plain = make_fault_server(auth=False)
    d["env"]["MAILER_SMTP_URL"] = plain.url(tls="starttls")


def _http_base_url(d: dict) -> None:
    d["env"]["MAILER_BASE_URL"] = d["env"]["MAILER_BASE_URL"].replace("https:", "http:")


@pytest.mark.parametrize(("breakage", "check", "detail", "fix"), [
    (_no_spf, "spf", "news.example.org publishes no SPF record",
     'publish TXT at news.example.org: "v=spf1 ip4:127.0.0.1 -all"'),
    (_dkim_for_another_key, "dkim mail2026", "publishes another key than",
     'replace that TXT record with "v=DKIM1; k=rsa; p='),
    (_no_dmarc, "dmarc", "no DMARC record for news.example.org",
     'publish TXT at _dmarc.news.example.org: "v=DMARC1; p=none;'),
    (_relay_without_starttls, "relay", "does not offer STARTTLS",
     "with ?tls=starttls"),
    (_http_base_url, "base_url", "MAILER_BASE_URL is http://127.0.0.1:",
     "set MAILER_BASE_URL=https://"),
], ids=["no-spf", "dkim-another-key", "no-dmarc", "relay-without-starttls", "http-base-url"])
def test_each_broken_part_fails_its_own_check_with_its_fix_and_a_non_zero_exit(
        deployment: dict[str, object], capsys: pytest.CaptureFixture[str],
        dkim_keys: dict[str, Path], make_fault_server: Callable[..., FaultServer],
        breakage: Callable[..., None], check: str, detail: str, fix: str) -> None:
    extra = {"_dkim_for_another_key": (dkim_keys,),
             "_relay_without_starttls": (make_fault_server,)}.get(breakage.__name__, ())
    breakage(deployment, *extra)
    code, checks = doctor(deployment, capsys)
    assert code == 1
    failed = {name for name, c in checks.items() if c["status"] == "FAIL"}
    assert failed == {check}, checks
    assert detail in checks[check]["detail"]
    assert fix in checks[check]["fix"]
    if check == "dkim mail2026":  # the fix names the record of our key, not the stranger's
        ours = dkim.public_key(dkim_keys["ours"].read_bytes())
        assert ours in checks[check]["fix"]


def test_an_untrusted_certificate_a_refused_login_and_no_leader_each_fail(
        deployment: dict[str, object], capsys: pytest.CaptureFixture[str]) -> None:
    env = deployment["env"]
    assert isinstance(env, dict)
    good = env["MAILER_SMTP_URL"]
    env["MAILER_SMTP_URL"] = good.split("&cafile=")[0]  # the system's CAs do not know ours
    monkeypatch = deployment["monkeypatch"]
    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    ca = os.environ["SSL_CERT_FILE"]
    monkeypatch.delenv("SSL_CERT_FILE")
    code, checks = doctor(deployment, capsys)
    assert code == 1 and checks["relay"]["status"] == "FAIL"
    assert "certificate is not valid" in checks["relay"]["detail"]
    assert checks["base_url"]["status"] == "FAIL"  # nor the web stand-in's
    monkeypatch.setenv("SSL_CERT_FILE", ca)

    env["MAILER_SMTP_URL"] = good.replace("relay-user:", "someone-else:")
    code, checks = doctor(deployment, capsys)
    assert code == 1 and "refused the login someone-else" in checks["relay"]["detail"]

    env["MAILER_SMTP_URL"] = good
    lock = deployment["lock"]
    lock.release()  # type: ignore[attr-defined]
    env["MAILER_SECRET_KEY"] = "s" * 40
    code, checks = doctor(deployment, capsys)
    assert code == 1
    assert {n for n, c in checks.items() if c["status"] == "FAIL"} == {"scheduler", "secrets"}
    assert "start `mailer scheduler`" in checks["scheduler"]["fix"]
    assert "MAILER_SECRET_KEY is short or repetitive" in checks["secrets"]["detail"]


def test_no_backup_is_a_warning_not_a_failure(
        deployment: dict[str, object], capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    env = deployment["env"]
    assert isinstance(env, dict)
    env["MAILER_BACKUP_DIR"] = str(tmp_path / "none-yet")
    code, checks = doctor(deployment, capsys)
    assert code == 0
    assert checks["backup"]["status"] == "WARN"
    assert "no backup taken yet" in checks["backup"]["detail"]
    assert "mailer backup create" in checks["backup"]["fix"]


# ---- the SPF evaluator (RFC 7208), on a zone in a dict

def _lookup(zone: dict[tuple[str, str], list[str]]) -> spf.Lookup:
    def lookup(name: str, rdtype: str) -> list[str]:
        return zone.get((name.rstrip("."), rdtype), [])
    return lookup


ZONE = {
    ("example.org", "TXT"): ["v=spf1 a mx include:relay.example.net ip6:2001:db8::/32 "
                             "redirect=fallback.example.org"],
    ("example.org", "A"): ["198.51.100.10"],
    ("example.org", "MX"): ["10 mx1.example.org."],
    ("mx1.example.org", "A"): ["198.51.100.25"],
    ("relay.example.net", "TXT"): ["v=spf1 ip4:203.0.113.0/24 -all"],
    ("fallback.example.org", "TXT"): ["v=spf1 ip4:192.0.2.7 ~all"],
    ("loop.example.org", "TXT"): [" ".join(["v=spf1"] + [f"include:i{i}.example.org"
                                                          for i in range(11)] + ["-all"])],
    **{(f"i{i}.example.org", "TXT"): ["v=spf1 -all"] for i in range(11)},
    ("two.example.org", "TXT"): ["v=spf1 -all", "v=spf1 +all"],
    ("macro.example.org", "TXT"): ["v=spf1 exists:%{i}.allow.example.org -all"],
    ("203.0.113.9.allow.example.org", "A"): ["127.0.0.2"],
}


@pytest.mark.parametrize(("ip", "domain", "result"), [
    ("198.51.100.10", "example.org", "pass"),  # a
    ("198.51.100.25", "example.org", "pass"),  # mx
    ("203.0.113.77", "example.org", "pass"),  # include
    ("2001:db8::1", "example.org", "pass"),  # ip6
    ("192.0.2.7", "example.org", "pass"),  # redirect
    ("192.0.2.8", "example.org", "softfail"),  # redirect's ~all
    ("203.0.113.77", "relay.example.net", "pass"),
    ("198.51.100.10", "relay.example.net", "fail"),
    ("198.51.100.10", "nothing.example.org", "none"),
    ("198.51.100.10", "loop.example.org", "permerror"),  # 11 includes: over the limit of 10
    ("198.51.100.10", "two.example.org", "permerror"),
    ("203.0.113.9", "macro.example.org", "pass"),
    ("203.0.113.10", "macro.example.org", "fail"),
])
def test_spf_check_host(ip: str, domain: str, result: str) -> None:
    assert spf.check_host(ip, domain, f"bounces@{domain}", _lookup(ZONE)).result == result


def test_looking_at_a_database_that_is_not_there_does_not_create_it(
        settings: Settings, tmp_path: Path) -> None:
    from mailer.doctor import run_checks

    path = tmp_path / "never" / "mailer.db"
    absent = settings.model_copy(update={"database_url": f"sqlite:///{path}"})
    checks = {c.name: c for c in run_checks(absent, lookup=_lookup({}))}
    assert checks["schema"].status == checks["scheduler"].status == "FAIL"
    assert checks["schema"].detail == f"no database at {path}"
    assert not path.parent.exists()
