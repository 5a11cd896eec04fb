"""Real .docx files built with python-docx, as a co-ordinator's Word would write them.

`sample_docx()` is the sample newsletter (editions/2020-q3-kent-essex.md, itself the seed
newsletter) typed into Word: a Title and a Subtitle line, Heading 1 sections, Heading 2
sub-headings, bulleted lists, hyperlinks, the Kent tables, the dates as the seed wrote them
("14th September Operation Aidant ...") and a photograph with alt text.
"""

from __future__ import annotations

import io
from pathlib import Path

import docx
from docx.opc.constants import RELATIONSHIP_TYPE
from docx.oxml import OxmlElement
from docx.oxml.ns import qn
from docx.shared import Inches
from docx.text.paragraph import Paragraph
from markdown_it.token import Token
from PIL import Image

from mailer.edition import Edition, Table, load_edition

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "editions" / "2020-q3-kent-essex.md"
CONTACT = "msht-bulletin@example.org"
PHOTO_ALT = "Two officers talking to a car-wash worker"
PHOTO_SECTION = "Who are Protect & Prevent?"


def photo(size: tuple[int, int] = (1600, 900)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (40, 90, 160)).save(out, "JPEG")
    return out.getvalue()


def add_link(paragraph: Paragraph, text: str, url: str) -> None:
    """A real Word hyperlink: a relationship to the URL and a w:hyperlink run around it."""
    rid = paragraph.part.relate_to(url, RELATIONSHIP_TYPE.HYPERLINK, is_external=True)
    link = OxmlElement("w:hyperlink")
    link.set(qn("r:id"), rid)
    run = OxmlElement("w:r")
    props = OxmlElement("w:rPr")
    style = OxmlElement("w:rStyle")
    style.set(qn("w:val"), "Hyperlink")
    props.append(style)
    run.append(props)
    text_element = OxmlElement("w:t")
    text_element.text = text
    text_element.set(qn("xml:space"), "preserve")
    run.append(text_element)
    link.append(run)
    paragraph._p.append(link)


def add_picture(document: docx.document.Document, data: bytes, alt: str | None,
                width: float = 5.5) -> None:
    paragraph = document.add_paragraph()
    shape = paragraph.add_run().add_picture(io.BytesIO(data), width=Inches(width))
    doc_pr = shape._inline.docPr
    if alt is not None:
        doc_pr.set("descr", alt)
    elif "descr" in doc_pr.attrib:
        del doc_pr.attrib["descr"]


def add_inline(paragraph: Paragraph, children: list[Token]) -> None:
    """Markdown inline tokens as Word runs: text, bold, links."""
    bold = False
    href: str | None = None
    label: list[str] = []
    for child in children:
        if child.type == "strong_open":
            bold = True
        elif child.type == "strong_close":
            bold = False
        elif child.type == "link_open":
            href, label = str(child.attrGet("href")), []
        elif child.type == "link_close" and href is not None:
            text = "".join(label)
            if href == "contact:":
                text, href = CONTACT, f"mailto:{CONTACT}"
            add_link(paragraph, text, href)
            href = None
        elif child.type in ("text", "softbreak"):
            content = " " if child.type == "softbreak" else child.content
            if href is not None:
                label.append(content)
            elif content:
                paragraph.add_run(content).bold = bold or None


def _seed_date(children: list[Token]) -> str:
    """`**14 September**: Operation Aidant` as the seed typed it: `14th September Operation
    Aidant`."""
    text = "".join(c.content for c in children if c.type == "text")
    when, _, what = text.partition(": ")
    day, month = when.split(" ", 1)
    suffix = {"1": "st", "2": "nd", "3": "rd"}.get(day[-1], "th")
    if day in ("11", "12", "13"):
        suffix = "th"
    return f"{day}{suffix} {month} {what}"


def _add_blocks(document: docx.document.Document, blocks: list[list[Token] | Table],
                dates: bool) -> None:
    for block in blocks:
        if isinstance(block, Table):
            rows = [block.header, *block.rows]
            table = document.add_table(rows=len(rows), cols=len(block.header))
            for r, row in enumerate(rows):
                for c, cell in enumerate(row):
                    table.cell(r, c).text = cell.content
            continue
        for index, token in enumerate(block):
            if token.type != "inline":
                continue
            opener = block[index - 1]
            if opener.type == "heading_open":
                document.add_heading(token.content, level=int(opener.tag[1]) - 1)
            elif any(t.type == "bullet_list_open" for t in block[:index]):
                paragraph = document.add_paragraph(style="List Bullet")
                if dates:
                    paragraph.add_run(_seed_date(token.children or []))
                else:
                    add_inline(paragraph, token.children or [])
            else:
                add_inline(document.add_paragraph(), token.children or [])


def sample_edition() -> Edition:
    return load_edition(SAMPLE)


def sample_docx(*, photo_alt: str | None = PHOTO_ALT, subtitle: bool = True) -> bytes:
    edition = sample_edition()
    document = docx.Document()
    document.add_heading(edition.meta.title, 0)
    if subtitle:
        document.add_paragraph(f"Issue {edition.meta.issue} · "
                               f"{edition.meta.date.day} {edition.meta.date:%B %Y}",
                               style="Subtitle")
    _add_blocks(document, edition.intro, dates=False)
    for section in edition.sections:
        document.add_heading(section.title, level=1)
        _add_blocks(document, section.blocks, dates=section.kind == "dates")
        if section.title == PHOTO_SECTION:
            add_picture(document, photo(), photo_alt)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def long_docx(pages: int = 50) -> bytes:
    """About `pages` pages: per page a heading, three paragraphs, a bulleted list, a table."""
    document = docx.Document()
    document.add_heading("Modern Slavery & Human Trafficking newsletter", 0)
    document.add_paragraph("Issue 7 · 1 March 2027", style="Subtitle")
    words = ("Criminal exploitation is showing the highest figures across Kent with many "
             "victims including adults and juveniles, linked to county lines and forced "
             "begging. ")
    for page in range(1, pages + 1):
        document.add_heading(f"Part {page}: the picture in the divisions", level=1)
        for _ in range(3):
            paragraph = document.add_paragraph(words * 3)
            add_link(paragraph, f"Report {page}", f"https://example.org/reports/{page}")
        for item in range(4):
            document.add_paragraph(f"Finding {item + 1} of part {page}: {words}",
                                   style="List Bullet")
        table = document.add_table(rows=5, cols=2)
        table.cell(0, 0).text, table.cell(0, 1).text = "Division", "No."
        for row in range(1, 5):
            table.cell(row, 0).text = f"Division {row}"
            table.cell(row, 1).text = str(page * row)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()
