"""SPF `check_host()` (RFC 7208 §4) for `mailer doctor`: would the receiver accept mail from
this address for this domain?

Mechanisms all, include, a, mx, ptr (counted, never matched: RFC 7208 §5.5 says not to use it),
ip4, ip6 and exists; modifiers redirect= (and exp=, ignored); the limits of §4.6.4 (10 DNS
mechanisms and modifiers, 10 names per mx, 2 void lookups). Macros are expanded for the common
letters (s l o d i h) without transformers; a macro with a transformer makes its mechanism a
permerror, since guessing would make the answer untrustworthy.

DNS comes through a `Lookup` callable, so this module is pure: `mailer.doctor` passes one that
asks dnspython (whose server the settings name), the tests may pass a dict.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field

Lookup = Callable[[str, str], list[str]]  # (name, "TXT"|"A"|"AAAA"|"MX") -> records; [] = void
LOOKUP_LIMIT = 10
VOID_LIMIT = 2
_MECHANISM = re.compile(r"([+?~-]?)(all|include|a|mx|ptr|ip4|ip6|exists)(?=$|[:/])(:?)(.*)",
                        re.IGNORECASE)
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*)=(.*)")
_QUALIFIER = {"": "pass", "+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}


class TempError(Exception):
    """DNS did not answer (timeout, SERVFAIL): the receiver would try again later."""


class PermError(Exception):
    """The record is broken: a syntax error, too many lookups, or a missing include."""


@dataclass
class Result:
    result: str  # pass fail softfail neutral none permerror temperror
    reason: str
    record: str | None = None
    lookups: int = 0


@dataclass
class _State:
    lookup: Lookup
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    sender: str
    lookups: int = 0
    voids: int = 0
    seen: list[str] = field(default_factory=list)

    def count(self) -> None:
        self.lookups += 1
        if self.lookups > LOOKUP_LIMIT:
            raise PermError(f"more than {LOOKUP_LIMIT} DNS lookups (RFC 7208 §4.6.4)")

    def ask(self, name: str, rdtype: str) -> list[str]:
        records = self.lookup(name, rdtype)
        if not records:
            self.voids += 1
            if self.voids > VOID_LIMIT:
                raise PermError(f"more than {VOID_LIMIT} lookups found nothing (§4.6.4)")
        return records


def check_host(ip: str, domain: str, sender: str, lookup: Lookup) -> Result:
    """The SPF result for mail from `ip` with MAIL FROM `sender` (whose domain is `domain`)."""
    state = _State(lookup, ipaddress.ip_address(ip), sender)
    try:
        result, reason, record = _check(state, domain.rstrip(".").lower())
    except PermError as exc:
        return Result("permerror", str(exc), lookups=state.lookups)
    except TempError as exc:
        return Result("temperror", str(exc), lookups=state.lookups)
    return Result(result, reason, record, state.lookups)


def spf_record(domain: str, lookup: Lookup) -> str | None:
    """The domain's one SPF record, None if it has none; PermError if it has several."""
    records = [r for r in lookup(domain, "TXT") if r.lower() == "v=spf1"
               or r.lower().startswith("v=spf1 ")]
    if len(records) > 1:
        raise PermError(f"{domain} publishes {len(records)} SPF records; only one is allowed")
    return records[0] if records else None


def _check(state: _State, domain: str) -> tuple[str, str, str | None]:
    if domain in state.seen:
        raise PermError(f"{domain} includes itself")
    state.seen.append(domain)
    record = spf_record(domain, state.lookup)
    if record is None:
        return "none", f"{domain} publishes no SPF record", None
    redirect = None
    for term in record.split()[1:]:
        mechanism = _MECHANISM.fullmatch(term)
        if mechanism is None:
            modifier = _MODIFIER.fullmatch(term)
            if modifier is None:
                raise PermError(f"{domain}: unknown SPF term {term!r}")
            if modifier[1].lower() == "redirect":
                redirect = _expand(state, modifier[2], domain)
            continue
        qualifier, name, colon, arg = mechanism.groups()
        if _matches(state, domain, name.lower(), arg if colon or arg.startswith("/") else ""):
            verdict = _QUALIFIER[qualifier]
            return verdict, f"{domain}: {term} matches {state.ip}", record
    if redirect is not None:
        state.count()
        result, reason, _ = _check(state, redirect)
        if result == "none":
            raise PermError(f"{domain}: redirect={redirect} has no SPF record")
        return result, reason, record
    return "neutral", f"{domain}: nothing in its SPF record matches {state.ip}", record


def _matches(state: _State, domain: str, name: str, arg: str) -> bool:
    if name == "all":
        return True
    if name in ("ip4", "ip6"):
        try:
            network = ipaddress.ip_network(arg, strict=False)
        except ValueError:
            raise PermError(f"{domain}: bad {name}:{arg}") from None
        if (network.version == 4) != (name == "ip4"):
            raise PermError(f"{domain}: {name}:{arg} is the wrong family")
        return state.ip.version == network.version and state.ip in network
    state.count()
    if name == "include":
        if not arg:
            raise PermError(f"{domain}: include without a domain")
        result, _, _ = _check(state, _expand(state, arg, domain))
        if result == "none":
            raise PermError(f"{domain}: include:{arg} has no SPF record")
        if result in ("permerror", "temperror"):
            raise PermError(f"{domain}: include:{arg} is broken")
        return result == "pass"
    if name == "ptr":
        return False
    target, cidr4, cidr6 = _split_cidr(state, arg, domain)
    if name == "exists":
        return bool(state.ask(target, "A"))
    if name == "a":
        return _in_hosts(state, [target], cidr4, cidr6)
    # mx
    hosts = [r.split()[-1].rstrip(".") for r in state.ask(target, "MX")]
    if len(hosts) > 10:
        raise PermError(f"{domain}: mx:{target} has more than 10 hosts (§4.6.4)")
    return _in_hosts(state, hosts, cidr4, cidr6)


def _in_hosts(state: _State, hosts: list[str], cidr4: int, cidr6: int) -> bool:
    rdtype, bits = ("A", cidr4) if state.ip.version == 4 else ("AAAA", cidr6)
    for host in hosts:
        for address in state.ask(host, rdtype):
            if state.ip in ipaddress.ip_network(f"{address}/{bits}", strict=False):
                return True
    return False


def _split_cidr(state: _State, arg: str, domain: str) -> tuple[str, int, int]:
    cidr4, cidr6 = 32, 128
    match = re.fullmatch(r"(.*?)(?:/(\d{1,2}))?(?://(\d{1,3}))?", arg)
    assert match is not None
    if match[2] is not None:
        cidr4 = int(match[2])
    if match[3] is not None:
        cidr6 = int(match[3])
    if cidr4 > 32 or cidr6 > 128:
        raise PermError(f"{domain}: bad prefix length in {arg!r}")
    target = _expand(state, match[1], domain) if match[1] else domain
    return target.rstrip(".").lower(), cidr4, cidr6


def _expand(state: _State, spec: str, domain: str) -> str:
    if "%" not in spec:
        return spec
    local, _, sender_domain = state.sender.rpartition("@")
    ip = state.ip
    dotted = (str(ip) if ip.version == 4
              else ".".join(ip.exploded.replace(":", "")))
    values = {"s": state.sender, "l": local or "postmaster", "o": sender_domain, "d": domain,
              "i": dotted, "h": domain, "v": "in-addr" if ip.version == 4 else "ip6"}

    def one(match: re.Match[str]) -> str:
        escaped = {"%%": "%", "%_": " ", "%-": "%20"}.get(match[0])
        if escaped is not None:
            return escaped
        inner = match[1] or ""
        if len(inner) != 1 or inner.lower() not in values:
            raise PermError(f"{domain}: macro {match[0]} is not supported here")
        return values[inner.lower()]

    return re.sub(r"%\{([^}]*)\}|%%|%_|%-", one, spec)
