"""DKIM for every message we send: the keys the settings name, what h= covers, the signer, and
the key generator with its DNS record.

Every message leaves through one of two doors, and both sign here: the worker's send loop
(editions and reminders: `Signer.sign_async`, the RSA operation in processes beside the SMTP
loop) and `mailer.outgoing.send_now` (confirmation and manage-link mails, alerts, test sends:
`Signer.sign`). Each configured key adds one DKIM-Signature: the current key, and during a key
rotation the next one (its selector published before it signs, the old one kept until mail
signed with it has been read), and an Ed25519 co-signature (RFC 8463) beside RSA if wanted;
a verifier needs only one of them to pass.

The key operations are `mailer.signing`'s (OpenSSL through `cryptography`); no database, no DNS.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import multiprocessing
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mailer import signing
from mailer.config import Settings
from mailer.errors import ConfigError

# What h= covers, each name twice: the second of each selects nothing (each occurs at most
# once in what we send), so a header added later (a second From, a forged List-Unsubscribe, a
# Reply-To or Cc where there was none) breaks the signature (over-signing, RFC 6376 §8.15).
SIGNED_HEADERS = (b"from", b"to", b"subject", b"date", b"message-id", b"list-id",
                  b"list-unsubscribe", b"list-unsubscribe-post", b"mime-version",
                  b"content-type", b"reply-to", b"cc", b"auto-submitted")
HEADER_LIST = [*SIGNED_HEADERS, *SIGNED_HEADERS]
ALGORITHMS = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}
SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")  # and domains
RSA_BITS = 2048  # what every receiver accepts; 1024 is weak, 4096 does not fit many DNS UIs


@dataclass(frozen=True)
class DkimKey:
    """One signing key: `k` is "rsa" or "ed25519" (read from the key itself)."""

    selector: str
    domain: str
    pem: bytes
    k: str
    path: Path | None = None

    @property
    def algorithm(self) -> bytes:
        return ALGORITHMS[self.k]

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def public_key(self) -> str:
        """The p= value: base64 of the DER public key (RSA) or of the raw 32 bytes (Ed25519)."""
        return public_key(self.pem)


def key_kind(pem: bytes, where: str = "the DKIM key") -> str:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where} is not a usable PEM private key: {exc}",
                          hint="make one with `mailer dkim keygen`") from None
    if isinstance(key, RSAPrivateKey):
        if key.key_size < 1024:
            raise ConfigError(f"{where} is RSA-{key.key_size}; receivers ignore keys under "
                              "1024 bits", hint="make one with `mailer dkim keygen`")
        return "rsa"
    if isinstance(key, Ed25519PrivateKey):
        return "ed25519"
    raise ConfigError(f"{where} is {type(key).__name__}; DKIM signs with RSA or Ed25519",
                      hint="make one with `mailer dkim keygen`")


def public_key(pem: bytes) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
    else:
        raw = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode("ascii")


def _read_key(path: Path, selector: str, domain: str, setting: str) -> DkimKey:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}",
                          hint="check the path and that this user may read it") from None
    if not selector:
        raise ConfigError(f"{setting} is set but its selector is not",
                          hint="set MAILER_DKIM_SELECTOR (the name published in DNS)")
    return DkimKey(selector, domain, pem, key_kind(pem, f"{setting} ({path})"), path)


def load_keys(settings: Settings) -> tuple[DkimKey, ...]:
    """The keys that sign, current first; empty when DKIM is off (no MAILER_DKIM_KEY_FILE)."""
    return _keys(settings.dkim_key_file, settings.dkim_selector, settings.dkim_signing_domain,
                 tuple(settings.dkim_extra_keys))


def _keys(key_file: Path | None, selector: str, domain: str,
          extra: tuple[str, ...]) -> tuple[DkimKey, ...]:
    if key_file is None:
        if extra:
            raise ConfigError("MAILER_DKIM_EXTRA_KEYS is set without MAILER_DKIM_KEY_FILE",
                              hint="set the current key first; extra keys sign beside it")
        return ()
    keys = [_read_key(key_file, selector, domain, "MAILER_DKIM_KEY_FILE")]
    for entry in extra:
        name, eq, path = entry.partition("=")
        if not eq or not name.strip() or not path.strip():
            raise ConfigError(f"MAILER_DKIM_EXTRA_KEYS entry {entry!r} is not selector=path",
                              hint='e.g. ["2027a=/etc/mailer/dkim-2027a.pem"]')
        keys.append(_read_key(Path(path.strip()), name.strip(), domain,
                              f"MAILER_DKIM_EXTRA_KEYS entry {entry!r}"))
    if len({k.selector for k in keys}) != len(keys):
        raise ConfigError("two DKIM keys share a selector",
                          hint="each key is published under its own selector")
    return tuple(keys)


_CHILD_SIGNER: Signer | None = None  # in a signing process
BATCH = 16  # messages a signing process takes at once: fewer round trips, short waits


def _start_child(keys: tuple[DkimKey, ...]) -> None:
    """A signing process's initializer: the keys arrive once, and are parsed now (~50 ms
    each), not with the first message."""
    global _CHILD_SIGNER
    _CHILD_SIGNER = Signer(keys)


def _sign_in_child(batch: list[bytes]) -> list[bytes]:
    """In a signing process: the DKIM-Signature fields of each message."""
    assert _CHILD_SIGNER is not None
    return [_CHILD_SIGNER.signatures(raw) for raw in batch]


class Signer:
    """Prepends one DKIM-Signature per key to each message (nothing when there is no key).

    `sign` works inline. `sign_async` signs in `processes` worker processes (spawned on first
    use), so a worker signs on every core while its loop keeps the SMTP sessions busy. The
    whole message crosses to them: copying 60 KB through a pipe costs the loop far less than
    canonicalising and hashing the body (~0.3 ms) would, let alone the RSA operation (~1.1
    ms). The requests made in one turn of the event loop go together, up to BATCH a round
    trip, because each round trip costs the loop a wake-up and a thread hand-over.
    """

    def __init__(self, keys: Sequence[DkimKey], processes: int = 0) -> None:
        self.keys = tuple(keys)
        self.processes = processes
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._waiting: list[tuple[bytes, asyncio.Future[bytes]]] = []
        for key in self.keys:  # a key that cannot sign fails here, not per message
            signing.SIGNERS[key.algorithm](key.pem)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def signatures(self, raw: bytes, *, timestamp: int | None = None) -> bytes:
        """The DKIM-Signature fields for `raw`, one per key, current key first."""
        return b"".join(signing.sign(raw, k.selector.encode(), k.domain.encode(), k.pem,
                                     include_headers=HEADER_LIST, timestamp=timestamp,
                                     algorithm=k.algorithm) for k in self.keys)

    def sign(self, raw: bytes, *, timestamp: int | None = None) -> bytes:
        if not self.keys:
            return raw
        return self.signatures(raw, timestamp=timestamp) + raw

    async def sign_async(self, raw: bytes) -> bytes:
        if not self.keys:
            return raw
        if self.processes <= 0:
            return self.sign(raw)
        loop = asyncio.get_running_loop()
        if self._pool is None:
            # spawn, not fork: the worker has threads (the database helper) by now.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_child, initargs=(self.keys,))
        future: asyncio.Future[bytes] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._flush)
        self._waiting.append((raw, future))
        return await future + raw

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        assert self._pool is not None
        for start in range(0, len(waiting), BATCH):
            part = waiting[start:start + BATCH]
            done = asyncio.wrap_future(self._pool.submit(_sign_in_child, [d for d, _ in part]))
            done.add_done_callback(functools.partial(self._deliver, part))

    @staticmethod
    def _deliver(part: list[tuple[bytes, asyncio.Future[bytes]]],
                 done: asyncio.Future[list[bytes]]) -> None:
        for i, (_, future) in enumerate(part):
            if future.done():  # its sender was cancelled (the worker stopping)
                continue
            if done.cancelled():
                future.cancel()
            elif done.exception() is not None:
                future.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                future.set_result(done.result()[i])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


@functools.lru_cache(maxsize=4)
def _cached_signer(key_file: Path | None, selector: str, domain: str, extra: tuple[str, ...],
                   mtimes: tuple[float, ...]) -> Signer:
    return Signer(_keys(key_file, selector, domain, extra))


def signer_for(settings: Settings) -> Signer:
    """The inline signer for these settings, its keys read once (again when a file changes)."""
    extra = tuple(settings.dkim_extra_keys)
    paths = [] if settings.dkim_key_file is None else [settings.dkim_key_file]
    paths += [Path(e.partition("=")[2].strip()) for e in extra]
    mtimes = tuple(p.stat().st_mtime if p.is_file() else 0.0 for p in paths)
    return _cached_signer(settings.dkim_key_file, settings.dkim_selector,
                          settings.dkim_signing_domain, extra, mtimes)


def signing_processes(settings: Settings) -> int:
    """Processes the worker signs in: the setting, else one per CPU when a key is set."""
    if settings.dkim_sign_processes is not None:
        return settings.dkim_sign_processes
    return os.cpu_count() or 1


# ---- keygen and the DNS record

def generate_key(path: Path, *, ed25519: bool = False) -> bytes:
    """A new private key written to `path` with mode 0600; refuses to overwrite anything."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519 as ed
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = (ed.Ed25519PrivateKey.generate() if ed25519
           else rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists; a DKIM key is never overwritten",
                          hint="choose another --out (a new selector gets a new file)") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return pem


def txt_value(pem: bytes) -> str:
    k = key_kind(pem)
    return f"v=DKIM1; k={k}; p={public_key(pem)}"


def txt_strings(value: str) -> list[str]:
    """The record value as DNS character-strings of at most 255 bytes (RFC 1035 §3.3); a
    verifier joins them with nothing between (RFC 6376 §3.6.2.2)."""
    data = value.encode("ascii")
    return [data[i:i + 255].decode("ascii") for i in range(0, len(data), 255)]


def parse_record(text: str) -> dict[str, str]:
    """The tags of a DKIM key record (`v=DKIM1; k=rsa; p=...`), whitespace removed from p=."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags[name.strip()] = "".join(value.split()) if name.strip() == "p" else value.strip()
    return tags
