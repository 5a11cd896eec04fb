"""The per-delivery reference: names one (edition, subscriber) pair, signed so it cannot be forged.

It appears in the Message-ID (stable across retries, so a resent copy is recognisable) and in the
VERP return path `bounces+REF@domain`, so a bounce or complaint leads back to the delivery even
when the bounce message itself is unparseable. Pure: no database.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re

_PURPOSE = b"mailer.delivery-ref.v1"
_REF = re.compile(r"e(\d{1,12})\.s(\d{1,12})\.([0-9a-f]{16})")


@functools.lru_cache(maxsize=8)
def _key(secret: bytes) -> hmac.HMAC:
    """The keyed HMAC for this purpose, copied per use: keying it is half the cost."""
    return hmac.new(hmac.new(secret, _PURPOSE, hashlib.sha256).digest(), None, hashlib.sha256)


def _mac(secret: bytes, edition_id: int, subscriber_id: int) -> str:
    mac = _key(secret).copy()
    mac.update(f"{edition_id}.{subscriber_id}".encode())
    return mac.hexdigest()[:16]


def delivery_ref(secret: bytes, edition_id: int, subscriber_id: int) -> str:
    """`e12.s345.0123456789abcdef`: ASCII, no `+`/`=`, safe in a local part and a Message-ID."""
    return f"e{edition_id}.s{subscriber_id}.{_mac(secret, edition_id, subscriber_id)}"


def parse_delivery_ref(secret: bytes, text: str) -> tuple[int, int] | None:
    """The first valid reference in `text` (a Message-ID, an address, a header), or None."""
    for match in _REF.finditer(text):
        edition_id, subscriber_id = int(match[1]), int(match[2])
        if hmac.compare_digest(match[3], _mac(secret, edition_id, subscriber_id)):
            return edition_id, subscriber_id
    return None


def message_id(secret: bytes, edition_id: int, subscriber_id: int, domain: str) -> str:
    return f"<{delivery_ref(secret, edition_id, subscriber_id)}@{domain}>"


def return_path(secret: bytes, edition_id: int, subscriber_id: int, bounce_address: str) -> str:
    """VERP: `bounces@d` becomes `bounces+REF@d` for this delivery."""
    local, _, domain = bounce_address.rpartition("@")
    return f"{local}+{delivery_ref(secret, edition_id, subscriber_id)}@{domain}"
