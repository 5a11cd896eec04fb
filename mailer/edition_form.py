"""The structured editor's model of an edition, and its conversion to and from the source.

The Markdown source (front matter + `##` sections) stays the one stored truth: the console's
editor shows an `EditionForm` made from the source by `from_source`, and what the author saves
is turned back into source by `to_source`, then validated and stored like any other edition.
An author never types the Markdown markers:

- a "dates" section is typed as lines `14 September: Operation Aidant ...`
  (source: `- **14 September**: Operation Aidant ...`);
- a "links" section as lines `NRM guidance | https://...` (source: `- [NRM guidance](https://...)`);
- a "figures" section as grids (first row the headings; a column of numbers is right-aligned)
  with text under them;
- a "text" section as paragraphs (Markdown still works there, for those who know it).

A line that does not have the expected shape is kept as it is, so nothing typed is lost; the
edition's own validation then names what is wrong with it.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

LAYOUTS = {"text": "Text", "dates": "Dates", "figures": "Figures table", "links": "Links"}
_KIND = {"text": "", "dates": " {.dates}", "figures": " {.figures}", "links": " {.links}"}
_MARK = re.compile(r"\s*\{\.(dates|figures|links|prose)\}\s*$")
_DATE_ITEM = re.compile(r"^[-*]\s+\*\*(?P<date>[^*]+)\*\*\s*:?\s*(?P<text>.*)$")
_LINK_ITEM = re.compile(r"^[-*]\s+\[(?P<text>[^\]]+)\]\((?P<href>[^)\s]+)\)\s*$")
_NUMBER = re.compile(r"^[£$€]?\s*[-+]?\d[\d,]*(\.\d+)?\s*%?$")
_FRONT_KEYS = ("title", "issue", "date", "subject", "preheader", "topic", "audience",
               "from_name", "classification", "archive")


@dataclass
class FormSection:
    heading: str = ""
    layout: str = "text"
    body: str = ""  # as the author types it (see the module's docstring)
    tables: list[list[list[str]]] = field(default_factory=list)  # figures: grids, row 0 heads


@dataclass
class EditionForm:
    title: str = ""
    issue: str = ""
    date: str = ""
    subject: str = ""
    preheader: str = ""
    topic: str = "newsletter"
    regions: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    organisation_types: list[str] = field(default_factory=list)
    # No field on the form: kept as given, so a round trip through the editor loses nothing.
    audience_topics: list[str] = field(default_factory=list)
    from_name: str = ""
    # "" leaves the key out of the front matter: the publication's default then applies.
    classification: str = ""
    archive: str = ""
    intro: str = ""
    sections: list[FormSection] = field(default_factory=list)
    # Front-matter keys the form has no field for (images, ...): kept as they are.
    extra: dict[str, Any] = field(default_factory=dict)


class FormSourceError(ValueError):
    """Source the editor cannot show (no front matter, or front matter that is not a map)."""


# ---------------------------------------------------------------- source -> form

def _split(source: str) -> tuple[dict[str, Any], str]:
    text = source.replace("\r\n", "\n").lstrip("\ufeff")
    if not text.startswith("---\n"):
        raise FormSourceError("the edition does not start with its front matter (---)")
    end = text.find("\n---\n", 3)
    if end < 0:
        raise FormSourceError("the front matter is not closed by a line '---'")
    try:
        meta = yaml.safe_load(text[4:end + 1]) or {}
    except yaml.YAMLError as exc:
        raise FormSourceError(f"the front matter is not valid YAML: {exc}") from None
    if not isinstance(meta, dict):
        raise FormSourceError("the front matter is not a list of 'key: value' lines")
    return meta, text[end + 5:]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


def _words(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _is_table_line(line: str) -> bool:
    return line.lstrip().startswith("|")


def _cells(line: str) -> list[str]:
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def _figures(body: str) -> tuple[list[list[list[str]]], str]:
    """The tables of a figures section, and the rest of its text."""
    tables: list[list[list[str]]] = []
    rest: list[str] = []
    current: list[list[str]] | None = None
    for line in body.split("\n"):
        if _is_table_line(line):
            cells = _cells(line)
            if current is None:
                current = [cells]
                tables.append(current)
            elif not all(re.fullmatch(r":?-{1,}:?", c) for c in cells if c):
                current.append(cells)
            continue
        current = None
        rest.append(line)
    return tables, "\n".join(rest).strip("\n")


def _from_lines(body: str, pattern: re.Pattern[str], shape: str) -> str:
    out = []
    for line in body.split("\n"):
        match = pattern.match(line.strip())
        out.append(shape.format(**match.groupdict()) if match else line)
    return "\n".join(out)


def _section(heading_line: str, body: str) -> FormSection:
    heading = heading_line[3:].strip()
    layout = "text"
    mark = _MARK.search(heading)
    if mark:
        layout = "text" if mark[1] == "prose" else mark[1]
        heading = heading[:mark.start()].strip()
    body = body.strip("\n")
    if layout == "figures":
        tables, rest = _figures(body)
        return FormSection(heading, layout, rest, tables)
    if layout == "dates":
        body = _from_lines(body, _DATE_ITEM, "{date}: {text}")
    elif layout == "links":
        body = _from_lines(body, _LINK_ITEM, "{text} | {href}")
    return FormSection(heading, layout, body)


def from_source(source: str) -> EditionForm:
    """The editor's form for an edition's source."""
    meta, body = _split(source)
    given = meta.get("audience")
    audience: dict[str, Any] = given if isinstance(given, dict) else {}
    form = EditionForm(
        title=_text(meta.get("title")), issue=_text(meta.get("issue")),
        date=_text(meta.get("date")), subject=_text(meta.get("subject")),
        preheader=_text(meta.get("preheader")), topic=_text(meta.get("topic")) or "newsletter",
        regions=_words(audience.get("regions")), roles=_words(audience.get("roles")),
        organisation_types=_words(audience.get("organisation_types")),
        audience_topics=_words(audience.get("topics")),
        from_name=_text(meta.get("from_name")),
        classification=_text(meta.get("classification")), archive=_text(meta.get("archive")),
        extra={k: v for k, v in meta.items() if k not in _FRONT_KEYS})
    chunks = re.split(r"(?m)^(## .*)$", body)
    form.intro = chunks[0].strip("\n")
    for index in range(1, len(chunks), 2):
        form.sections.append(_section(chunks[index], chunks[index + 1]))
    return form


# ---------------------------------------------------------------- form -> source

def _escape_cell(value: str) -> str:
    return " ".join(value.replace("|", "\\|").split())


def grid_rows(grid: list[list[str]]) -> list[list[str]]:
    """A grid as typed, without its empty rows and columns, every row as wide as the widest."""
    rows = [[c.strip() for c in row] for row in grid if any(c.strip() for c in row)]
    width = max((len(r) for r in rows), default=0)
    rows = [r + [""] * (width - len(r)) for r in rows]
    keep = [c for c in range(width) if any(r[c] for r in rows)]
    return [[r[c] for c in keep] for r in rows]


def table_markdown(grid: list[list[str]]) -> str:
    """A grid as a Markdown table: row 0 the headings; a column whose cells are all numbers
    is right-aligned."""
    rows = grid_rows(grid)
    if not rows:
        return ""
    head, body = rows[0], rows[1:]
    align = ["--:" if body and all(_NUMBER.match(r[c]) for r in body if r[c]) and
             any(r[c] for r in body) else "---" for c in range(len(head))]
    lines = ["| " + " | ".join(_escape_cell(c) for c in head) + " |",
             "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_escape_cell(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def _to_lines(body: str, splitter: re.Pattern[str], shape: str, already: str) -> str:
    out = []
    for line in body.split("\n"):
        stripped = line.strip()
        if not stripped or stripped.startswith(already):
            out.append(stripped)
            continue
        match = splitter.match(stripped)
        out.append(shape.format(**match.groupdict()) if match else stripped)
    return "\n".join(out)


_TYPED_DATE = re.compile(r"^(?P<date>[^:]{1,60}?)\s*:\s*(?P<text>.+)$")
_TYPED_LINK = re.compile(r"^(?P<text>.+?)\s*\|\s*(?P<href>\S+)$")


def section_markdown(section: FormSection) -> str:
    """One section's source: its heading with its layout's marker, then its body."""
    parts = [f"## {' '.join(section.heading.split())}{_KIND.get(section.layout, '')}"]
    body = section.body.replace("\r\n", "\n").strip("\n")
    if section.layout == "dates":
        body = _to_lines(body, _TYPED_DATE, "- **{date}**: {text}", "- ")
    elif section.layout == "links":
        body = _to_lines(body, _TYPED_LINK, "- [{text}]({href})", "- ")
    elif section.layout == "figures":
        parts += [t for t in (table_markdown(g) for g in section.tables) if t]
    if body:
        parts.append(body)
    return "\n\n".join(parts)


def _front(form: EditionForm) -> dict[str, Any]:
    meta: dict[str, Any] = {"title": form.title.strip()}
    issue = form.issue.strip()
    meta["issue"] = int(issue) if issue.isdigit() else issue
    try:
        meta["date"] = dt.date.fromisoformat(form.date.strip())
    except ValueError:
        meta["date"] = form.date.strip()
    meta["subject"] = form.subject.strip()
    if form.preheader.strip():
        meta["preheader"] = form.preheader.strip()
    meta["topic"] = form.topic.strip()
    meta["audience"] = {"regions": list(form.regions), "roles": list(form.roles)}
    if form.organisation_types:
        meta["audience"]["organisation_types"] = list(form.organisation_types)
    if form.audience_topics:
        meta["audience"]["topics"] = list(form.audience_topics)
    if "segment" in form.extra and not any(meta["audience"].values()):
        del meta["audience"]  # a saved segment names the audience; both would be refused
    if form.from_name.strip():
        meta["from_name"] = form.from_name.strip()
    for key in ("classification", "archive"):
        value = str(getattr(form, key)).strip()
        if value:
            meta[key] = value
    meta.update(form.extra)
    return meta


def to_source(form: EditionForm) -> str:
    """The edition source for what the editor holds."""
    front = yaml.safe_dump(_front(form), sort_keys=False, allow_unicode=True, width=1000)
    blocks = [form.intro.replace("\r\n", "\n").strip("\n")] if form.intro.strip() else []
    blocks += [section_markdown(s) for s in form.sections]
    return f"---\n{front}---\n\n" + "\n\n".join(blocks) + "\n"


def places(form: EditionForm) -> list[tuple[int, str]]:
    """(first line in `to_source(form)`, the editor's name for that part), in order: how a
    problem found at a line of the source is named for an author who never sees it."""
    source = to_source(form)
    lines = source.split("\n")
    found = [(1, "About this issue")]
    closing = lines.index("---", 1) + 1 if "---" in lines[1:] else 1
    if form.intro.strip():
        found.append((closing + 1, "Introduction"))
    number = 0
    for index, line in enumerate(lines, start=1):
        if line.startswith("## ") and number < len(form.sections):
            heading = form.sections[number].heading.strip()
            number += 1
            found.append((index, f"Section {number}" + (f" ({heading})" if heading else "")))
    return found


def place_of(found: list[tuple[int, str]], line: int) -> str | None:
    name = None
    for first, label in found:
        if first <= line:
            name = label
    return name


# ---------------------------------------------------------------- the recurring sections

RECURRING = ("dates", "links")


def next_issue(last: EditionForm) -> EditionForm:
    """A new edition started from the last one: its audience, sender and topic, and its
    recurring sections (dates, links, and the figures tables' headings to fill again); the
    issue number one more; the rest blank."""
    issue = last.issue.strip()
    sections = []
    for s in last.sections:
        if s.layout in RECURRING:
            sections.append(FormSection(s.heading, s.layout, s.body))
        elif s.layout == "figures":
            sections.append(FormSection(s.heading, s.layout, "", [
                [list(g[0])] + [[r[0]] + [""] * (len(r) - 1) for r in g[1:]]
                for g in s.tables if g]))
    return EditionForm(title=last.title, issue=str(int(issue) + 1) if issue.isdigit() else "",
                       topic=last.topic, regions=list(last.regions), roles=list(last.roles),
                       organisation_types=list(last.organisation_types),
                       from_name=last.from_name, classification=last.classification,
                       archive=last.archive, sections=sections,
                       extra={k: v for k, v in last.extra.items() if k != "images"})
