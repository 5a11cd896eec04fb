"""Parse and validate an edition source: YAML front matter over CommonMark (with tables).

Pure: no settings, no database, no files other than the one named. Every problem is reported
with `file:line`, and all problems found in one pass are reported together, because a
co-ordinator fixing an edition should not have to run `validate` once per mistake.

Body structure:
- text before the first `##` heading is the introduction;
- each `## Heading` starts a section; a trailing `{.dates}`, `{.links}` or `{.figures}` on the
  heading picks the partial that lays it out (default: prose);
- `###` and deeper are sub-headings inside a section; a `#` heading is refused (the title comes
  from the front matter, so it cannot be forgotten or duplicated);
- `<contact:>` is a link to the configured contact address (the address is a setting, so an
  edition never carries someone's personal mailbox).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from markdown_it import MarkdownIt
from markdown_it.token import Token
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mailer.errors import EditionError, yaml_problem
from mailer.marking import ArchiveVisibility, Classification

SectionKind = Literal["prose", "dates", "links", "figures"]
# The email's column in CSS pixels (templates/editions: mj-body width): the widest an image
# is shown, and what the media store scales uploads to (twice this, for sharp screens).
COLUMN_WIDTH = 600
CONTACT_HREF = "contact:"
_KIND_MARK = re.compile(r"\s*\{\.([A-Za-z_-]+)\}\s*$")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Audience(BaseModel):
    model_config = ConfigDict(extra="forbid")

    regions: list[str] = Field(default_factory=list, description="empty: every region")
    roles: list[str] = Field(default_factory=list, description="empty: every role")
    organisation_types: list[str] = Field(default_factory=list,
                                          description="empty: every organisation type")
    topics: list[str] = Field(default_factory=list,
                              description="readers must also be on one of these topics")

    @field_validator("regions", "roles", "organisation_types", "topics")
    @classmethod
    def _slugs(cls, values: list[str]) -> list[str]:
        for value in values:
            if not _SLUG.match(value):
                raise ValueError(f"{value!r} is not a lower-case key such as 'kent'")
        return values


class Image(BaseModel):
    model_config = ConfigDict(extra="forbid")

    src: str
    alt: str = Field(min_length=1, description="what the image shows, for screen readers")
    width: int = Field(COLUMN_WIDTH, ge=1, le=COLUMN_WIDTH)
    caption: str | None = None

    @field_validator("src")
    @classmethod
    def _https(cls, value: str) -> str:
        problem = link_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("alt")
    @classmethod
    def _alt_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("image without alt text: say what the image shows")
        return value


class FrontMatter(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    title: str = Field(min_length=1)
    issue: int = Field(ge=1)
    date: dt.date
    subject: str = Field(min_length=1)
    preheader: str | None = None
    topic: str = Field(min_length=1)
    audience: Audience = Field(default_factory=Audience)
    # A saved segment's slug (mailer.segments) instead of audience fields written out.
    segment: str | None = None
    from_name: str | None = None
    images: list[Image] = Field(default_factory=list)
    # None: the default (today the settings', later the publication's), resolved when compiled.
    classification: Classification | None = None
    archive: ArchiveVisibility | None = None

    @field_validator("classification", mode="before")
    @classmethod
    def _marking_in_capitals(cls, value: Any) -> Any:
        # "official-sensitive" is plainly meant; the marking is written in capitals anyway.
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("title", "subject", "preheader", "from_name")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and _CONTROL.search(value):
            raise ValueError("must be one line of text (no line breaks or control characters)")
        return value

    @field_validator("topic")
    @classmethod
    def _topic_slug(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError(f"{value!r} is not a lower-case key such as 'newsletter'")
        return value

    @field_validator("segment")
    @classmethod
    def _segment_slug(cls, value: str | None) -> str | None:
        if value is not None and not _SLUG.match(value):
            raise ValueError(f"{value!r} is not a segment's slug such as 'kent-police'")
        return value

    @model_validator(mode="after")
    def _one_audience(self) -> FrontMatter:
        # Both would leave the reader to guess which one wins.
        if self.segment is not None and self.audience != Audience():
            raise ValueError("give either 'segment:' or 'audience:', not both")
        return self


@dataclass(frozen=True)
class Table:
    header: list[Token]  # inline tokens, one per cell
    rows: list[list[Token]]
    line: int


@dataclass
class Section:
    title: str
    kind: SectionKind
    line: int
    # Each block is either a run of markdown-it block tokens or a Table.
    blocks: list[list[Token] | Table] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-") or "section"


@dataclass
class Edition:
    path: str
    meta: FrontMatter
    intro: list[list[Token] | Table]
    sections: list[Section]
    links: list[tuple[str, str, int]]  # (text, href, line) in reading order
    # The file line of each front-matter key path, e.g. ("audience", "regions", 1): for
    # the checks that need more than this file (mailer.audience) to name their line.
    lines: dict[tuple[Any, ...], int] = field(default_factory=dict)

    def line_of(self, *path: Any) -> int:
        """The line of the key path, or of its nearest enclosing key, or 1."""
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return 1

    @property
    def subject(self) -> str:
        return self.meta.subject


def markdown() -> MarkdownIt:
    # html=True so raw HTML becomes tokens we can refuse by line, instead of silently text.
    md = MarkdownIt("commonmark", {"html": True}).enable("table")
    # The default validator drops javascript: links without a trace; we want to see and
    # name them, so accept everything here and judge each href ourselves.
    md.validateLink = lambda url: True  # type: ignore[method-assign]
    return md


def link_problem(href: str) -> str | None:
    """Why this link target cannot go in an email, or None when it can."""
    target = href.strip()
    if not target:
        return "empty link target"
    if target.startswith("#"):
        return f"placeholder link {target!r}: link to the real page (https://...)"
    if target == CONTACT_HREF:
        return None
    scheme = urlsplit(target).scheme.lower()
    if scheme in ("javascript", "vbscript", "data", "file"):
        return f"{scheme}: links are not allowed in email"
    if scheme == "mailto":
        return None if "@" in target else f"mailto link without an address: {target!r}"
    if scheme == "https":
        return None if urlsplit(target).netloc else f"link without a host: {target!r}"
    if scheme == "http":
        return f"insecure link {target!r}: use https://"
    if not scheme:
        return f"relative link {target!r}: an email needs an absolute https:// URL"
    return f"unsupported link scheme {scheme}: in {target!r}"


class _Loader(yaml.SafeLoader):
    """SafeLoader that leaves dates as strings, so a bad date is a message, not a crash."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _key_lines(text: str, first_line: int) -> dict[tuple[Any, ...], int]:
    """Line (1-based, in the file) of every key path in the front matter, for error messages."""
    lines: dict[tuple[Any, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[Any, ...]) -> None:
        lines[path] = node.start_mark.line + first_line
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[(*path, key.value)] = key.start_mark.line + first_line
                walk(value, (*path, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, (*path, index))

    root = yaml.compose(text, Loader=_Loader)
    if root is not None:
        walk(root, ())
    return lines


def _split_front_matter(text: str, where: str) -> tuple[str, int, str, int]:
    """(yaml, first yaml line, body, first body line), lines 1-based."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        raise EditionError("the file must start with '---' and YAML front matter",
                           f"{where}:1", hint="see editions/2020-q3-kent-essex.md")
    for index in range(1, len(lines)):
        if lines[index].strip() in ("---", "..."):
            return "".join(lines[1:index]), 2, "".join(lines[index + 1:]), index + 2
    raise EditionError("the front matter is not closed with '---'", f"{where}:1")


def _front_matter(text: str, first: int, where: str, errors: list[EditionError]
                  ) -> FrontMatter | None:
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
        key_lines = _key_lines(text, first)
    except yaml.YAMLError as exc:
        problem, line = yaml_problem(exc, first)
        errors.append(EditionError(f"front matter is not valid YAML: {problem}",
                                   f"{where}:{line or first}"))
        return None
    if not isinstance(data, dict):
        errors.append(EditionError("front matter must be a mapping of keys to values",
                                   f"{where}:{first}"))
        return None
    try:
        meta = FrontMatter.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = next((key_lines[loc[:n]] for n in range(len(loc), 0, -1)
                         if loc[:n] in key_lines), first)
            name = ".".join(str(p) for p in loc) or "front matter"
            if err["type"] == "extra_forbidden":
                message = f"unknown key {name!r}"
            elif err["type"] == "missing":
                message = f"missing {name}"
                # A missing top-level key has no line of its own: point at the front matter.
                line = key_lines.get(loc[:-1], first) if len(loc) > 1 else first
            elif loc[:1] == ("images",) and loc[-1:] == ("alt",):
                message = f"{name}: image without alt text: say what the image shows"
            elif loc and loc[0] == "date":
                message = f"bad date {data.get('date')!r}: write it as YYYY-MM-DD"
            elif err["type"] == "string_too_short" and err.get("ctx", {}).get("min_length") == 1:
                message = f"{name} is empty: write one"
            elif err["type"] == "enum":
                message = (f"{name}: {err['input']!r} is not one we know; write "
                           f"{err['ctx']['expected']}")
            elif err["type"] == "string_too_long":
                message = (f"{name} is too long: at most {err['ctx']['max_length']} characters, "
                           f"and it has {len(str(err['input']))}")
            else:
                message = f"{name}: {err['msg']}"
            errors.append(EditionError(message, f"{where}:{line}"))
        return None
    if (meta.classification == Classification.OFFICIAL_SENSITIVE
            and meta.archive == ArchiveVisibility.PUBLIC):
        errors.append(EditionError(
            "an OFFICIAL-SENSITIVE edition cannot be public: its archive page would publish it",
            f"{where}:{key_lines.get(('archive',), first)}",
            hint="write 'archive: subscribers' (readers open it from their copy) or "
                 "'archive: none'"))
        return None
    return meta


def _inline_text(token: Token) -> str:
    return "".join(c.content for c in (token.children or [])
                   if c.type in ("text", "code_inline", "softbreak"))


def _check_inline(inline: Token, line: int, where: str, errors: list[EditionError],
                  links: list[tuple[str, str, int]]) -> None:
    children = inline.children or []
    for index, child in enumerate(children):
        if child.type == "html_inline":
            errors.append(EditionError(f"raw HTML is not allowed: {child.content!r}",
                                       f"{where}:{line}", hint="write it in Markdown"))
        elif child.type == "link_open":
            href = str(child.attrGet("href") or "")
            text = []
            for later in children[index + 1:]:
                if later.type == "link_close":
                    break
                text.append(later.content)
            problem = link_problem(href)
            if problem:
                errors.append(EditionError(problem, f"{where}:{line}"))
            links.append(("".join(text), href, line))
        elif child.type == "image":
            src = str(child.attrGet("src") or "")
            if not child.content.strip():
                errors.append(EditionError(f"image without alt text: {src!r}",
                                           f"{where}:{line}",
                                           hint="write ![what it shows](https://...)"))
            problem = link_problem(src)
            if problem or src.startswith("mailto:") or src == CONTACT_HREF:
                errors.append(EditionError(f"image source: {problem or 'not an image URL'}",
                                           f"{where}:{line}"))


def _table(tokens: list[Token], line: int) -> Table:
    header: list[Token] = []
    rows: list[list[Token]] = []
    current: list[Token] | None = None
    in_head = False
    for token in tokens:
        if token.type == "thead_open":
            in_head = True
        elif token.type == "thead_close":
            in_head = False
        elif token.type == "tr_open":
            current = []
        elif token.type == "tr_close" and current is not None:
            if in_head:
                header = current
            else:
                rows.append(current)
            current = None
        elif token.type == "inline" and current is not None:
            current.append(token)
    return Table(header=header, rows=rows, line=line)


def parse_edition(text: str, where: str = "<edition>") -> Edition:
    """Parse and validate edition source; raise one EditionError listing every problem."""
    errors: list[EditionError] = []
    fm_text, fm_first, body, body_first = _split_front_matter(text, where)
    meta = _front_matter(fm_text, fm_first, where, errors)

    tokens = markdown().parse(body)
    intro: list[list[Token] | Table] = []
    sections: list[Section] = []
    links: list[tuple[str, str, int]] = []
    target = intro
    index = 0
    while index < len(tokens):
        token = tokens[index]
        line = body_first + (token.map[0] if token.map else 0)
        if token.type == "heading_open" and token.tag in ("h1", "h2"):
            inline = tokens[index + 1]
            _check_inline(inline, line, where, errors, links)
            if token.tag == "h1":
                errors.append(EditionError(
                    "a '#' heading is not allowed: the title comes from the front matter",
                    f"{where}:{line}", hint="use '## ' for a section"))
            title = _inline_text(inline)
            kind: str = "prose"
            mark = _KIND_MARK.search(title)
            if mark:
                kind, title = mark[1], title[:mark.start()].strip()
                if kind not in ("dates", "links", "figures", "prose"):
                    errors.append(EditionError(
                        f"unknown section kind {{.{kind}}}: use .dates, .links or .figures",
                        f"{where}:{line}"))
                    kind = "prose"
            if not title:
                errors.append(EditionError("empty section heading", f"{where}:{line}"))
            section = Section(title=title, kind=kind, line=line)  # type: ignore[arg-type]
            sections.append(section)
            target = section.blocks
            index += 3
            continue
        if token.type in ("html_block", "html_inline"):
            errors.append(EditionError(f"raw HTML is not allowed: {token.content.strip()!r}",
                                       f"{where}:{line}", hint="write it in Markdown"))
            index += 1
            continue
        if token.type == "table_open":
            end = next(i for i in range(index, len(tokens)) if tokens[i].type == "table_close")
            group = tokens[index:end + 1]
            for inner in group:
                if inner.type == "inline":
                    row_line = body_first + (inner.map[0] if inner.map else 0)
                    _check_inline(inner, row_line if inner.map else line, where, errors, links)
            target.append(_table(group, line))
            index = end + 1
            continue
        # A top-level block: from its opening token to the matching close (nesting 0).
        depth, end = 0, index
        for end in range(index, len(tokens)):
            depth += tokens[end].nesting
            if depth == 0:
                break
        group = tokens[index:end + 1]
        for inner in group:
            inner_line = body_first + (inner.map[0] if inner.map else 0) if inner.map else line
            if inner.type == "inline":
                _check_inline(inner, inner_line, where, errors, links)
            elif inner.type == "html_block":
                errors.append(EditionError(f"raw HTML is not allowed: {inner.content.strip()!r}",
                                           f"{where}:{inner_line}"))
        target.append(group)
        index = end + 1

    for section in sections:
        _check_section_shape(section, where, body_first, errors)
    if not sections and not intro:
        errors.append(EditionError("the edition has no content", f"{where}:{body_first}"))
    if errors:
        errors.sort(key=lambda e: int((e.location or ":0").rpartition(":")[2] or 0))
        raise EditionErrors(errors)
    assert meta is not None
    return Edition(path=where, meta=meta, intro=intro, sections=sections, links=links,
                   lines=_key_lines(fm_text, fm_first))


def _check_section_shape(section: Section, where: str, body_first: int,
                         errors: list[EditionError]) -> None:
    if not section.blocks:
        errors.append(EditionError(f"section {section.title!r} is empty",
                                   f"{where}:{section.line}"))
    if section.kind == "figures" and not any(isinstance(b, Table) for b in section.blocks):
        errors.append(EditionError(f"{{.figures}} section {section.title!r} has no table",
                                   f"{where}:{section.line}"))
    if section.kind in ("dates", "links"):
        lists = [b for b in section.blocks if not isinstance(b, Table)
                 and b and b[0].type == "bullet_list_open"]
        if not lists:
            errors.append(EditionError(
                f"{{.{section.kind}}} section {section.title!r} needs a bullet list",
                f"{where}:{section.line}"))
    if section.kind == "links":
        for block in section.blocks:
            if isinstance(block, Table) or not block or block[0].type != "bullet_list_open":
                continue
            for token in block:
                if token.type == "inline" and not any(
                        c.type == "link_open" for c in token.children or []):
                    line = body_first + token.map[0] if token.map else section.line
                    errors.append(EditionError(
                        f"item {token.content!r} in a {{.links}} section has no link",
                        f"{where}:{line}"))


class EditionErrors(EditionError):
    """Several problems in one edition; `errors` has each, `str()` lists them all."""

    def __init__(self, errors: list[EditionError]) -> None:
        first = errors[0]
        # One problem: its hint on a line of its own; several: each with its own hint.
        text = first.args[0] if len(errors) == 1 else (
            f"{len(errors)} problems:\n" + "\n".join(e.with_hint() for e in errors))
        super().__init__(text, hint=first.hint if len(errors) == 1 else None)
        self.location = first.location
        self.errors = errors
        # MailerError prefixes the location itself; keep str() one clean list.
        self.args = (text,)


def load_edition(path: str | Path) -> Edition:
    """Read and validate the edition at `path`. Example: `load_edition("editions/x.md")`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EditionError(f"no such edition file: {path}") from None
    except UnicodeDecodeError as exc:
        raise EditionError(f"not UTF-8 text: {exc.reason}", f"{path}:1") from None
    return parse_edition(text, str(path))
