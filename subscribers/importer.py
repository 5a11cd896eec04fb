"""CSV in, report out. All or nothing: one bad row and nothing is written, and every bad row is
named with its line and the reason.

A dry run (the default) reads and checks everything, against the database too, and writes
nothing. `apply=True` inserts in batches inside one transaction and rolls it all back if any row
turns out bad, so memory stays flat however long the file is. Existing subscribers are left as
they are, and people who left or whose address is suppressed are never brought back by an import:
importing the same file twice changes nothing the second time.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from subscribers import store
from subscribers.errors import ImportFileError, InvalidInput
from subscribers.models import LEFT, Channel, Topic
from subscribers.rules import Rules
from subscribers.validation import email_hmac

MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_CELL = 2000
BATCH = 2000

COLUMNS = ("email", "name", "organisation", "organisation_type", "role", "region", "topics")
_ALIASES = {
    "e_mail": "email", "email_address": "email", "e_mail_address": "email", "address": "email",
    "full_name": "name", "organisation_name": "organisation", "organization": "organisation",
    "org": "organisation", "agency": "organisation_type", "organisation_type": "organisation_type",
    "organization_type": "organisation_type", "org_type": "organisation_type",
    "force": "region", "area": "region", "topic": "topics", "lists": "topics",
}
# Bytes that Windows-1252 leaves undefined: a file holding them is not Windows-1252 either.
_CP1252_UNDEFINED = re.compile(rb"[\x81\x8d\x8f\x90\x9d]")


@dataclass(frozen=True)
class RowProblem:
    line: int
    field: str
    message: str


@dataclass
class ImportReport:
    source: str
    sha256: str
    encoding: str
    delimiter: str
    rows: int = 0
    new: int = 0
    blank: int = 0
    existing: list[tuple[int, str]] = field(default_factory=list)  # (line, status): unchanged
    kept_out: list[RowProblem] = field(default_factory=list)  # left or suppressed: never re-added
    errors: list[RowProblem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    applied: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(frozen=True)
class Options:
    lawful_basis: str
    default_topics: Sequence[str] = ("newsletter",)
    source: str | None = None  # defaults to the file's name
    actor: str | None = None
    encoding: str | None = None  # force one; otherwise UTF-8 (with or without BOM) or cp1252


def decode(data: bytes, forced: str | None = None) -> tuple[str, str]:
    """The file's text and the encoding it was read with; refuses what it cannot read safely."""
    if forced:
        try:
            return data.decode(forced), forced
        except (LookupError, UnicodeDecodeError) as exc:
            raise ImportFileError(f"cannot read the file as {forced}: {exc}") from None
    # UTF-32's little-endian mark begins with UTF-16's, so it is looked for first.
    for marks, encoding in (((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"), "utf-32"),
                            ((b"\xff\xfe", b"\xfe\xff"), "utf-16")):
        if data.startswith(marks):
            return _decode_marked(data, encoding), encoding
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as exc:
        bad = exc.start
    if not _CP1252_UNDEFINED.search(data):
        return data.decode("cp1252"), "windows-1252"
    line = data[:bad].count(b"\n") + 1
    raise ImportFileError(
        f"the file is not UTF-8 (line {line} has bytes that are not UTF-8) and not Windows-1252; "
        "save it as 'CSV UTF-8' or give --encoding")


def _decode_marked(data: bytes, encoding: str) -> str:
    """`data` as the `encoding` its byte-order mark names, or a refusal naming where it stops
    being that (an odd byte at the end, a lone surrogate, a code point past U+10FFFF)."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[:exc.start].decode(encoding, errors="replace").count("\n") + 1
        raise ImportFileError(
            f"the file starts with a {encoding.upper()} byte-order mark but is not "
            f"{encoding.upper()} (line {line}, byte {exc.start}: {exc.reason}); "
            "save it as 'CSV UTF-8'") from None


def _sniff_delimiter(first_line: str) -> str:
    counts = {d: first_line.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _header(cells: list[str]) -> tuple[list[str | None], list[str]]:
    names: list[str | None] = []
    warnings = []
    for cell in cells:
        key = re.sub(r"[^a-z0-9]+", "_", cell.strip().lstrip("\ufeff").lower()).strip("_")
        key = _ALIASES.get(key, key)
        if key in COLUMNS:
            if key in names:
                raise ImportFileError(f"the header names the column '{key}' twice")
            names.append(key)
        else:
            names.append(None)
            warnings.append(f"column '{cell.strip()[:40]}' is not one we keep; it was ignored")
    if "email" not in names:
        raise ImportFileError(
            f"the header has no email column (found: {', '.join(c.strip() for c in cells)[:200]}; "
            f"expected some of: {', '.join(COLUMNS)})")
    return names, warnings


def _split_topics(cell: str) -> list[str]:
    return [t for t in re.split(r"[|;,\s]+", cell.strip().lower()) if t]


def import_file(sessions: sessionmaker[Session], rules: Rules, path: Path, options: Options,
                apply: bool = False,
                progress: Callable[[int, int], None] | None = None,
                on_apply: Callable[[Session, ImportReport], None] | None = None
                ) -> ImportReport:
    """Check (and with `apply`, import) a CSV of subscribers; see the module docstring.
    `on_apply` runs in the import's own transaction just before it commits (the audit entry:
    the import and its record are one unit)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImportFileError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ImportFileError(f"{path.name} is larger than {MAX_FILE_BYTES // 2**20} MiB")
    text, encoding = decode(data, options.encoding)
    if not text.strip():
        raise ImportFileError(f"{path.name} is empty")
    first_line = text.split("\n", 1)[0]
    delimiter = _sniff_delimiter(first_line)
    sha256 = hashlib.sha256(data).hexdigest()
    report = ImportReport(source=options.source or path.name, sha256=sha256, encoding=encoding,
                          delimiter=delimiter)
    if encoding == "windows-1252":
        report.warnings.append("the file is not UTF-8; it was read as Windows-1252")
    del data
    total_lines = text.count("\n") + 1

    with sessions() as session:
        _run(session, rules, _lines(text), options, report, apply, progress, total_lines)
        if apply and report.ok:
            if report.new >= 1000:
                store.refresh_statistics(session)
            report.applied = True
            if on_apply is not None:
                on_apply(session, report)
            session.commit()
        else:
            session.rollback()
    return report


_LINE = re.compile(r".*?(?:\r\n|\r|\n)|.+", re.DOTALL)


def _lines(text: str) -> Iterator[str]:
    """The lines of `text` with their ends, split at CRLF, CR or LF, as `csv` wants them (what
    a file opened with newline="" gives), one at a time: `io.StringIO` would hold another
    copy of the whole file at four bytes a character (1 GB for the 200 MiB limit)."""
    for match in _LINE.finditer(text):
        yield match.group()


def _run(session: Session, rules: Rules, stream: Iterator[str], options: Options,
         report: ImportReport, apply: bool, progress: Callable[[int, int], None] | None,
         total_lines: int) -> None:
    reader = csv.reader(stream, delimiter=report.delimiter, strict=True)
    try:
        columns, warnings = _header(next(reader))
    except csv.Error as exc:
        raise ImportFileError(f"line 1: the header is not valid CSV ({exc})") from None
    report.warnings.extend(warnings)
    topics = {t.slug: t for t in store.list_topics(session)}
    defaults = [topics[s] for s in options.default_topics if s in topics]
    unknown_defaults = [s for s in options.default_topics if s not in topics]
    if unknown_defaults:
        raise ImportFileError(f"unknown topic {', '.join(unknown_defaults)} "
                              f"(topics: {', '.join(topics)})")
    ctx = store.Context(channel=Channel.IMPORT, actor=options.actor,
                        lawful_basis=options.lawful_basis,
                        detail={"source": report.source, "file_sha256": report.sha256})
    seen: dict[str, int] = {}
    batch: list[tuple[int, store.Profile, list[Topic]]] = []

    def flush() -> None:
        _check_batch(session, rules, batch, report, ctx, write=apply and report.ok)
        batch.clear()
        if progress:
            progress(reader.line_num, total_lines)

    line = 1
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            report.errors.append(RowProblem(start, "file", f"not valid CSV here ({exc}); "
                                            "the rest of the file was not read"))
            break
        line = start
        if not any(c.strip() for c in cells):
            report.blank += 1
            continue
        report.rows += 1
        problem = _row_problem(cells, columns, line)
        if problem:
            report.errors.append(problem)
            continue
        row = {name: cell for name, cell in zip(columns, cells, strict=False) if name}
        try:
            profile = store.profile_from(
                rules, email=row.get("email"), name=row.get("name"),
                organisation=row.get("organisation"),
                organisation_type=row.get("organisation_type"), role=row.get("role"),
                region=row.get("region"))
        except InvalidInput as exc:
            report.errors.append(RowProblem(line, exc.field, str(exc)))
            continue
        wanted = _split_topics(row.get("topics") or "")
        missing = [t for t in wanted if t not in topics]
        if missing:
            report.errors.append(RowProblem(
                line, "topics", f"unknown topic '{missing[0][:40]}' (topics: {', '.join(topics)})"))
            continue
        if profile.key in seen:
            report.errors.append(RowProblem(
                line, "email", f"the same address as line {seen[profile.key]}"))
            continue
        seen[profile.key] = line
        batch.append((line, profile, [topics[t] for t in wanted] or defaults))
        if len(batch) >= BATCH:
            flush()
    flush()


def _row_problem(cells: list[str], columns: list[str | None], line: int) -> RowProblem | None:
    if len(cells) > len(columns) and any(c.strip() for c in cells[len(columns):]):
        return RowProblem(line, "row", f"{len(cells)} cells, but the header has {len(columns)} "
                                       "(a stray delimiter or an unquoted comma?)")
    for name, cell in zip(columns, cells, strict=False):
        if len(cell) > MAX_CELL:
            return RowProblem(line, name or "row", f"a cell is longer than {MAX_CELL} characters")
        if "\x00" in cell:
            return RowProblem(line, name or "row", "a cell contains a NUL byte")
    return None


def _check_batch(session: Session, rules: Rules,
                 batch: list[tuple[int, store.Profile, list[Topic]]], report: ImportReport,
                 ctx: store.Context, write: bool) -> None:
    if not batch:
        return
    existing = store.existing_by_key(session, [p.key for _, p, _ in batch])
    digests = {p.key: email_hmac(rules, p.key) for _, p, _ in batch}
    suppressed = store.suppressed_among(session, list(digests.values()))
    new = []
    for line, profile, topics in batch:
        status = existing.get(profile.key)
        if status in LEFT:
            report.kept_out.append(RowProblem(
                line, "email", f"this person is {status}; an import never re-subscribes them"))
        elif status is not None:
            report.existing.append((line, status))
        elif digests[profile.key] in suppressed:
            report.kept_out.append(RowProblem(
                line, "email", "this address is suppressed (erased, bounced or complained)"))
        else:
            new.append((profile, topics))
    report.new += len(new)
    if write:
        store.bulk_add_active(session, rules, new, ctx, digests)
