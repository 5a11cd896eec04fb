"""Backups: the whole database in one encrypted file, checked before it is trusted, restored
with every send paused.

Taking one. SQLite: the online backup API copies the file while the worker writes (WAL: the
copy is one committed state). PostgreSQL: `pg_dump --format=custom` on a snapshot exported by
our own REPEATABLE READ transaction, so the row counts of the manifest are of exactly the state
dumped. pg_dump and pg_restore come from Debian's postgresql-client; their major version must
be at least the server's (`/usr/lib/postgresql/<major>/bin` is tried first, then PATH, or
MAILER_BACKUP_PG_BIN_DIR); without them a PostgreSQL backup or restore is refused with what to
install, and SQLite needs nothing.

The file (format 1), since a backup holds personal data and the keyed suppression hashes:

    b"MSHTBAK" 0x01 | header length (4 bytes, big-endian) | header (JSON: key id, nonce prefix,
    chunk size) | chunks

The plaintext is `manifest length (4 bytes) | manifest (JSON) | dump`; it is cut into chunks of
`chunk` bytes, each sealed with AES-256-GCM (`cryptography`) under a nonce of the file's random
8-byte prefix and the chunk's number, with the header, the number and a last-chunk flag as
associated data. A changed, swapped, dropped or appended byte anywhere fails authentication,
and a truncated file fails because its last chunk was not sealed as last. The manifest holds
the schema revision, the row count of every table and the SHA-256 of the dump, checked again
after decryption. The key is 32 random bytes (base64) in the file MAILER_BACKUP_KEY_FILE
(`mailer backup keygen` writes one); keep a copy away from the database's disk.

Restoring. The backup is decrypted and checked in full before the database is touched. A
backup from a newer schema than the code's is refused; an older one is restored, then upgraded
(`mailer db upgrade`'s migrations) in the same command. A database that already holds data is
refused unless `force`. After the restore every edition that was sending or scheduled is paused
(a co-ordinator resumes it, having checked what went out since the backup), and deliveries that
were claimed when the backup was taken are released: their worker is gone, so they are sent
again at once, marked ambiguous, as after any crash.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Engine, create_engine, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from mailer import migrations, outbox
from mailer.config import Settings
from mailer.errors import MailerError
from subscribers.db import make_engine, normalise_url, session_factory, session_scope, utcnow

log = logging.getLogger(__name__)

MAGIC = b"MSHTBAK\x01"
FORMAT = 1
CHUNK = 1 << 20  # 1 MiB of plaintext per sealed chunk
TAG = 16
SUFFIX = ".mbak"
NAME = re.compile(r"^mailer-(\d{8}T\d{6}Z)\.mbak$")  # what the scheduler writes and prunes
# A database holding any of these has data a restore would replace (the seeded topics and
# events alone do not count: a freshly migrated database is empty).
DATA_TABLES = ("subscriber", "suppression", "edition", "console_user", "consent_event")


class BackupError(MailerError):
    """A backup cannot be made, read, trusted or restored; the message says which and why."""


# ---------------------------------------------------------------- the key

def make_key_file(path: Path) -> str:
    """Write a new random key to `path` (mode 0600, never over an existing file); returns its id."""
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise BackupError(f"{path} already exists; a key is never overwritten",
                          hint="choose another path, or keep using that key") from None
    except OSError as exc:
        raise BackupError(f"cannot write the key to {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as handle:
        handle.write(base64.urlsafe_b64encode(key).decode() + "\n")
    return key_id(key)


def key_id(key: bytes) -> str:
    """A short public name for a key, so a backup can say which key it needs."""
    return hashlib.sha256(b"mailer-backup-key-id:" + key).hexdigest()[:16]


def load_key(settings: Settings) -> bytes:
    path = settings.backup_key_file
    if path is None:
        raise BackupError("no backup key: MAILER_BACKUP_KEY_FILE is not set",
                          hint="make one with `mailer backup keygen /etc/mailer/backup.key`, "
                               "set MAILER_BACKUP_KEY_FILE to it and keep a copy off this host")
    try:
        raw = path.read_text().strip()
    except OSError as exc:
        raise BackupError(f"MAILER_BACKUP_KEY_FILE {path}: {exc.strerror}") from None
    try:
        key = base64.urlsafe_b64decode(raw.encode())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise BackupError(f"MAILER_BACKUP_KEY_FILE {path} is not a backup key "
                          "(32 random bytes, base64)", hint="make one with `mailer backup keygen`")
    return key


# ---------------------------------------------------------------- the sealed file

def _aad(header: bytes, number: int, last: bool) -> bytes:
    return header + struct.pack(">IB", number, last)


class _SealedWriter:
    """Plaintext in, sealed chunks out (see the module docstring)."""

    def __init__(self, handle: IO[bytes], key: bytes, chunk: int = CHUNK) -> None:
        self.handle = handle
        self.aead = AESGCM(key)
        self.prefix = secrets.token_bytes(8)
        self.chunk = chunk
        header = json.dumps({"format": FORMAT, "key_id": key_id(key), "chunk": chunk,
                             "nonce_prefix": self.prefix.hex()}).encode()
        self.header = MAGIC + struct.pack(">I", len(header)) + header
        handle.write(self.header)
        self.buffer = bytearray()
        self.number = 0
        self.written = len(self.header)

    def write(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) > self.chunk:  # the last chunk is always sealed by close()
            self._seal(bytes(self.buffer[:self.chunk]), last=False)
            del self.buffer[:self.chunk]

    def close(self) -> None:
        self._seal(bytes(self.buffer), last=True)
        self.buffer.clear()

    def _seal(self, plain: bytes, last: bool) -> None:
        nonce = self.prefix + struct.pack(">I", self.number)
        sealed = self.aead.encrypt(nonce, plain, _aad(self.header, self.number, last))
        self.handle.write(sealed)
        self.written += len(sealed)
        self.number += 1


def _read_header(handle: IO[bytes], where: str) -> tuple[bytes, dict[str, Any]]:
    magic = handle.read(len(MAGIC))
    if magic != MAGIC:
        raise BackupError(f"{where}: not a mailer backup (it does not start as one)")
    size_bytes = handle.read(4)
    size = struct.unpack(">I", size_bytes)[0] if len(size_bytes) == 4 else 0
    raw = handle.read(size) if 0 < size < 4096 else b""
    try:
        header = json.loads(raw)
        int(header["chunk"])
        bytes.fromhex(header["nonce_prefix"])
    except (ValueError, KeyError, TypeError):
        raise BackupError(f"{where}: the backup is damaged or was changed (its header "
                          "cannot be read); nothing was restored",
                          hint="use another copy of the backup") from None
    if header.get("format") != FORMAT:
        raise BackupError(f"{where}: backup format {header.get('format')} is not one this "
                          f"version reads ({FORMAT})", hint="use the version that made it")
    return MAGIC + size_bytes + raw, header


def _open_sealed(handle: IO[bytes], key: bytes, where: str) -> Iterator[bytes]:
    """The plaintext chunks of a sealed file, each authenticated before it is given out."""
    header_bytes, header = _read_header(handle, where)
    if header.get("key_id") != key_id(key):
        raise BackupError(f"{where}: the backup was made with another key "
                          f"(key id {header.get('key_id')}; MAILER_BACKUP_KEY_FILE's is "
                          f"{key_id(key)}), or its header was changed",
                          hint="set MAILER_BACKUP_KEY_FILE to the key that was in use when it "
                               "was made")
    aead = AESGCM(key)
    prefix = bytes.fromhex(header["nonce_prefix"])
    size = int(header["chunk"]) + TAG
    number = 0
    current = handle.read(size)
    while True:
        following = handle.read(size)
        last = not following
        try:
            yield aead.decrypt(prefix + struct.pack(">I", number), current,
                               _aad(header_bytes, number, last))
        except InvalidTag:
            raise BackupError(
                f"{where}: the backup is damaged or was changed (chunk {number} fails its "
                "authentication check); nothing was restored",
                hint="use another copy of the backup") from None
        if last:
            return
        current, number = following, number + 1


@dataclass(frozen=True)
class Manifest:
    backend: str  # sqlite | postgresql
    schema: str | None  # the alembic revision of the dumped database
    created_at: str  # ISO 8601, UTC
    row_counts: dict[str, int]
    dump_bytes: int
    dump_sha256: str
    tool: str = ""  # pg_dump's version, for PostgreSQL

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        try:
            return cls(**json.loads(raw))
        except (ValueError, TypeError):
            raise BackupError(f"{where}: the backup's manifest cannot be read") from None

    @property
    def taken_at(self) -> datetime:
        return datetime.fromisoformat(self.created_at)


def _seal_file(dump: Path, manifest: Manifest, target: Path, key: bytes) -> int:
    """Write manifest + dump sealed to `target` atomically (a temporary name, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            writer = _SealedWriter(handle, key)
            body = manifest.to_json()
            writer.write(struct.pack(">I", len(body)) + body)
            with dump.open("rb") as source:
                while block := source.read(CHUNK):
                    writer.write(block)
            writer.close()
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return writer.written


def _unseal_file(path: Path, key: bytes, out: Path | None) -> Manifest:
    """Decrypt and check `path`; write the dump to `out` (or only check it). Raises on any
    damage: a changed byte, the wrong key, a checksum that does not match."""
    where = str(path)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise BackupError(f"{where}: {exc.strerror}") from None
    digest = hashlib.sha256()
    size = 0
    manifest: Manifest | None = None
    pending = bytearray()
    with handle, (out.open("wb") if out is not None else contextlib.nullcontext()) as sink:
        for plain in _open_sealed(handle, key, where):
            if manifest is None:
                pending += plain
                if len(pending) < 4:
                    continue
                length = struct.unpack(">I", pending[:4])[0]
                if len(pending) < 4 + length:
                    continue
                manifest = Manifest.from_json(bytes(pending[4:4 + length]), where)
                plain = bytes(pending[4 + length:])
            digest.update(plain)
            size += len(plain)
            if sink is not None:
                sink.write(plain)
    if manifest is None:
        raise BackupError(f"{where}: the backup holds no manifest")
    if size != manifest.dump_bytes or digest.hexdigest() != manifest.dump_sha256:
        raise BackupError(f"{where}: the dump does not match its manifest's checksum; "
                          "nothing was restored", hint="use another copy of the backup")
    return manifest


# ---------------------------------------------------------------- dumping

def _backend(url: str) -> str:
    name = make_url(normalise_url(url)).get_backend_name()
    if name not in ("sqlite", "postgresql"):
        raise BackupError(f"backups support SQLite and PostgreSQL, not {name}")
    return name


def _sqlite_path(url: str) -> Path:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise BackupError("an in-memory SQLite database cannot be backed up")
    return Path(database)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _count_rows(conn: Any, tables: list[str]) -> dict[str, int]:
    # The names come from the database's own catalogue, quoted: nothing a person typed.
    return {t: int(conn.execute(text(f"SELECT count(*) FROM {_quote(t)}")).scalar())  # noqa: S608
            for t in sorted(tables)}


def _sqlite_counts(path: Path) -> tuple[dict[str, int], str | None, str]:
    """Row counts, schema revision and integrity_check of a SQLite file (a dump)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        counts = {t: conn.execute(f"SELECT count(*) FROM {_quote(t)}").fetchone()[0]  # noqa: S608
                  for t in sorted(tables)}
        schema = None
        if "alembic_version" in tables:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            schema = row[0] if row else None
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
    return counts, schema, check


def _dump_sqlite(url: str, out: Path) -> Manifest:
    source = _sqlite_path(url)
    if not source.exists():
        raise BackupError(f"the database {source} does not exist")
    with contextlib.closing(sqlite3.connect(source, timeout=30)) as src, \
            contextlib.closing(sqlite3.connect(out)) as dst:
        src.execute("PRAGMA busy_timeout=30000")
        src.backup(dst)  # all pages in one step: one committed state, while the worker writes
        dst.execute("PRAGMA journal_mode=DELETE")  # a self-contained file, no -wal beside it
    counts, schema, _ = _sqlite_counts(out)
    return _manifest("sqlite", schema, counts, out)


def _manifest(backend: str, schema: str | None, counts: dict[str, int], dump: Path,
              tool: str = "") -> Manifest:
    digest = hashlib.sha256()
    with dump.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return Manifest(backend=backend, schema=schema, created_at=utcnow().isoformat(),
                    row_counts=counts, dump_bytes=dump.stat().st_size,
                    dump_sha256=digest.hexdigest(), tool=tool)


# -- PostgreSQL through pg_dump / pg_restore

def _libpq(url: str) -> tuple[str, dict[str, str]]:
    """A libpq URL without the password (it goes in PGPASSWORD, not on a command line)."""
    parsed: URL = make_url(normalise_url(url))
    env = dict(os.environ)
    if parsed.password:
        env["PGPASSWORD"] = str(parsed.password)
    plain = parsed.set(drivername="postgresql", password=None)
    return plain.render_as_string(hide_password=False), env


def _server_major(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(str(conn.execute(text("SHOW server_version_num")).scalar())) // 10000


def pg_tool(name: str, server_major: int, settings: Settings) -> tuple[str, str]:
    """The path and version of pg_dump or pg_restore that can work with this server."""
    candidates = []
    if settings.backup_pg_bin_dir is not None:
        candidates.append(settings.backup_pg_bin_dir / name)
    candidates.append(Path(f"/usr/lib/postgresql/{server_major}/bin/{name}"))
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    seen = []
    for path in candidates:
        if not path.exists():
            continue
        version = subprocess.run([str(path), "--version"], capture_output=True, text=True,
                                 check=False).stdout.strip()
        major = _tool_major(version)
        if major >= server_major:
            return str(path), version
        seen.append(f"{path} is version {major}")
    package = f"postgresql-client-{server_major}"
    if seen:
        raise BackupError(f"{name} is older than the PostgreSQL {server_major} server "
                          f"({'; '.join(seen)}), and an older {name} cannot read it",
                          hint=f"install {package} (Debian) or set MAILER_BACKUP_PG_BIN_DIR "
                               "to its bin directory")
    raise BackupError(f"{name} was not found; PostgreSQL backups need it",
                      hint=f"install {package} (Debian: apt-get install {package}; "
                           "postgresql-client gives the distribution's version) or set "
                           "MAILER_BACKUP_PG_BIN_DIR")


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BackupError(f"{what} failed: {done.stderr.strip()[-800:] or done.returncode}")


def _dump_postgresql(url: str, out: Path, settings: Settings) -> Manifest:
    engine = create_engine(normalise_url(url), poolclass=NullPool)
    try:
        tool, version = pg_tool("pg_dump", _server_major(engine), settings)
        libpq, env = _libpq(url)
        with engine.connect() as conn:
            # Counts and dump from one snapshot: ours, exported to pg_dump and held open.
            conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
            snapshot = conn.execute(text("SELECT pg_export_snapshot()")).scalar()
            tables = inspect(conn).get_table_names()
            counts = _count_rows(conn, tables)
            schema = (conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
                      if "alembic_version" in tables else None)
            _run([tool, "--format=custom", f"--snapshot={snapshot}", "--no-owner",
                  "--no-privileges", f"--file={out}", f"--dbname={libpq}"], env, "pg_dump")
            conn.rollback()
    finally:
        engine.dispose()
    return _manifest("postgresql", schema, counts, out, tool=version)


# ---------------------------------------------------------------- the commands

@dataclass(frozen=True)
class Made:
    path: Path
    manifest: Manifest
    size: int  # bytes on disk, sealed


def default_path(settings: Settings, now: datetime | None = None) -> Path:
    return backup_dir(settings) / f"mailer-{(now or utcnow()):%Y%m%dT%H%M%SZ}{SUFFIX}"


def backup_dir(settings: Settings) -> Path:
    return settings.backups


def create(settings: Settings, path: Path | None = None, *, now: datetime | None = None) -> Made:
    """Back the database up into one sealed file at `path` (default: the backup directory)."""
    key = load_key(settings)
    url = settings.database
    backend = _backend(url)
    target = path or default_path(settings, now)
    if target.exists():
        raise BackupError(f"{target} already exists; a backup is never overwritten")
    with tempfile.TemporaryDirectory(prefix="mailer-backup-",
                                     dir=target.parent if target.parent.exists() else None
                                     ) as tmp:
        os.chmod(tmp, 0o700)
        dump = Path(tmp) / "dump"
        manifest = (_dump_sqlite(url, dump) if backend == "sqlite"
                    else _dump_postgresql(url, dump, settings))
        size = _seal_file(dump, manifest, target, key)
    log.info("backup: %s (%s bytes sealed, schema %s)", target, size, manifest.schema)
    return Made(target, manifest, size)


def verify(settings: Settings, path: Path) -> Manifest:
    """Decrypt and check a backup without touching the database: authentication of every
    chunk, the dump's checksum, and the dump itself (SQLite: integrity_check and the row counts
    of the manifest; PostgreSQL: pg_restore reads its table of contents)."""
    key = load_key(settings)
    with tempfile.TemporaryDirectory(prefix="mailer-verify-") as tmp:
        os.chmod(tmp, 0o700)
        dump = Path(tmp) / "dump"
        manifest = _unseal_file(path, key, dump)
        _check_dump(settings, manifest, dump, str(path))
    return manifest


def _check_dump(settings: Settings, manifest: Manifest, dump: Path, where: str) -> None:
    if manifest.backend == "sqlite":
        try:
            counts, schema, check = _sqlite_counts(dump)
        except sqlite3.DatabaseError as exc:
            raise BackupError(f"{where}: the dumped database cannot be read: {exc}") from None
        if check != "ok" or counts != manifest.row_counts or schema != manifest.schema:
            raise BackupError(f"{where}: the dumped database does not match its manifest "
                              f"(integrity check: {check})")
        return
    major = _tool_major(manifest.tool)
    tool, _ = pg_tool("pg_restore", major, settings)
    _run([tool, "--list", str(dump)], dict(os.environ), "pg_restore --list")


def _tool_major(version: str) -> int:
    """15 from 'pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)'; 0 if unreadable."""
    match = re.search(r"\(PostgreSQL\)\s*(\d+)", version)
    return int(match.group(1)) if match else 0


@dataclass
class Restored:
    manifest: Manifest
    upgraded_from: str | None = None  # the backup's older schema, when it was upgraded
    paused: list[str] = field(default_factory=list)  # slugs of the editions now paused
    released: int = 0  # deliveries claimed at backup time, now due again (ambiguous)


def holds_data(engine: Engine) -> dict[str, int]:
    """The tables of DATA_TABLES that have rows, with their counts (empty: nothing to lose)."""
    with engine.connect() as conn:
        present = set(inspect(conn).get_table_names())
        return {t: n for t, n in _count_rows(conn, [t for t in DATA_TABLES if t in present])
                .items() if n}


def restore(settings: Settings, path: Path, *, force: bool = False,
            now: datetime | None = None) -> Restored:
    """Replace the database with the backup at `path`. Checked in full first; refuses a newer
    schema, a backup of the other backend, and a database with data unless `force`."""
    key = load_key(settings)
    url = settings.database
    backend = _backend(url)
    with tempfile.TemporaryDirectory(prefix="mailer-restore-") as tmp:
        os.chmod(tmp, 0o700)
        dump = Path(tmp) / "dump"
        manifest = _unseal_file(path, key, dump)
        where = str(path)
        if manifest.backend != backend:
            raise BackupError(f"{where} is a {manifest.backend} backup; the database "
                              f"({backend}) cannot take it", hint="restore it into a "
                              f"{manifest.backend} database")
        head = migrations.head_revision()
        if manifest.schema is not None and manifest.schema not in migrations.known_revisions():
            raise BackupError(
                f"{where} is from a newer schema ({manifest.schema}) than this version of "
                f"mailer knows (newest: {head}); nothing was restored",
                hint="restore it with the version of mailer that made it, or a newer one")
        _check_dump(settings, manifest, dump, where)
        engine = make_engine(url, poolclass=NullPool)
        try:
            found = holds_data(engine) if _exists(url) else {}
            if found and not force:
                held = ", ".join(f"{n} {t}" for t, n in found.items())
                raise BackupError(f"the database already holds data ({held}); a restore "
                                  "replaces all of it", hint="restore into an empty database, "
                                  "or add --force to replace this one")
            if backend == "sqlite":
                _restore_sqlite(url, dump)
            else:
                _restore_postgresql(engine, url, dump, settings, manifest)
        finally:
            engine.dispose()
    report = Restored(manifest)
    if manifest.schema != head:
        report.upgraded_from = manifest.schema
        migrations.upgrade(url)
    engine = make_engine(url, poolclass=NullPool)
    try:
        with session_scope(session_factory(engine)) as session:
            taken = manifest.taken_at.astimezone(UTC)
            report.paused = outbox.pause_all(
                session, f"restored from the backup of {outbox.uk_time(taken)}: check what "
                         "went out since, then resume")
            report.released = outbox.release_orphans(session, now)
            from mailer import audit

            audit.record(session, actor="cli", via="cli", action="backup.restore",
                         target=path.name, detail={"taken": manifest.created_at,
                                                   "paused": report.paused,
                                                   "upgraded_from": report.upgraded_from})
    finally:
        engine.dispose()
    log.info("restored %s (taken %s); paused: %s", path, manifest.created_at,
                ", ".join(report.paused) or "nothing")
    return report


def _exists(url: str) -> bool:
    return _backend(url) != "sqlite" or _sqlite_path(url).exists()


def _restore_sqlite(url: str, dump: Path) -> None:
    """Copy the dump into the database file with the backup API (one transaction on the
    target), holding the worker's and the scheduler's lock files so neither runs meanwhile."""
    from filelock import FileLock, Timeout

    target = _sqlite_path(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    locks = [FileLock(str(target) + suffix, is_singleton=False)
             for suffix in (".worker.lock", ".scheduler.lock")]
    held: list[FileLock] = []
    try:
        for lock in locks:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                what = "a worker" if "worker" in lock.lock_file else "a scheduler"
                raise BackupError(f"{what} is running on {target}; stop it before restoring",
                                  hint="stop `mailer worker`, `mailer scheduler` and "
                                       "`mailer run`, then restore") from None
            held.append(lock)
        with contextlib.closing(sqlite3.connect(dump)) as src, \
                contextlib.closing(sqlite3.connect(target, timeout=30)) as dst:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=WAL")
    finally:
        for lock in held:
            lock.release(force=True)


def _restore_postgresql(engine: Engine, url: str, dump: Path, settings: Settings,
                        manifest: Manifest) -> None:
    with engine.connect() as conn:
        others: list[str] = list(conn.execute(text(
            "SELECT coalesce(nullif(application_name, ''), 'a client') FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalars())
    if others:
        raise BackupError(f"{len(others)} other session(s) use the database "
                          f"({', '.join(sorted(set(others)))}); stop them before restoring",
                          hint="stop the web app, the workers and the scheduler, then restore")
    tool, _ = pg_tool("pg_restore", max(_server_major(engine), _tool_major(manifest.tool)),
                      settings)
    libpq, env = _libpq(url)
    # One transaction: a restore that fails half way leaves the database as it was.
    _run([tool, "--clean", "--if-exists", "--no-owner", "--no-privileges",
          "--single-transaction", "--exit-on-error", f"--dbname={libpq}", str(dump)], env,
         "pg_restore")
    # pg_restore brings no planner statistics: until autovacuum gets to it, the worker's
    # claims and re-checks would be planned as scans (measured: a resumed send ran at half speed).
    with engine.begin() as conn:
        conn.execute(text("ANALYZE"))


# ---------------------------------------------------------------- the schedule's side

def backups(settings: Settings) -> list[tuple[datetime, Path]]:
    """The scheduled backups in the backup directory, oldest first, by the time in their name."""
    directory = backup_dir(settings)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = NAME.match(entry.name)
        if match:
            found.append((datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ")
                          .replace(tzinfo=UTC), entry))
    return sorted(found)


def last_backup_age(settings: Settings, now: datetime | None = None) -> timedelta | None:
    """How old the newest backup in the backup directory is; None when there is none."""
    found = backups(settings)
    return (now or utcnow()) - found[-1][0] if found else None


def prune(settings: Settings) -> list[Path]:
    """Delete all but the newest `backup_keep` backups of the backup directory."""
    found = backups(settings)
    gone = [p for _, p in found[:max(0, len(found) - settings.backup_keep)]]
    for path in gone:
        path.unlink(missing_ok=True)
    return gone


def backup_due(settings: Settings, now: datetime | None = None) -> bool:
    """Whether the schedule wants a backup now: on, and the last is older than the interval."""
    if not settings.backup_every_hours or settings.backup_key_file is None:
        return False
    age = last_backup_age(settings, now)
    return age is None or age >= timedelta(hours=settings.backup_every_hours)


def take_scheduled(settings: Settings, now: datetime | None = None) -> Made | None:
    """The scheduler's backup: one into the backup directory when due, then the oldest pruned."""
    if not backup_due(settings, now):
        return None
    made = create(settings, now=now)
    for gone in prune(settings):
        log.info("backup: pruned %s", gone)
    return made
