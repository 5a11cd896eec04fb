"""Word (.docx) -> edition source: the co-ordinators write the newsletter in Word.

    check the package  -> refuse what is not a plain .docx (see `open_package`), before any
                          XML is parsed: every member read under a cap, in memory
    mammoth            -> simple HTML that keeps the meaning (headings, lists, tables, links,
                          images with Word's alt text), not the looks
    convert            -> the edition's Markdown: the title paragraph and the masthead lines
                          give title, issue and date; each heading a section; a Word table a
                          figures table (numbers right-aligned); a run of dated lines a
                          {.dates} section; a list of links a {.links} section
    validate           -> `mailer.edition.parse_edition`, the same rules as any edition; each
                          problem is named by where it is in the Word document (the heading
                          and the paragraph's opening words), since the author never sees the
                          Markdown lines
    store images       -> `mailer.media`, only when nothing was refused

The result (`ImportResult`) is the source text, the problems to fix and the images stored; a
refused file raises `WordImportError` and stores nothing.
"""

from __future__ import annotations

import datetime as dt
import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree as ET

import yaml

from mailer import media
from mailer.config import Settings
from mailer.edition import EditionErrors, parse_edition
from mailer.errors import EditionError, MailerError

MAX_FILE_BYTES = 20 * 1024 * 1024
# Unpacked, a newsletter with a few photographs is a few MB; a zip bomb is gigabytes.
MAX_UNPACKED_BYTES = 100 * 1024 * 1024
MAX_MEMBERS = 2000
OLE_SIGNATURE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
DOCX_MAIN = "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"
MACRO_TYPES = ("application/vnd.ms-word.document.macroEnabled.main+xml",
               "application/vnd.ms-word.template.macroEnabledTemplate.main+xml",
               "application/vnd.ms-office.vbaProject")
# The title and subtitle as Word styles them; the rest is mammoth's default map. A style map
# embedded in the document is ignored: the document does not choose our HTML.
STYLE_MAP = """
p[style-name='Title'] => h1.title:fresh
p[style-name='Subtitle'] => p.subtitle:fresh
"""
MONTHS = {name.lower(): number for number, name in enumerate(
    ["January", "February", "March", "April", "May", "June", "July", "August", "September",
     "October", "November", "December"], start=1)}
_MONTH = (r"(?P<month>Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|"
          r"Aug(?:ust)?|Sept?(?:ember)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
_DAY = r"(?P<day>\d{1,2})(?:st|nd|rd|th)?"
_YEAR = r"(?:,?\s+(?P<year>\d{4}))?"
DATED_LINE = re.compile(
    rf"^\s*(?P<bold>\*\*|__)?(?:{_DAY}\s+{_MONTH}|{_MONTH.replace('month', 'month2')}\s+"
    rf"{_DAY.replace('day', 'day2')}){_YEAR}(?P=bold)?\s*(?:[:,–—-]\s*)?(?P<what>\S.*)$",
    re.IGNORECASE)
_ISSUE = re.compile(r"\bissue\s*(?:no\.?|number|#)?\s*(\d{1,4})\b", re.IGNORECASE)
_ORDINALS = {word: n for n, word in enumerate(
    ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
     "tenth", "eleventh", "twelfth"], start=1)}
_ORDINAL_ISSUE = re.compile(rf"\b({'|'.join(_ORDINALS)})\s+issue\b", re.IGNORECASE)
_FULL_DATE = re.compile(rf"\b{_DAY}\s+{_MONTH}\s+(?P<year>\d{{4}})\b", re.IGNORECASE)
_MONTH_YEAR = re.compile(rf"\b{_MONTH}\s+(?P<year>\d{{4}})\b", re.IGNORECASE)
_ISO_DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
_NUMBER = re.compile(r"^[£$€]?[\d,.]+%?$")


class WordImportError(MailerError):
    """A document that cannot be imported at all; nothing was stored. `missing` lists the
    details (title, issue, date) to give when that is the only reason."""

    def __init__(self, message: str, hint: str | None = None,
                 missing: list[str] | None = None) -> None:
        super().__init__(message, hint)
        self.missing = missing or []


@dataclass(frozen=True)
class Problem:
    where: str  # in the Word document: the heading and the paragraph's opening words
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class ImportResult:
    source: str
    problems: list[Problem]
    media: list[media.StoredImage]
    title: str
    issue: int
    date: dt.date

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class Details:
    """What the front matter needs that a document may not say; given ones win."""

    title: str | None = None
    issue: int | None = None
    date: dt.date | None = None
    subject: str | None = None
    preheader: str | None = None
    topic: str = "newsletter"


# ---- 1. the package ----

def open_package(data: bytes, name: str = "document.docx") -> dict[str, bytes]:
    """Every member of a plain .docx, read under the caps; raises WordImportError saying why
    the file is refused: not a .docx (.doc, corrupt), macros (.docm), a password, too big,
    a zip bomb, or XML with a DOCTYPE or ENTITY declaration (external entities)."""
    lower = name.lower()
    if len(data) > MAX_FILE_BYTES:
        raise WordImportError(f"{name} is {len(data) / 1024 / 1024:.1f} MB; the limit is "
                              f"{MAX_FILE_BYTES // 1024 // 1024} MB",
                              hint="make the pictures in it smaller (Word: Compress Pictures)")
    if data.startswith(OLE_SIGNATURE):
        if "EncryptedPackage".encode("utf-16-le") in data:
            raise WordImportError(f"{name} is protected with a password, so it cannot be read",
                                  hint="remove the password in Word (File > Info > Protect "
                                       "Document) and save it again")
        raise WordImportError(f"{name} is an old-style Word document (.doc, Word 97-2003)",
                              hint="open it in Word and save it as a Word Document (.docx)")
    if lower.endswith((".docm", ".dotm")):
        raise WordImportError(f"{name} is a macro-enabled document (.docm); macros are "
                              "never accepted", hint="save it as a Word Document (.docx)")
    if lower.endswith(".doc"):
        raise WordImportError(f"{name} is named as an old-style .doc file",
                              hint="open it in Word and save it as a Word Document (.docx)")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError):
        if data.startswith(b"PK"):
            raise WordImportError(f"{name} is damaged: the file is cut short or broken",
                                  hint="open it in Word and save it again, or send it "
                                       "again") from None
        raise WordImportError(f"{name} is not a Word document (.docx)",
                              hint="save it from Word as a Word Document (.docx)") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > MAX_MEMBERS:
            raise WordImportError(f"{name} has {len(infos)} parts; a Word document has a few "
                                  "dozen: refused")
        declared = sum(info.file_size for info in infos)
        if declared > MAX_UNPACKED_BYTES:
            raise _bomb(name)
        members: dict[str, bytes] = {}
        budget = MAX_UNPACKED_BYTES
        for info in infos:
            if info.is_dir():
                continue
            if info.flag_bits & 0x1:
                raise WordImportError(f"{name} is encrypted and cannot be read")
            chunks = []
            try:
                # Counted as it is read: the sizes in a zip's directory can lie.
                with archive.open(info) as member:
                    while chunk := member.read(1 << 16):
                        budget -= len(chunk)
                        if budget < 0:
                            raise _bomb(name)
                        chunks.append(chunk)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError,
                    zipfile.LargeZipFile) as exc:
                raise WordImportError(f"{name} is damaged ({info.filename}: {exc})",
                                      hint="open it in Word and save it again") from None
            members[info.filename] = b"".join(chunks)
    for part, content in members.items():
        # Every part that is XML, whatever its name says (.xml, .rels, .vml, ...).
        if content.lstrip()[:1] in (b"<", b"\xef", b"\xff", b"\xfe") and _declares_dtd(content):
            raise WordImportError(
                f"{name} has a DOCTYPE or ENTITY declaration in {part}, which Word never "
                "writes and which can make a reader fetch or expand other files: refused")
    if "[Content_Types].xml" not in members or "word/document.xml" not in members:
        raise WordImportError(f"{name} is not a Word document (.docx): it has no "
                              "word/document.xml", hint="save it from Word as .docx")
    main = _main_content_type(members["[Content_Types].xml"], name)
    if main in MACRO_TYPES or any(p.lower().endswith("vbaproject.bin") for p in members):
        raise WordImportError(f"{name} contains macros (it is a .docm inside); macros are "
                              "never accepted", hint="save it as a Word Document (.docx)")
    if main != DOCX_MAIN:
        raise WordImportError(f"{name} is not a Word document (its main part is {main!r})",
                              hint="save it from Word as a Word Document (.docx)")
    return members


def _bomb(name: str) -> WordImportError:
    return WordImportError(f"{name} would unpack to more than "
                           f"{MAX_UNPACKED_BYTES // 1024 // 1024} MB: refused as a possible "
                           "zip bomb")


def _declares_dtd(content: bytes) -> bool:
    if content.startswith((b"\xff\xfe", b"\xfe\xff")):
        content = content.decode("utf-16", "replace").encode("utf-8")
    head = content.upper()
    return b"<!DOCTYPE" in head or b"<!ENTITY" in head


def _main_content_type(types_xml: bytes, name: str) -> str:
    try:
        root = ET.fromstring(types_xml)  # noqa: S314 - checked above: no DTD, no entities
    except ET.ParseError as exc:
        raise WordImportError(f"{name} is damaged ([Content_Types].xml: {exc})") from None
    for element in root:
        if (element.tag.endswith("Override")
                and element.get("PartName", "").lower() == "/word/document.xml"):
            return element.get("ContentType", "")
    return ""


def _core_title(members: dict[str, bytes]) -> str | None:
    core = members.get("docProps/core.xml")
    if not core:
        return None
    try:
        root = ET.fromstring(core)  # noqa: S314 - checked: no DTD, no entities
    except ET.ParseError:
        return None
    for element in root:
        if element.tag.endswith("}title") and (element.text or "").strip():
            return " ".join((element.text or "").split())
    return None


# ---- 2. mammoth ----

@dataclass
class _Picture:
    data: bytes
    alt: str
    content_type: str


def _to_html(members: dict[str, bytes], name: str) -> tuple[str, list[_Picture]]:
    import mammoth

    pictures: list[_Picture] = []

    def collect(image: Any) -> dict[str, str]:
        with image.open() as stream:
            data = stream.read()
        pictures.append(_Picture(data, (image.alt_text or "").strip(), image.content_type or ""))
        return {"src": f"picture:{len(pictures) - 1}"}

    # Only the members we read under the caps, repacked uncompressed: mammoth never sees
    # the original archive.
    repacked = io.BytesIO()
    with zipfile.ZipFile(repacked, "w", zipfile.ZIP_STORED) as out:
        for part, content in members.items():
            out.writestr(part, _slim_styles(content) if part == "word/styles.xml" else content)
    repacked.seek(0)
    try:
        result = mammoth.convert_to_html(repacked, style_map=STYLE_MAP,
                                         include_embedded_style_map=False,
                                         convert_image=mammoth.images.img_element(collect))
    except Exception as exc:  # mammoth's own errors have no family: any is a damaged file
        raise WordImportError(f"{name} is damaged: its text cannot be read "
                              f"({type(exc).__name__}: {exc})",
                              hint="open it in Word and save it again") from None
    return result.value, pictures


_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"


def _slim_styles(xml: bytes) -> bytes:
    """styles.xml with only what mammoth reads of it: each style's type, id and name, and a
    numbering style's list. Word writes every style's formatting and hundreds of latent
    styles (350 KB), which mammoth's minidom parser took a second to read."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 - checked: no DTD, no entities
    except ET.ParseError:
        return xml  # mammoth reports it
    slim = ET.Element(f"{_W}styles")
    for style in root.iter(f"{_W}style"):
        kept = ET.SubElement(slim, f"{_W}style", {k: v for k, v in style.attrib.items()
                                                  if k in (f"{_W}type", f"{_W}styleId")})
        name = style.find(f"{_W}name")
        if name is not None:
            kept.append(name)
        num_id = style.find(f"{_W}pPr/{_W}numPr/{_W}numId")
        if num_id is not None:
            ET.SubElement(ET.SubElement(ET.SubElement(kept, f"{_W}pPr"), f"{_W}numPr"),
                          f"{_W}numId", num_id.attrib)
    data: bytes = ET.tostring(slim, encoding="utf-8")
    return data


# ---- 3. HTML -> blocks ----

@dataclass
class _Block:
    kind: str  # "heading", "paragraph", "list", "table", "image"
    level: int = 0  # heading level
    text: str = ""  # inline Markdown (paragraph, heading)
    plain: str = ""  # the words, for locations and recognising
    # list items: (depth, ordered, Markdown, plain words)
    items: list[tuple[int, bool, str, str]] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    merged: bool = False
    css: str = ""
    pictures: list[str] = field(default_factory=list)  # picture:N keys in this block


_INLINE_ESCAPE = re.compile(r"([\\`*_\[\]<>|])")
_ENTITY_LIKE = re.compile(r"&(?=#?[A-Za-z0-9]+;)")
_LINE_START = re.compile(r"^([#+=>-]|`{3}|~{3})|^(\d+)([.)])")


def _escape(text: str) -> str:
    return _ENTITY_LIKE.sub(r"\\&", _INLINE_ESCAPE.sub(r"\\\1", text))


def _escape_line_start(text: str) -> str:
    """A paragraph that starts like a heading, list, quote or fence stays a paragraph."""
    return _LINE_START.sub(lambda m: f"\\{m[1]}" if m[1] else f"{m[2]}\\{m[3]}",
                           text.lstrip(), count=1)


def _href(value: str) -> str:
    cleaned = re.sub(r"[\x00-\x20\x7f]+", lambda m: "%20" if m[0] == " " else "", value.strip())
    for char, code in (("(", "%28"), (")", "%29"), ("<", "%3C"), (">", "%3E"), ("\\", "%5C")):
        cleaned = cleaned.replace(char, code)
    return cleaned


class _Inline:
    """One element's inline content as Markdown, and as plain words."""

    def __init__(self, images: dict[str, str], in_table: bool = False) -> None:
        self.images = images  # picture:N -> its final URL
        self.in_table = in_table
        self.pictures: list[str] = []  # picture:N keys met, accepted or not

    def render(self, element: ET.Element) -> tuple[str, str]:
        md = "".join(self._parts(element, outer=True))
        md = re.sub(r"[ \t\r\n]+", " ", md).strip() if self.in_table else self._tidy(md)
        plain = " ".join(_plain(element).split())
        return md, plain

    @staticmethod
    def _tidy(md: str) -> str:
        lines = [re.sub(r"[ \t\r\n]+", " ", line).strip() for line in md.split("\\\n")]
        return "\\\n".join(_escape_line_start(line) for line in lines if line)

    def _parts(self, element: ET.Element, outer: bool = False) -> Iterator[str]:
        if not outer:
            yield from self._element(element)
            return
        if element.text:
            yield _escape(element.text)
        for child in element:
            if child.tag in ("ul", "ol", "table"):
                continue  # nested blocks are their own blocks
            yield from self._element(child)
            if child.tail:
                yield _escape(child.tail)

    def _inner(self, element: ET.Element) -> str:
        out = [_escape(element.text or "")]
        for child in element:
            out.extend(self._element(child))
            out.append(_escape(child.tail or ""))
        return "".join(out)

    def _element(self, element: ET.Element) -> Iterator[str]:
        tag = element.tag
        if tag in ("strong", "b", "em", "i"):
            inner = self._inner(element)
            mark = "**" if tag in ("strong", "b") else "*"
            stripped = inner.strip()
            if not stripped:
                yield inner
                return
            if mark in stripped:  # already emphasised inside: keep the words
                yield inner
                return
            lead = inner[:len(inner) - len(inner.lstrip())]
            trail = inner[len(inner.rstrip()):]
            yield f"{lead}{mark}{stripped}{mark}{trail}"
        elif tag == "a":
            href = element.get("href")
            inner = self._inner(element).strip()
            if href is None:  # a bookmark, not a link
                yield inner
            else:
                yield f"[{inner or _escape(href)}]({_href(href)})"
        elif tag == "br":
            yield " " if self.in_table else "\\\n"
        elif tag == "img":
            self.pictures.append(element.get("src", ""))
            src = self.images.get(element.get("src", ""), "")
            alt = " ".join((element.get("alt") or "").split())
            if src:
                yield f"![{_escape(alt)}]({src})"
        elif tag in ("ul", "ol", "table"):
            return
        elif tag == "p":  # paragraphs inside a table cell
            yield self._inner(element) + " "
        else:  # u, s, sup, sub, span: the words only
            yield self._inner(element)


def _plain(element: ET.Element) -> str:
    parts = [element.text or ""]
    for child in element:
        if child.tag in ("ul", "ol"):
            parts.append(" ")
        else:
            parts.append(_plain(child))
            if child.tag in ("p", "br", "td", "th"):
                parts.append(" ")
        parts.append(child.tail or "")
    return "".join(parts)


def _blocks(html: str, images: dict[str, str]) -> list[_Block]:
    root = ET.fromstring(f"<body>{html}</body>")  # noqa: S314 - mammoth's output, no DTD
    inline = _Inline(images)
    cell = _Inline(images, in_table=True)
    blocks: list[_Block] = []
    for element in root:
        tag = element.tag
        inline.pictures, cell.pictures = [], []
        if re.fullmatch(r"h[1-6]", tag):
            md, plain = inline.render(element)
            if plain:
                blocks.append(_Block("heading", level=int(tag[1]), text=md.replace("\\\n", " "),
                                     plain=plain, css=element.get("class", "")))
        elif tag == "p":
            md, plain = inline.render(element)
            if md:
                blocks.append(_Block("paragraph", text=md, plain=plain,
                                     css=element.get("class", "")))
        elif tag in ("ul", "ol"):
            items = list(_list_items(element, 0, inline))
            if items:
                blocks.append(_Block("list", items=items,
                                     plain=" ".join(i[3] for i in items)))
        elif tag == "table":
            rows, merged = _table_rows(element, cell)
            if rows:
                blocks.append(_Block("table", rows=rows, merged=merged,
                                     plain=" ".join(c for c in rows[0] if c)))
        if blocks:
            blocks[-1].pictures.extend(inline.pictures + cell.pictures)
    return blocks


def _list_items(element: ET.Element, depth: int, inline: _Inline
                ) -> Iterator[tuple[int, bool, str, str]]:
    ordered = element.tag == "ol"
    for item in element:
        if item.tag != "li":
            continue
        md, plain = inline.render(item)
        md = md.replace("\\\n", " ")
        own_plain = " ".join(_plain_without_lists(item).split())
        if md:
            yield depth, ordered, md, own_plain or plain
        for child in item:
            if child.tag in ("ul", "ol"):
                yield from _list_items(child, depth + 1, inline)


def _plain_without_lists(element: ET.Element) -> str:
    parts = [element.text or ""]
    for child in element:
        if child.tag not in ("ul", "ol"):
            parts.append(_plain(child))
        parts.append(child.tail or "")
    return "".join(parts)


def _table_rows(element: ET.Element, cell: _Inline) -> tuple[list[list[str]], bool]:
    rows: list[list[str]] = []
    merged = False
    for row in element.iter("tr"):
        cells = []
        for td in row:
            if td.tag not in ("td", "th"):
                continue
            if td.get("colspan") or td.get("rowspan"):
                merged = True
            cells.append(cell.render(td)[0])
            cells.extend("" for _ in range(int(td.get("colspan") or 1) - 1))
        if any(cells):
            rows.append(cells)
    width = max((len(r) for r in rows), default=0)
    return [r + [""] * (width - len(r)) for r in rows], merged


# ---- 4. details: title, issue, date ----

def _details(blocks: list[_Block], core_title: str | None, given: Details,
             name: str) -> tuple[str, int, dt.date]:
    masthead: list[str] = []
    title = given.title
    for block in blocks:
        if block.kind == "heading" and "title" not in block.css.split():
            break
        if block.kind == "heading" and title is None:
            title = block.plain
        if block.kind in ("heading", "paragraph"):
            masthead.append(block.plain)
    title = title or core_title
    opening = masthead + [b.plain for b in blocks if b.kind == "paragraph"][:10]
    issue = given.issue or _find_issue(masthead) or _find_issue(opening)
    date = given.date or _find_date(masthead)
    missing = [what for what, value in (("the title (--title)", title),
                                        ("the issue number (--issue N)", issue),
                                        ("the date (--date YYYY-MM-DD)", date)) if not value]
    if missing:
        raise WordImportError(
            f"{name} does not say {_join(missing)}: give "
            f"{'it' if len(missing) == 1 else 'them'} and import again",
            hint="Word: a paragraph in the Title style gives the title, and a line such as "
                 "'Issue 3 · 1 December 2020' under it the issue and date", missing=missing)
    assert title and issue and date
    return title, issue, date


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _find_issue(lines: list[str]) -> int | None:
    for line in lines:
        if match := _ISSUE.search(line):
            return int(match[1]) or None
        if match := _ORDINAL_ISSUE.search(line):
            return _ORDINALS[match[1].lower()]
    return None


def _find_date(lines: list[str]) -> dt.date | None:
    for line in lines:
        try:
            if match := _ISO_DATE.search(line):
                return dt.date(int(match[1]), int(match[2]), int(match[3]))
            if match := _FULL_DATE.search(line):
                return dt.date(int(match["year"]), _month(match["month"]), int(match["day"]))
            if match := _MONTH_YEAR.search(line):
                return dt.date(int(match["year"]), _month(match["month"]), 1)
        except ValueError:
            continue
    return None


def _month(text: str) -> int:
    key = text.lower().rstrip(".")
    return next(n for full, n in MONTHS.items() if full.startswith(key[:3]))


# ---- 5. blocks -> Markdown, with where each line came from ----

def _dated(md: str) -> str | None:
    """`14th September Operation Aidant` -> `**14 September**: Operation Aidant`, or None."""
    match = DATED_LINE.match(md)
    if not match:
        return None
    day = int(match["day"] or match["day2"])
    month = _month(match["month"] or match["month2"])
    try:
        dt.date(2000, month, day)  # a leap year: 29 February is a date
    except ValueError:
        return None
    when = f"{day} {list(MONTHS)[month - 1].title()}"
    if match["year"]:
        when += f" {match['year']}"
    return f"**{when}**: {match['what'].strip()}"


def _opening(plain: str, words: int = 6) -> str:
    parts = plain.split()
    text = " ".join(parts[:words])
    return text + ("…" if len(parts) > words else "")


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.where: list[str] = []

    def add(self, text: str, where: str) -> None:
        for line in text.split("\n"):
            self.lines.append(line)
            self.where.append(where)

    def blank(self) -> None:
        if self.lines and self.lines[-1] != "":
            self.add("", self.where[-1] if self.where else "")


def _dated_run(blocks: list[_Block]) -> int:
    """How many blocks at the start of a section are dated lines (paragraphs, or lists
    whose every item is one)."""
    count = 0
    for block in blocks:
        lines = ([block.text] if block.kind == "paragraph"
                 else [md for _, _, md, _ in block.items] if block.kind == "list" else [])
        if not lines or not all(_dated(line) for line in lines):
            break
        count += 1
    return count


def _section_kind(blocks: list[_Block]) -> str:
    if any(b.kind == "table" for b in blocks):
        return "figures"
    run = _dated_run(blocks)
    # The dates layout shows its table first and every list as dates: so the dated lines
    # must open the section, and no other list may follow them.
    if run and (run > 1 or blocks[0].kind == "list") and not any(
            b.kind == "list" for b in blocks[run:]):
        return "dates"
    if (blocks and all(b.kind == "list" for b in blocks)
            and all(re.search(r"\]\([^)]*\)", md) for b in blocks for _, _, md, _ in b.items)):
        return "links"
    return "prose"


def _write_table(out: _Writer, block: _Block, where: str) -> None:
    header, body = block.rows[0], block.rows[1:]
    numeric = [bool(cells) and all(_NUMBER.match(c.replace("\\", "")) for c in cells)
               for cells in ([r[i] for r in body if r[i]] for i in range(len(header)))]
    out.add("| " + " | ".join(c or " " for c in header) + " |", where)
    out.add("|" + "|".join("--:" if n else "---" for n in numeric) + "|", where)
    for row in body:
        out.add("| " + " | ".join(row) + " |", where)


def _write_blocks(out: _Writer, blocks: list[_Block], kind: str, heading: str | None,
                  problems: list[Problem], refused: dict[str, str]) -> None:
    run = _dated_run(blocks) if kind == "dates" else 0
    for index, block in enumerate(blocks):
        where = _where(heading, block)
        for key in block.pictures:
            if key in refused:
                problems.append(Problem(where, f"a picture was left out: {refused[key]}"))
        if not 0 < index < run:  # the dated lines stay one tight list
            out.blank()
        if block.kind == "paragraph":
            out.add(f"- {_dated(block.text)}" if index < run else block.text, where)
        elif block.kind == "list":
            for depth, ordered, md, plain in block.items:
                if kind == "dates":
                    md = _dated(md) or md
                indent = "   " * depth if ordered else "  " * depth
                out.add(f"{indent}{'1.' if ordered else '-'} {md}", _where(heading, plain=plain))
        elif block.kind == "table":
            if heading is None:
                problems.append(Problem(where, "a table before the first heading is not "
                                               "shown: put a heading above it"))
            if block.merged:
                problems.append(Problem(where, "the table has merged cells; check that each "
                                               "figure is in its column"))
            _write_table(out, block, where)
        elif block.kind == "heading":
            out.add(f"{'#' * min(block.level, 6)} {block.text}", where)


def _where(heading: str | None, block: _Block | None = None, plain: str | None = None) -> str:
    under = f"under the heading “{heading}”" if heading else "before the first heading"
    if block is not None and block.kind == "heading":
        return f"at the heading “{block.plain}”"
    words = plain if plain is not None else (block.plain if block else "")
    what = "the table starting" if block is not None and block.kind == "table" else "at"
    return f"{under}, {what} “{_opening(words)}”" if words else under


def _markdown(blocks: list[_Block], front: dict[str, Any], problems: list[Problem],
              refused: dict[str, str]) -> _Writer:
    out = _Writer()
    out.add("---", "the document's details (title, issue, date)")
    out.add(yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=1000).rstrip(),
            "the document's details (title, issue, date)")
    out.add("---", "the document's details (title, issue, date)")
    body = [b for b in blocks if not (b.kind == "heading" and "title" in b.css.split())]
    # Drop the masthead lines the details came from (subtitle paragraphs).
    body = [b for b in body if "subtitle" not in b.css.split()]
    levels = sorted({b.level for b in body if b.kind == "heading"})
    top = levels[0] if levels else 2
    current: list[_Block] = []
    heading: _Block | None = None

    def flush() -> None:
        kind = _section_kind(current) if heading is not None else "prose"
        if heading is not None:
            out.blank()
            mark = "" if kind == "prose" else f" {{.{kind}}}"
            out.add(f"## {heading.text}{mark}", _where(None, heading))
        _write_blocks(out, current, kind, heading.plain if heading else None, problems,
                      refused)

    for block in body:
        if block.kind == "heading" and block.level == top:
            flush()
            heading, current = block, []
        elif block.kind == "heading":
            # Deeper headings are sub-headings inside the section: ### and below.
            current.append(_Block("heading", level=2 + block.level - top, text=block.text,
                                  plain=block.plain))
        else:
            current.append(block)
    flush()
    out.add("", out.where[-1])
    return out


# ---- the whole import ----

def import_docx(data: bytes, settings: Settings, *, name: str = "document.docx",
                details: Details | None = None) -> ImportResult:
    """Import a Word document. Raises WordImportError (nothing stored) when the file is
    refused or the title, issue or date can be found neither in it nor in `details`.

    Example: `import_docx(Path("issue3.docx").read_bytes(), settings, name="issue3.docx")`
    """
    given = details or Details()
    members = open_package(data, name)
    html, pictures = _to_html(members, name)
    problems: list[Problem] = []
    prepared: dict[str, media.PreparedImage] = {}
    images: dict[str, str] = {}
    refused: dict[str, str] = {}
    for index, picture in enumerate(pictures):
        key = f"picture:{index}"
        try:
            # Without alt text it is still kept: the edition's validation asks for it.
            image = media.prepare_image(picture.data, picture.alt, require_alt=False,
                                        where=f"picture {index + 1}")
        except media.MediaError as exc:
            refused[key] = str(exc)
            continue
        prepared[key] = image
        images[key] = media.media_url(settings, image.name)
    blocks = _blocks(html, images)
    title, issue, date = _details(blocks, _core_title(members), given, name)
    front: dict[str, Any] = {"title": title, "issue": issue, "date": date,
                             "subject": given.subject or f"{title}, issue {issue}"}
    if given.preheader:
        front["preheader"] = given.preheader
    front["topic"] = given.topic
    out = _markdown(blocks, front, problems, refused)
    source = "\n".join(out.lines)
    problems.extend(_validate(source, out.where, name, media.media_url(settings, "")))
    stored = [media.save_image(settings, image) for image in prepared.values()]
    return ImportResult(source=source, problems=problems, media=stored, title=title,
                        issue=issue, date=date)


def _validate(source: str, where: list[str], name: str, media_prefix: str) -> list[Problem]:
    try:
        parse_edition(source, name)
    except EditionErrors as exc:
        errors = exc.errors
    except EditionError as exc:
        errors = [exc]
    else:
        return []
    problems = []
    for error in errors:
        line = int((error.location or ":0").rpartition(":")[2] or 0)
        place = where[line - 1] if 0 < line <= len(where) else "the document"
        message = str(error.args[0])
        if error.location and message.startswith(f"{error.location}: "):
            message = message[len(error.location) + 2:]
        url = re.search(re.escape(media_prefix) + r"[0-9a-f]{64}\.\w+", message)
        if url and media_prefix.startswith("http:"):
            # Not the author's to fix: the site's address is not https.
            message = (f"the picture's address {url[0]} is not https: set MAILER_BASE_URL to "
                       "the site's https:// address, which emails need")
        elif "image without alt text" in message:
            message = ("a picture without alt text: in Word, right-click it, choose 'View Alt "
                       "Text' and say what it shows")
        problems.append(Problem(place, message))
    return problems
