"""Edition -> email: compiled once per edition, personalised and built per recipient.

`compile_edition` runs Jinja2 -> MJML (mjml-python) -> premailer once and returns a
`CompiledEdition` that the outbox stores (`to_dict()`/`from_dict()`). Per-recipient values
(greeting name, unsubscribe, preferences and view-online URLs) are slot markers that contain no
spaces or HTML-special characters, so they pass through MJML and premailer untouched (premailer
URL-encodes `{{ x }}` inside href). Each marker carries a random nonce chosen at compile time, so
an edition's own text can never be mistaken for a slot.

`build_message` joins pre-encoded bytes: the MIME layout and the static quoted-printable body are
encoded once per edition (a skeleton, cached on the CompiledEdition) and only the short
per-recipient values are encoded per message. An `EmailMessage` per recipient costs ~6.5 ms;
this costs tens of microseconds. `build_reference_message` is the slow stdlib build the tests
compare it with. Every message's header block is checked as `check_round_trip` would: the
static lines once per edition, the per-recipient lines per message.
"""

from __future__ import annotations

import datetime as dt
import email.errors
import email.utils
import functools
import html as html_lib
import logging
import re
import secrets
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from email import policy as email_policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.quoprimime import body_encode
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import jinja2
import markupsafe
from markdown_it.renderer import RendererHTML
from markdown_it.token import Token

from mailer import marking, media, signing
from mailer.config import Settings
from mailer.dkim import HEADER_LIST
from mailer.edition import COLUMN_WIDTH, CONTACT_HREF, Edition, Section, Table, markdown
from mailer.errors import EditionError, PermanentDeliveryError

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates" / "editions"
HTML_TEMPLATE = "newsletter.mjml.j2"
TEXT_TEMPLATE = "newsletter.txt.j2"
SLOTS = ("name", "unsubscribe", "preferences", "view_online")
# The text's inset from the column's edge (mj-text padding on a desk) and the width left for it.
TEXT_INSET = 24
TEXT_WIDTH = COLUMN_WIDTH - 2 * TEXT_INSET
GMAIL_CLIP_BYTES = 102 * 1024
WRAP = 78
# policy.SMTP folds at 78 and then RFC 2047-encodes a long List-Unsubscribe; 998 keeps it one
# line. cte_type="7bit" makes non-ASCII bodies quoted-printable instead of unannounced 8bit.
POLICY = email_policy.SMTP.clone(max_line_length=998, cte_type="7bit")
ONE_CLICK = "List-Unsubscribe=One-Click"
DKIM_HEADERS = HEADER_LIST  # what h= covers, over-signed: mailer.dkim owns the list
_VAGUE_LINK_TEXT = {"here", "click here", "click", "this", "link", "this link", "read more",
                    "more", "click this link"}
_VAGUE_OPENINGS = ("click here", "click this", "click on this", "click the link")
_ENCODED_WORD = re.compile(r"=\?[^?\s]*\?[bBqQ]\?", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HTML_SPECIAL = re.compile(r"[&<>'\"]")  # what markupsafe.escape changes
_MSGID = re.compile(r"<[!#-'*+/-9=?A-Z^-~.-]+@[A-Za-z0-9.-]+>", re.ASCII)
_ATEXT_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]+", re.ASCII)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")

log = logging.getLogger(__name__)


class MessageRefused(PermanentDeliveryError):
    """This message must not leave: a header would not survive serialisation as written.

    Permanent for this recipient (their name or address is the cause), so the delivery engine
    records it and does not retry.
    """


# ---- the compiled edition ----

@dataclass
class CompiledEdition:
    """One edition, rendered once with slot markers; store it with `to_dict()`."""

    html: str
    text: str
    subject: str
    preheader: str | None
    from_name: str
    from_address: str
    list_id: str
    markers: dict[str, str]  # slot name -> marker text in html and text
    warnings: list[str] = field(default_factory=list)
    title: str = ""
    source: str = ""
    compiled_at: str = ""  # ISO 8601, aware; also the Date header (when it was finalised)
    issue_date: str = ""  # ISO 8601: the date the edition carries, which the archive lists
    # Files sent with every copy (a reminder's .ics): {"filename", "content_type", "data"
    # (base64)}. Added for the scheduler (issue 6); empty for editions.
    attachments: list[dict[str, str]] = field(default_factory=list)
    # Where replies go (issue 15). Empty in editions compiled before it existed: those are
    # sent without a Reply-To, as they were approved.
    reply_to: str = ""
    # mailer.marking: "" for a mail that carries no marking (a welcome, a reminder); an
    # edition compiled before marking existed was OFFICIAL and public, which the defaults say.
    classification: str = ""
    archive: str = "public"
    # OFFICIAL-SENSITIVE: the only domains (and their subdomains) it may go to, as the approver
    # saw them; None: anyone in the audience.
    secure_domains: list[str] | None = None
    _skeleton: _Skeleton | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("_skeleton")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompiledEdition:
        return cls(**{k: v for k, v in data.items() if k != "_skeleton"})

    def skeleton(self) -> _Skeleton:
        if self._skeleton is None:
            self._skeleton = (_Skeleton.build(self) if not self.attachments
                              else _mixed_skeleton(self))
        return self._skeleton


class RecipientLike(Protocol):
    # Read-only, so a frozen dataclass (Recipient) and an ORM row both fit.
    @property
    def email(self) -> str: ...
    @property
    def name(self) -> str | None: ...


@dataclass(frozen=True)
class Recipient:
    email: str
    name: str | None = None


@dataclass(frozen=True)
class RecipientUrls:
    """The per-recipient links. `unsubscribe` is both the body link and the one-click URL."""

    unsubscribe: str
    preferences: str
    view_online: str
    unsubscribe_mailto: str | None = None  # only when a mailbox processes these


@dataclass(frozen=True)
class DkimKey:
    selector: str
    domain: str
    private_key_pem: bytes


@dataclass(frozen=True)
class Personalised:
    html: str
    text: str


# ---- compile: Markdown -> Jinja2 -> MJML -> premailer, once per edition ----

@functools.cache
def _html_env() -> jinja2.Environment:
    # autoescape=True for every template: select_autoescape() would leave .mjml unescaped.
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


@functools.cache
def _text_env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=False,  # noqa: S701 - text/plain output
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


class _Links:
    """Numbered references for the text part, in reading order, one number per URL."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def ref(self, url: str) -> int:
        return self.numbers.setdefault(url, len(self.numbers) + 1)


ImageSize = Callable[[str], "tuple[int, int] | None"]


def _no_size(src: str) -> None:
    return None


def display_size(size: tuple[int, int], widest: int) -> tuple[int, int]:
    """The width and height an image is shown at: its own, or scaled down to `widest`."""
    width, height = size
    if width <= widest:
        return width, height
    return widest, max(1, round(height * widest / width))


class _Renderer:
    def __init__(self, contact_address: str, image_size: ImageSize = _no_size) -> None:
        self.md = markdown()
        self.contact = contact_address
        self.links = _Links()
        self.image_size = image_size

    def _resolve(self, children: list[Token]) -> list[Token]:
        out: list[Token] = []
        for index, child in enumerate(children):
            if child.type == "image":
                size = self.image_size(str(child.attrGet("src") or ""))
                if size is not None:
                    # Outlook sizes by the attributes; the style lets other clients shrink it.
                    width, height = display_size(size, TEXT_WIDTH)
                    child = child.copy()
                    child.attrs = {**child.attrs, "width": str(width), "height": str(height),
                                   "style": "display: block; max-width: 100%; height: auto;"}
            if child.type == "link_open" and child.attrGet("href") == CONTACT_HREF:
                child = child.copy()
                child.attrs = {**child.attrs, "href": f"mailto:{self.contact}"}
            elif (child.type == "text" and child.content == CONTACT_HREF and index
                  and children[index - 1].type == "link_open"):
                child = child.copy(content=self.contact)
            out.append(child)
        return out

    def inline_html(self, tokens: Sequence[Token]) -> markupsafe.Markup:
        renderer = self.md.renderer
        assert isinstance(renderer, RendererHTML)  # markdown() makes the HTML renderer
        html = renderer.renderInline(self._resolve(list(tokens)), self.md.options, {})
        return markupsafe.Markup(html)  # noqa: S704 - markdown-it escapes; raw HTML is refused

    def block_html(self, tokens: list[Token]) -> markupsafe.Markup:
        resolved = []
        for token in tokens:
            if token.type == "inline":
                token = token.copy(children=self._resolve(token.children or []))
            resolved.append(token)
        html = self.md.renderer.render(resolved, self.md.options, {})
        return markupsafe.Markup(html)  # noqa: S704 - markdown-it escapes; raw HTML is refused

    # -- text part --

    def inline_text(self, tokens: Sequence[Token], *, show_urls: bool = False) -> str:
        out: list[str] = []
        href: str | None = None
        label: list[str] = []
        for child in self._resolve(list(tokens)):
            if child.type == "link_open":
                href, label = str(child.attrGet("href")), []
            elif child.type == "link_close" and href is not None:
                text = "".join(label)
                target = href.removeprefix("mailto:")
                if text.strip() == target:
                    out.append(text)
                elif show_urls:
                    out.append(f"{text}: {href}")
                else:
                    out.append(f"{text} [{self.links.ref(href)}]")
                href = None
            elif child.type in ("softbreak",):
                (label if href is not None else out).append(" ")
            elif child.type == "hardbreak":
                (label if href is not None else out).append("\n")
            elif child.type == "image":
                out.append(f"[image: {child.content}]")
            elif child.type in ("text", "code_inline"):
                (label if href is not None else out).append(child.content)
        return "".join(out)

    def block_text(self, tokens: list[Token], *, show_urls: bool = False) -> str:
        paragraphs: list[str] = []
        prefix: list[str] = []  # bullets of the enclosing lists
        ordinal: list[int] = []
        for position, token in enumerate(tokens):
            if token.type == "bullet_list_open":
                prefix.append("- ")
                ordinal.append(0)
            elif token.type == "ordered_list_open":
                prefix.append("1. ")
                ordinal.append(int(token.attrGet("start") or 1))
            elif token.type in ("bullet_list_close", "ordered_list_close"):
                prefix.pop()
                ordinal.pop()
            elif token.type == "heading_open":
                pass
            elif token.type == "inline":
                text = self.inline_text(token.children or [], show_urls=show_urls)
                if prefix:
                    depth = "  " * (len(prefix) - 1)
                    bullet = prefix[-1]
                    if bullet != "- ":
                        bullet = f"{ordinal[-1]}. "
                        ordinal[-1] += 1
                    paragraphs.append(wrap(text, initial=depth + bullet,
                                           subsequent=depth + " " * len(bullet)))
                elif position and tokens[position - 1].type == "heading_open":
                    paragraphs.append(f"\n{text}\n{'~' * len(text)}")
                else:
                    paragraphs.append(wrap(text))
            elif token.type in ("fence", "code_block"):
                paragraphs.append(textwrap.indent(token.content.rstrip("\n"), "    "))
            elif token.type == "hr":
                paragraphs.append("-" * 20)
        # List items sit on consecutive lines; paragraphs are separated by a blank line.
        out: list[str] = []
        for piece in paragraphs:
            is_item = piece.lstrip().startswith(("- ",)) or re.match(r"\s*\d+\. ", piece)
            if out and not (is_item and _last_was_item(out[-1])):
                out.append("\n")
            out.append(piece + "\n")
        return "".join(out).strip("\n")

    def table_text(self, table: Table) -> str:
        rows = [[self.inline_text(c.children or []) for c in table.header]]
        rows += [[self.inline_text(c.children or []) for c in row] for row in table.rows]
        widths = [max(len(r[i]) if i < len(r) else 0 for r in rows)
                  for i in range(len(rows[0]))]
        lines = []
        for n, row in enumerate(rows):
            cells = [(row[i] if i < len(row) else "").ljust(widths[i]) for i in range(len(widths))]
            lines.append("  ".join(cells).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _last_was_item(text: str) -> bool:
    stripped = text.lstrip()
    return stripped.startswith("- ") or bool(re.match(r"\d+\. ", stripped))


def wrap(text: str, width: int = WRAP, initial: str = "", subsequent: str = "") -> str:
    """Wrap at `width`, never breaking a URL or a word (a long URL stays whole on its line)."""
    lines = []
    for paragraph in text.split("\n"):
        lines.append(textwrap.fill(paragraph, width=width, initial_indent=initial,
                                   subsequent_indent=subsequent, break_long_words=False,
                                   break_on_hyphens=False) or initial.rstrip())
        initial = subsequent
    return "\n".join(lines)


def _section_context(section: Section, r: _Renderer) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = []
    dates: list[dict[str, Any]] = []
    link_items: list[markupsafe.Markup] = []
    texts: list[str] = []
    for block in section.blocks:
        if isinstance(block, Table):
            blocks.append({"type": "table", "header": [r.inline_html(c.children or [])
                                                       for c in block.header],
                           "rows": [[r.inline_html(c.children or []) for c in row]
                                    for row in block.rows],
                           "numeric": _table_alignment(block)})
            texts.append(r.table_text(block))
            continue
        is_list = block[0].type == "bullet_list_open"
        if section.kind == "dates" and is_list:
            for token in block:
                if token.type == "inline":
                    dates.append(_date_item(token.children or [], r))
            blocks.append({"type": "dates"})
            texts.append(r.block_text(block))
        elif section.kind == "links" and is_list:
            for token in block:
                if token.type == "inline":
                    link_items.append(r.inline_html(token.children or []))
            blocks.append({"type": "links"})
            texts.append(r.block_text(block, show_urls=True))
        else:
            blocks.append({"type": "html", "html": r.block_html(block)})
            texts.append(r.block_text(block))
    return {"title": section.title, "kind": section.kind, "anchor": section.anchor,
            "blocks": blocks, "dates": dates, "link_items": link_items,
            "text": "\n\n".join(texts)}


def _table_alignment(table: Table) -> list[bool]:
    # markdown-it puts the alignment on th/td open tokens, which Table does not keep; the
    # inline cell tokens carry no style, so infer: a column whose body cells are all numbers.
    columns = len(table.header)
    flags = []
    for i in range(columns):
        cells = [row[i].content.strip() for row in table.rows if i < len(row)]
        filled = [c for c in cells if c]
        flags.append(bool(filled) and all(re.fullmatch(r"[\d,.%]+", c) for c in filled))
    return flags


def _date_item(children: list[Token], r: _Renderer) -> dict[str, Any]:
    """`**14 September**: what happens` -> when / what; without bold the item is all `what`."""
    # markdown-it opens an inline that starts with emphasis with an empty text token.
    while children and children[0].type == "text" and not children[0].content:
        children = children[1:]
    if children and children[0].type == "strong_open":
        end = next(i for i, c in enumerate(children) if c.type == "strong_close")
        when = r.inline_html(children[1:end])
        rest = list(children[end + 1:])
        if rest and rest[0].type == "text":
            rest[0] = rest[0].copy(content=rest[0].content.lstrip(" :–—-"))
        return {"when": when, "what": r.inline_html(rest)}
    return {"when": "", "what": r.inline_html(children)}


def _markers() -> dict[str, str]:
    nonce = secrets.token_hex(4).upper()
    return {slot: f"@@{nonce}_{slot.upper()}@@" for slot in SLOTS}


def _why(edition: Edition, settings: Settings) -> str:
    return (f"You are getting this email because you subscribed to the {edition.meta.title} "
            f"from {settings.from_name}, sent to first responders in Kent and Essex.")


def compile_edition(edition: Edition, settings: Settings, *,
                    now: dt.datetime | None = None) -> CompiledEdition:
    """Render `edition` once: HTML (inlined, with slot markers), text, subject, warnings."""
    _check_header_text(edition.meta.subject, "subject", edition.path)
    classification, archive = marking.resolve(
        edition.meta.classification, edition.meta.archive, settings.default_classification,
        settings.default_archive)
    subject = marking.marked_subject(edition.meta.subject, classification)
    from_name = edition.meta.from_name or settings.from_name
    _check_header_text(from_name, "from_name", edition.path)
    markers = _markers()
    r = _Renderer(settings.contact_address, lambda src: media.stored_size(settings, src))
    intro_html = markupsafe.Markup("").join(
        r.block_html(b) if not isinstance(b, Table) else markupsafe.Markup("")
        for b in edition.intro)
    intro_text = "\n\n".join(r.block_text(b) if not isinstance(b, Table) else r.table_text(b)
                             for b in edition.intro)
    sections = [_section_context(s, r) for s in edition.sections]
    date_text = f"{edition.meta.date.day} {edition.meta.date:%B %Y}"
    why = _why(edition, settings)
    context = {
        "lang": "en-GB", "subject": subject, "preheader": edition.meta.preheader,
        "marking": classification.value,
        # An edition kept off the web has no page to view: its copies carry no link to one.
        "view_online": archive != marking.ArchiveVisibility.NONE,
        "title": edition.meta.title, "issue": edition.meta.issue, "date_text": date_text,
        "from_name": from_name, "contact_address": settings.contact_address, "why": why,
        "images": [i.model_dump() for i in edition.meta.images],
        "sections": sections, "intro": intro_html, "slots": markers,
        "column_width": COLUMN_WIDTH, "text_inset": TEXT_INSET,
    }
    mjml_source = _html_env().get_template(HTML_TEMPLATE).render(context)
    html = inline_css(mjml_to_html(mjml_source, f"{TEMPLATE_DIR / HTML_TEMPLATE} (rendered)"))
    text_context = {**context, "intro": intro_text, "why_wrapped": wrap(why),
                    "title": wrap(edition.meta.title),
                    "masthead": wrap(f"{from_name} · Issue {edition.meta.issue} · {date_text}"),
                    "sender": wrap(f"Sent by {from_name}. "
                                   f"Write to us at {settings.contact_address}."),
                    "references": sorted((n, u) for u, n in r.links.numbers.items())}
    text = _text_env().get_template(TEXT_TEMPLATE).render(text_context)
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"
    html = html.rstrip("\n") + "\n"  # as set_content() would leave it
    compiled = CompiledEdition(
        html=html, text=text, subject=subject, preheader=edition.meta.preheader,
        from_name=from_name, from_address=settings.from_address, list_id=settings.list_id,
        reply_to=_reply_to(settings, edition.path),
        markers=markers, title=edition.meta.title, source=edition.path,
        compiled_at=(now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds"),
        issue_date=edition.meta.date.isoformat(),
        classification=classification.value, archive=archive.value,
        secure_domains=(sorted({d.strip().lower() for d in settings.secure_domains if d.strip()})
                        if classification == marking.Classification.OFFICIAL_SENSITIVE
                        else None),
    )
    compiled.warnings = preflight(compiled)
    return compiled


def mjml_to_html(source: str, where: str = "<template>") -> str:
    """MJML -> HTML; a parse error becomes an EditionError naming the MJML line.

    mrml reports a position only for some errors ("at position 12:17", byte offsets), so when
    it gives none we find the first unbalanced tag or unquoted attribute ourselves.
    """
    try:
        import mjml  # here: the worker and the CLI load this module, and only compiling needs it

        return mjml.mjml2html(source)
    except ValueError as exc:
        message = str(exc)
        match = re.search(r"position (\d+)", message)
        line = (source.count("\n", 0, int(match[1])) + 1) if match else _locate_mjml_error(source)
        location = f"{where}:{line}" if line else where
        shown = source.splitlines()[line - 1].strip()[:120] if line else ""
        raise EditionError(f"the MJML does not parse: {message}"
                           + (f" near {shown!r}" if shown else ""), location,
                           hint="check the template (and any partial) for unclosed tags "
                                "or unquoted attributes") from None


_TAG = re.compile(r"<(/?)([A-Za-z][\w-]*)((?:\s+[^>]*?)?)\s*(/?)>")
_UNQUOTED = re.compile(r"""[\w-]+\s*=\s*[^"'\s>]""")
_VOID = frozenset({"br", "img", "hr", "meta", "input", "link", "col", "source", "wbr"})


def _locate_mjml_error(source: str) -> int | None:
    """Line (1-based) of the first mismatched close tag, unquoted attribute or unclosed tag."""
    stack: list[tuple[str, int]] = []
    for match in _TAG.finditer(source):
        closing, name, attrs, selfclose = match.groups()
        line = source.count("\n", 0, match.start()) + 1
        if _UNQUOTED.search(attrs or ""):
            return line
        if closing:
            if not stack or stack[-1][0] != name.lower():
                return line
            stack.pop()
        elif not selfclose and name.lower() not in _VOID:
            stack.append((name.lower(), line))
    return stack[-1][1] if stack else None


def inline_css(html: str) -> str:
    """premailer with the media queries and their !important intact and the doctype kept."""
    from premailer import Premailer  # ~150 ms to import (cssutils): only compiling needs it

    doctype = re.match(r"\s*(<!doctype[^>]*>)", html, re.IGNORECASE)
    out: str = Premailer(
        html, allow_network=False, strip_important=False, keep_style_tags=False,
        remove_classes=False, disable_validation=True,
        # An <img> keeps the height attribute it was given: premailer would overwrite it with
        # the CSS "height: auto" that lets it shrink on a phone.
        disable_basic_attributes=["height"],
        cssutils_logging_level=logging.CRITICAL).transform()
    if doctype and not re.match(r"\s*<!doctype", out, re.IGNORECASE):
        out = f"{doctype[1]}\n{out}"
    return out


# ---- preflight ----

class _Anchors:
    _A = re.compile(r"<a\b([^>]*)>(.*?)</a>", re.IGNORECASE | re.DOTALL)
    _HREF = re.compile(r"""\bhref\s*=\s*("([^"]*)"|'([^']*)')""", re.IGNORECASE)

    @classmethod
    def find(cls, html: str) -> list[tuple[str | None, str]]:
        out = []
        for match in cls._A.finditer(html):
            href = cls._HREF.search(match[1])
            value = None if href is None else html_lib.unescape(href[2] or href[3] or "")
            text = html_lib.unescape(re.sub(r"<[^>]+>", "", match[2])).strip()
            out.append((value, " ".join(text.split())))
        return out


def preflight(compiled: CompiledEdition) -> list[str]:
    """What a co-ordinator should see before sending; none of these stops a send by itself."""
    warnings = []
    size = len(compiled.html.encode("utf-8"))
    if size > GMAIL_CLIP_BYTES:
        warnings.append(f"the HTML is {size / 1024:.0f} KB: Gmail clips messages over 102 KB")
    for img in re.finditer(r"<img\b[^>]*>", compiled.html, re.IGNORECASE):
        alt = re.search(r"""\balt\s*=\s*("([^"]*)"|'([^']*)')""", img[0], re.IGNORECASE)
        if alt is None or not (alt[2] or alt[3] or "").strip():
            src = re.search(r"""\bsrc\s*=\s*["']([^"']*)""", img[0])
            warnings.append(f"image without alt text: {src[1] if src else img[0][:60]}")
    for href, text in _Anchors.find(compiled.html):
        if vague_link_text(text):
            warnings.append(f"link text {text!r} says nothing out of context: "
                            f"describe where it goes ({href})")
        if href is None or not href.strip() or href.strip().startswith("#"):
            warnings.append(f"link {text!r} has an empty or '#' target")
    if not compiled.preheader:
        warnings.append("no preheader: inboxes will show the first words of the body instead")
    if len(compiled.subject) > 78:
        warnings.append(f"the subject is {len(compiled.subject)} characters: "
                        "keep it under 78 so it is not cut off")
    unsub = compiled.markers["unsubscribe"]
    if unsub not in compiled.html or unsub not in compiled.text:
        where = [p for p, body in (("HTML", compiled.html), ("text", compiled.text))
                 if unsub not in body]
        warnings.append(f"no unsubscribe link in the {' and '.join(where)} part")
    return warnings


def vague_link_text(text: str) -> bool:
    """Link text that says nothing read on its own, as a screen reader's list of links reads
    it: "here", "read more", and anything that opens with "click here" or "click this"."""
    words = " ".join(text.lower().split()).strip(" .!:,;")
    return words in _VAGUE_LINK_TEXT or words.startswith(_VAGUE_OPENINGS)


# ---- personalise ----

def _slot_values(recipient: RecipientLike, urls: RecipientUrls) -> dict[str, str]:
    name = " ".join((recipient.name or "").split()) or "colleague"
    return {"name": name, "unsubscribe": urls.unsubscribe, "preferences": urls.preferences,
            "view_online": urls.view_online}


def _substituter(compiled: CompiledEdition) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(m) for m in compiled.markers.values()))


def personalise(compiled: CompiledEdition, recipient: RecipientLike,
                urls: RecipientUrls) -> Personalised:
    """The final HTML and text for one recipient: slot markers replaced, in one pass.

    One regex pass means a value containing marker text (or `{{ 7*7 }}`) is inserted as
    characters and never looked at again. HTML values are escaped; text values are not.
    """
    values = _slot_values(recipient, urls)
    by_marker = {compiled.markers[s]: v for s, v in values.items()}
    escaped = {m: str(markupsafe.escape(v)) for m, v in by_marker.items()}
    pattern = _substituter(compiled)
    return Personalised(html=pattern.sub(lambda m: escaped[m[0]], compiled.html),
                        text=pattern.sub(lambda m: by_marker[m[0]], compiled.text))


# ---- header checks shared by both builds ----

def _check_header_text(value: str, what: str, where: str | None = None) -> None:
    """Refuse text that cannot go into a header as itself.

    Text that looks like an RFC 2047 encoded-word is refused outright: Python 3.11.7 (this
    machine) serialises `=?UTF-8?Q?=0A?=` as a real line break (CVE-2024-6923), and clients
    decode such words even inside quoted names, so no spelling of it is safe.
    """
    problem = None
    if _CONTROL.search(value):
        problem = "contains a line break or control character"
    elif _ENCODED_WORD.search(value):
        problem = "contains text that looks like an RFC 2047 encoded-word ('=?...?Q?')"
    if problem is None:
        return
    if where is not None:
        raise EditionError(f"{what} {problem}: {value!r}", where)
    raise MessageRefused(f"{what} {problem}: {value!r}")


def _check_unsubscribe_url(url: str, scheme: str) -> None:
    parts = urlsplit(url)
    if (not url.isascii() or any(c in url for c in " <>,\"\t\r\n")
            or parts.scheme != scheme or (scheme != "mailto" and not parts.netloc)):
        raise MessageRefused(f"unusable {scheme} unsubscribe URL: {url!r}")


# URLs that the checks below accept, recognised without urlsplit (it is most of this
# function's cost per message); anything else takes the full checks.
_PLAIN_UNSUBSCRIBE = re.compile(
    r"(?:https://[A-Za-z0-9.-]+|http://(?:127\.0\.0\.1|localhost))(?::[0-9]{1,5})?"
    r"/[!#-+\--;=?-~]*", re.ASCII)


def list_unsubscribe(urls: RecipientUrls) -> str:
    """RFC 2369 value: the HTTPS URL, then mailto only when a mailbox handles it."""
    if not _PLAIN_UNSUBSCRIBE.fullmatch(urls.unsubscribe):
        https = urlsplit(urls.unsubscribe)
        # Plain http is only tolerated for a loopback dev server (the default base_url).
        _check_unsubscribe_url(urls.unsubscribe,
                               "http" if https.hostname in _LOOPBACK and https.scheme == "http"
                               else "https")
    value = f"<{urls.unsubscribe}>"
    if urls.unsubscribe_mailto:
        _check_unsubscribe_url(urls.unsubscribe_mailto, "mailto")
        value += f", <{urls.unsubscribe_mailto}>"
    if len("List-Unsubscribe: ") + len(value) > 998:
        raise MessageRefused("List-Unsubscribe would exceed 998 characters: shorten the URL")
    return value


def _format_to(recipient: RecipientLike) -> str:
    """`To:` for one recipient, encoded by hand because the header registry costs ~50 µs.

    ASCII names that are all atext go bare, other ASCII names are quoted, non-ASCII names
    become UTF-8 Q encoded-words (RFC 2047 §5(3) word rules).
    """
    addr = recipient.email.strip()
    if (not addr.isascii() or addr.count("@") != 1 or _CONTROL.search(addr)
            or any(c in addr for c in ' <>,;:"()[]\\')):
        raise MessageRefused(f"unusable recipient address: {addr!r}")
    name = " ".join((recipient.name or "").split())
    if not name:
        return f"<{addr}>"
    _check_header_text(name, "recipient name")
    if not name.isascii():
        word = _encoded_word(name)
        if word is not None:
            return f"{word} <{addr}>"
        # Too long for one encoded-word: readers disagree on the space between adjacent
        # words, so let the email package fold it as it parses it (rare; ~50 µs).
        folded = _fold("To", str(Address(display_name=name, addr_spec=addr)))
        return folded.removeprefix("To: ").removesuffix("\r\n")
    if _ATEXT_PHRASE.fullmatch(name):
        return f"{name} <{addr}>"
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{quoted}" <{addr}>'


_Q_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")


def _encoded_word(text: str) -> str | None:
    """One RFC 2047 Q encoded-word for a phrase, or None if it would exceed 75 characters."""
    body = "".join("_" if b == 0x20 else chr(b) if b in _Q_SAFE else f"={b:02X}"
                   for b in text.encode("utf-8"))
    word = f"=?utf-8?q?{body}?="
    return word if len(word) <= 75 else None


def _header_lines(compiled: CompiledEdition) -> tuple[str, str, str]:
    """From (with Reply-To), Subject and List-Id folded once per edition by the email
    package itself."""
    from_value = str(Address(display_name=compiled.from_name, addr_spec=compiled.from_address))
    list_id = f"{compiled.title or compiled.from_name} <{compiled.list_id}>"
    from_lines = _fold("From", from_value)
    if compiled.reply_to:
        from_lines += _fold("Reply-To", str(Address(addr_spec=compiled.reply_to)))
    return (from_lines, _fold("Subject", compiled.subject), _fold("List-Id", list_id))


def _reply_to(settings: Settings, where: str) -> str:
    """The settings' reply address, refused here if it could not be written as a header (a
    bad setting fails the compile, where it is seen, not every send)."""
    address = settings.reply_address
    _check_header_text(address, "reply_to", where)
    try:
        Address(addr_spec=address)
    except (ValueError, IndexError, email.errors.HeaderParseError) as exc:
        raise EditionError(f"reply_to {address!r} is not an address: {exc}", where) from None
    return address


def _fold(name: str, value: str) -> str:
    # policy.fold() passes a short str through as "source", non-ASCII and all; going
    # through the header factory makes it encode. (On 3.11.7 this is also where the
    # CVE-2024-6923 line break would appear; the round-trip check is the net.)
    folded: str = POLICY.header_factory(name, value).fold(policy=POLICY)
    return folded


# ---- the fast build: a pre-encoded skeleton ----

_LEADING_DOT = re.compile(rb"(^|\r\n)\.")


def _qp(text: str) -> bytes:
    """Quoted-printable in lines of at most 76, none of which starts with a dot.

    A leading dot is written `=2E` (the same character once decoded), so SMTP's dot-stuffing
    has nothing to do: it was a copy of the whole message each time. Each piece and value
    starts a line (they are joined by soft breaks), so this holds for the joined message.
    """
    encoded = body_encode(text.encode("utf-8").decode("latin-1"), 74, "\r\n").encode("ascii")
    return _LEADING_DOT.sub(rb"\1=2E", encoded) if b"." in encoded else encoded


@dataclass
class _Part:
    """A body split at the slot markers: static pieces pre-encoded, slots between them."""

    pieces: list[bytes]  # len(slots) + 1 pre-encoded pieces
    slots: list[str]  # slot names in order

    @classmethod
    def build(cls, body: str, markers: dict[str, str]) -> _Part:
        by_marker = {m: s for s, m in markers.items()}
        pattern = re.compile("|".join(re.escape(m) for m in markers.values()))
        pieces, slots, start = [], [], 0
        body = body.replace("\r\n", "\n")
        for match in pattern.finditer(body):
            pieces.append(_qp_piece(body[start:match.start()]))
            slots.append(by_marker[match[0]])
            start = match.end()
        pieces.append(_qp_piece(body[start:], last=True))
        return cls(pieces, slots)

    def join(self, encoded: dict[str, bytes]) -> list[bytes]:
        out = [self.pieces[0]]
        for slot, piece in zip(self.slots, self.pieces[1:], strict=True):
            out.append(encoded[slot])
            out.append(piece)
        return out


def _qp_piece(text: str, last: bool = False) -> bytes:
    """QP-encode a run of body text that is joined to a slot value by a soft line break.

    A soft break (`=` CRLF) decodes to nothing, so `piece =CRLF value =CRLF piece` decodes to
    exactly `piece value piece`, while each line stays within RFC 2045's 76 characters.
    """
    if not text:
        return b""
    encoded = _qp(text)
    if text.endswith("\n") or last:
        if not encoded.endswith(b"\r\n"):
            encoded += b"\r\n"
        return encoded
    return encoded + b"=\r\n"


_QP_LITERAL = re.compile(r"[!-\-/-<>-~]([ !-<>-~]{0,73}[!-<>-~])?", re.ASCII)  # not "." first


_QP_SAFE_RUN = re.compile(r"[!-<>-~]+", re.ASCII)


def _qp_value(value: str) -> bytes:
    # Most values (names, signed URLs) are already valid QP as they stand: printable ASCII
    # without "=", no trailing space, no line starting with a dot. Skip the encoder for those.
    if _QP_SAFE_RUN.fullmatch(value):  # no space: a URL, soft breaks every 75 characters
        data = value.encode("ascii")
        if len(data) > 75:
            data = b"=\r\n".join([data[i:i + 75] for i in range(0, len(data), 75)])
        if data[:1] != b"." and b"\n." not in data:
            return data + b"=\r\n"
    elif _QP_LITERAL.fullmatch(value):  # a short value with spaces: a name
        return value.encode("ascii") + b"=\r\n"
    return _qp(value) + b"=\r\n"


@dataclass
class _Skeleton:
    head: bytes  # static headers before the per-recipient ones
    mid: bytes  # static headers after them + the MIME preamble up to the text body
    between: bytes  # closes the text part and opens the HTML part
    tail: bytes  # the closing boundary
    text: _Part
    html: _Part
    header_names: list[str]
    date: str

    @classmethod
    def build(cls, compiled: CompiledEdition) -> _Skeleton:
        from_line, subject_line, list_id_line = _header_lines(compiled)
        date = email.utils.format_datetime(dt.datetime.fromisoformat(compiled.compiled_at))
        # The boundary cannot occur in a QP body: QP output never contains "==_".
        boundary = f"==_{secrets.token_hex(12)}_=="
        head = "".join([from_line, subject_line])
        mid = "".join([
            list_id_line,
            f"List-Unsubscribe-Post: {ONE_CLICK}\r\n",
            "MIME-Version: 1.0\r\n",
            f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n',
            "\r\n",
            f"--{boundary}\r\n",
            'Content-Type: text/plain; charset="utf-8"\r\n',
            "Content-Transfer-Encoding: quoted-printable\r\n",
            "\r\n",
        ])
        # The CRLF before a boundary belongs to the delimiter (RFC 2046 §5.1.1), not the body.
        between = "".join([
            f"\r\n--{boundary}\r\n",
            'Content-Type: text/html; charset="utf-8"\r\n',
            "Content-Transfer-Encoding: quoted-printable\r\n",
            "\r\n",
        ])
        names = ["From", *(["Reply-To"] if compiled.reply_to else []), "Subject", "Date", "To",
                 "Message-ID", "List-Unsubscribe", "List-Id", "List-Unsubscribe-Post",
                 "MIME-Version", "Content-Type"]
        skeleton = cls(head=head.encode("ascii"), mid=mid.encode("ascii"),
                   between=between.encode("ascii"), tail=f"\r\n--{boundary}--\r\n".encode("ascii"),
                   text=_Part.build(compiled.text, compiled.markers),
                   html=_Part.build(compiled.html, compiled.markers),
                   header_names=names, date=date)
        skeleton.check(compiled.source)
        return skeleton

    def check(self, source: str) -> None:
        """What every message built on this skeleton relies on, checked once per edition: no
        bare CR or LF, no over-long line, no line that starts with a dot (SMTP sends these
        messages unstuffed), and static header fields that parse back to the names written,
        so that per message only the per-recipient header lines need checking."""
        static = b"".join([self.head, self.mid, *self.text.pieces, self.between,
                           *self.html.pieces, self.tail])
        if _bad_lines(static):
            raise EditionError("the compiled edition has a bare CR/LF or an over-long line",
                               source)
        if static.startswith(b".") or b"\r\n." in static:
            raise EditionError("the compiled edition has a line that starts with a dot", source)
        try:
            names = [k for k, _ in _fields((self.head + self.mid).split(b"\r\n\r\n", 1)[0])]
        except MessageRefused as exc:
            raise EditionError(f"the compiled edition's headers do not parse: {exc}",
                               source) from None
        if names != [n for n in self.header_names if n not in _PER_RECIPIENT]:
            raise EditionError(f"the compiled edition's headers parse as {names}", source)


def build_message(compiled: CompiledEdition, recipient: RecipientLike, urls: RecipientUrls, *,
                  message_id: str, dkim: DkimKey | None = None,
                  date: dt.datetime | None = None) -> bytes:
    """The complete message for one recipient, as CRLF bytes ready for SMTP DATA.

    It is what `SmtpPool.send(prepared=True)` needs: CRLF line ends only, a final CRLF, and
    no line that starts with a dot (QP writes a leading dot `=2E`, values start lines after
    soft breaks, and the static pieces are checked once per edition), so SMTP sends it as it
    stands instead of scanning 60 KB for dots to stuff.

    `message_id` comes from `mailer.reference.message_id` so a retry reuses it. `date`
    defaults to when the edition was compiled. The envelope sender (VERP return path) is the
    SMTP layer's business: Return-Path is added by the receiving MTA, so it is not written.
    Raises MessageRefused when the recipient's values cannot be written safely.
    """
    if not _MSGID.fullmatch(message_id):
        raise MessageRefused(f"malformed Message-ID: {message_id!r}")
    sk = compiled.skeleton()
    to_line = _format_to(recipient)
    unsub = list_unsubscribe(urls)
    values = _slot_values(recipient, urls)
    if _CONTROL.search(values["name"]):
        raise MessageRefused(f"recipient name contains a control character: {values['name']!r}")
    for slot in ("preferences", "view_online"):
        if _CONTROL.search(values[slot]) or " " in values[slot]:
            raise MessageRefused(f"unusable {slot} URL: {values[slot]!r}")
    text_values = {s: _qp_value(v) for s, v in values.items()}
    html_values = {}
    for slot, value in values.items():
        html_values[slot] = (text_values[slot] if _HTML_SPECIAL.search(value) is None
                             else _qp_value(str(markupsafe.escape(value))))
    date_text = sk.date if date is None else email.utils.format_datetime(date)
    per_recipient = (f"Date: {date_text}\r\nTo: {to_line}\r\nMessage-ID: {message_id}\r\n"
                     f"List-Unsubscribe: {unsub}\r\n").encode("ascii")
    chunks = [sk.head, per_recipient, sk.mid, *sk.text.join(text_values), sk.between,
              *sk.html.join(html_values), sk.tail]
    _check_per_recipient(per_recipient, to_line)
    raw = b"".join(chunks)
    if dkim is not None:
        raw = dkim_sign(raw, dkim)
    return raw


def check_round_trip(raw: bytes, expected_headers: Sequence[str] | None = None,
                     recipient: str | None = None) -> None:
    """Refuse a message that does not parse back to what was meant.

    Serialise -> parse must give the same header names in the same order, no bare CR or LF
    and no line over 998 octets; To must parse to exactly the one recipient. This is what
    catches CVE-2024-6923 on an unpatched Python: the injected line parses as an extra header.
    `build_message` checks the same per edition and per recipient, at a fraction of the cost
    (`_Skeleton.check`, `_check_per_recipient`).
    """
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        raise MessageRefused("the message has no header/body separator")
    if _bad_lines(raw):
        raise MessageRefused("the message has a bare CR or LF, or a line over 998 octets")
    parsed = BytesHeaderParser(policy=email_policy.compat32).parsebytes(raw[:end + 4])
    if parsed.defects:
        raise MessageRefused(f"the headers do not parse cleanly: {parsed.defects}")
    fields = [(k, str(v)) for k, v in parsed.items()]
    names = [k for k, _ in fields]
    if expected_headers is not None and [n.lower() for n in names] != [
            n.lower() for n in expected_headers]:
        raise MessageRefused(f"headers changed in serialisation: expected "
                             f"{list(expected_headers)}, got {names}")
    if [n.lower() for n in names].count("list-unsubscribe") != 1:
        raise MessageRefused("a list message needs exactly one List-Unsubscribe")
    if recipient is not None:
        pairs = email.utils.getaddresses([v for k, v in fields if k.lower() == "to"])
        if [addr for _, addr in pairs] != [recipient.strip()]:
            raise MessageRefused(f"To does not parse back to the one recipient: {pairs}")


_FIELD_NAME = re.compile(rb"[!-9;-~]+")
_PER_RECIPIENT = ("Date", "To", "Message-ID", "List-Unsubscribe")


def _check_per_recipient(block: bytes, to_value: str) -> None:
    """`check_round_trip` for the header lines written per recipient: the skeleton's static
    lines around them were checked once, and these start and end on line boundaries, so
    together they are the whole header block. This is where CVE-2024-6923 is caught on an
    unpatched Python: an injected line parses as an extra field."""
    if _bad_lines(block):
        raise MessageRefused("the message has a bare CR or LF, or a line over 998 octets")
    fields = _fields(block[:-2])
    if tuple(k for k, _ in fields) != _PER_RECIPIENT:
        raise MessageRefused(f"headers changed in serialisation: expected "
                             f"{list(_PER_RECIPIENT)}, got {[k for k, _ in fields]}")
    if fields[1][1] != to_value:
        raise MessageRefused("To does not parse back to the value written")


def _fields(block: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) for each header field; refuses anything that is not a field.
    RFC 5322 field syntax only: ~10x cheaper than the feedparser, and the same result for
    the header lines we write."""
    fields: list[tuple[str, str]] = []
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            field, unfolded = fields[-1]
            fields[-1] = (field, unfolded + line.decode("ascii", "replace"))
            continue
        name, colon, value = line.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise MessageRefused(f"not a header field: {line[:80]!r}")
        fields.append((name.decode("ascii"), value.lstrip().decode("ascii", "replace")))
    return fields


_BARE_OR_LONG = re.compile(rb"\r(?!\n)|(?<!\r)\n|[^\r\n]{999}")


def _bad_lines(data: bytes) -> bool:
    if len(data) < 8192:  # a header block: counting is cheaper than the regex
        crlf = data.count(b"\r\n")
        return (data.count(b"\n") != crlf or data.count(b"\r") != crlf
                or (len(data) > 998 and any(len(line) > 998 for line in data.split(b"\r\n"))))
    return _BARE_OR_LONG.search(data) is not None


# ---- DKIM ----

def dkim_sign(raw: bytes, key: DkimKey, *, sign: Callable[..., bytes] | None = None) -> bytes:
    """Prepend an rsa-sha256 relaxed/relaxed DKIM-Signature whose h= covers (and over-signs)
    both unsubscribe headers; dkimpy's default list leaves List-Unsubscribe-Post out.

    `mailer.signing.sign` signs (~1 ms a message; dkimpy, pure-Python RSA, 7 ms or more);
    `sign=dkim.sign` takes the same arguments, for comparison.
    """
    signer = sign or signing.sign
    signature = signer(raw, key.selector.encode(), key.domain.encode(), key.private_key_pem,
                       include_headers=list(DKIM_HEADERS),
                       canonicalize=(b"relaxed", b"relaxed"))
    return signature + raw


# ---- the slow reference build (tests, and a fallback that is easy to trust) ----

def build_reference_message(compiled: CompiledEdition, recipient: RecipientLike,
                            urls: RecipientUrls, *, message_id: str,
                            date: dt.datetime | None = None) -> bytes:
    """The same message built with `EmailMessage`, ~6.5 ms each: the equivalence baseline."""
    page = personalise(compiled, recipient, urls)
    msg = EmailMessage(policy=POLICY)
    msg["From"] = Address(display_name=compiled.from_name, addr_spec=compiled.from_address)
    if compiled.reply_to:
        msg["Reply-To"] = Address(addr_spec=compiled.reply_to)
    msg["Subject"] = compiled.subject
    msg["Date"] = email.utils.format_datetime(
        date or dt.datetime.fromisoformat(compiled.compiled_at))
    name = " ".join((recipient.name or "").split())
    msg["To"] = Address(display_name=name, addr_spec=recipient.email.strip())
    msg["Message-ID"] = message_id
    msg["List-Unsubscribe"] = list_unsubscribe(urls)
    msg["List-Id"] = f"{compiled.title or compiled.from_name} <{compiled.list_id}>"
    msg["List-Unsubscribe-Post"] = ONE_CLICK
    msg.set_content(page.text, cte="quoted-printable")
    msg.add_alternative(page.html, subtype="html", cte="quoted-printable")
    return msg.as_bytes()


# ---- list emails from templates/emails (reminders; issue 6) ----

EMAIL_TEMPLATE_DIR = TEMPLATE_DIR.parent / "emails"


@dataclass(frozen=True)
class Attachment:
    filename: str  # ASCII, no quotes: it goes into a header as is
    content_type: str  # e.g. "text/calendar; method=PUBLISH"
    data: bytes


@functools.cache
def _email_env(autoescape: bool) -> jinja2.Environment:
    # The emails' own templates first, then the edition partials (footer) they share.
    loader = jinja2.ChoiceLoader([jinja2.FileSystemLoader(EMAIL_TEMPLATE_DIR),
                                  jinja2.FileSystemLoader(TEMPLATE_DIR)])
    return jinja2.Environment(loader=loader, autoescape=autoescape,  # noqa: S701 - text part
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def compile_list_email(template: str, context: dict[str, Any], settings: Settings, *,
                       subject: str, title: str, preheader: str | None = None,
                       attachments: Sequence[Attachment] = (),
                       now: dt.datetime | None = None,
                       why: str | None = None) -> CompiledEdition:
    """A list message other than an edition (a reminder, a welcome), through the same MJML,
    premailer, slots, unsubscribe headers and skeleton as editions: `<template>.mjml.j2` and
    `<template>.txt.j2` under templates/emails/. Context values are escaped in the HTML.
    `why` says why the reader gets it (by default: they asked for reminders)."""
    _check_header_text(subject, "subject", template)
    for item in attachments:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", item.filename):
            raise EditionError(f"attachment name {item.filename!r} is not a plain file name",
                               template)
    markers = _markers()
    why = why or (f"You are getting this email because you asked {settings.from_name} for "
                  f"reminders of dates of interest to first responders in Kent and Essex.")
    full = {"lang": "en-GB", "subject": subject, "preheader": preheader, "title": title,
            "from_name": settings.from_name, "contact_address": settings.contact_address,
            "why": why, "slots": markers, "column_width": COLUMN_WIDTH,
            "text_inset": TEXT_INSET, **context}
    where = f"{EMAIL_TEMPLATE_DIR / template}.mjml.j2 (rendered)"
    html = inline_css(mjml_to_html(
        _email_env(True).get_template(f"{template}.mjml.j2").render(full), where))
    text = _email_env(False).get_template(f"{template}.txt.j2").render(
        {**full, "why_wrapped": wrap(why),
         "sender": wrap(f"Sent by {settings.from_name}. "
                        f"Write to us at {settings.contact_address}.")})
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"
    import base64

    compiled = CompiledEdition(
        html=html.rstrip("\n") + "\n", text=text, subject=subject, preheader=preheader,
        from_name=settings.from_name, from_address=settings.from_address,
        list_id=settings.list_id, markers=markers, title=title, source=template,
        reply_to=_reply_to(settings, template),
        compiled_at=(now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds"),
        attachments=[{"filename": a.filename, "content_type": a.content_type,
                      "data": base64.b64encode(a.data).decode("ascii")} for a in attachments])
    compiled.warnings = preflight(compiled)
    return compiled


def _mixed_skeleton(compiled: CompiledEdition) -> _Skeleton:
    """The edition skeleton wrapped in multipart/mixed with the attachments after it.

    The alternative part stays byte for byte what editions send; only the static header
    block and the tail change, so per-recipient cost is the same.
    """
    sk = _Skeleton.build(compiled)
    inner = re.search(rb'Content-Type: multipart/alternative; boundary="([^"]+)"\r\n\r\n',
                      sk.mid)
    assert inner is not None
    outer = f"==_{secrets.token_hex(12)}_=="
    opened = (f'Content-Type: multipart/mixed; boundary="{outer}"\r\n\r\n--{outer}\r\n'
              .encode("ascii") + inner[0])
    parts = []
    for item in compiled.attachments:
        body = item["data"]
        lines = "\r\n".join(body[i:i + 76] for i in range(0, len(body), 76))
        parts.append(f"--{outer}\r\nContent-Type: {item['content_type']}; "
                     f'name="{item["filename"]}"\r\nContent-Disposition: attachment; '
                     f'filename="{item["filename"]}"\r\nContent-Transfer-Encoding: base64\r\n'
                     f"\r\n{lines}\r\n")
    tail = sk.tail + "".join(parts).encode("ascii") + f"--{outer}--\r\n".encode("ascii")
    mixed = _Skeleton(head=sk.head, mid=sk.mid.replace(inner[0], opened, 1),
                      between=sk.between, tail=tail, text=sk.text, html=sk.html,
                      header_names=sk.header_names, date=sk.date)
    mixed.check(compiled.source)
    return mixed
