"""Word import: the sample newsletter typed into Word comes back as the sample edition; every
problem names its place in the Word document; hostile files are refused with nothing stored."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import docx
import pytest
from markdown_it.token import Token
from msoffcrypto.format.ooxml import OOXMLFile

from mailer import media
from mailer.cli import run
from mailer.config import Settings
from mailer.edition import Edition, Table, parse_edition
from mailer.render import compile_edition
from mailer.wordimport import (
    MAX_UNPACKED_BYTES,
    OLE_SIGNATURE,
    Details,
    Problem,
    WordImportError,
    import_docx,
)
from tests.word_documents import (
    CONTACT,
    PHOTO_ALT,
    PHOTO_SECTION,
    add_link,
    add_picture,
    photo,
    sample_docx,
    sample_edition,
)


@pytest.fixture
def conf(tmp_path: Path) -> Settings:
    return Settings(var_dir=tmp_path / "var", base_url="https://news.example.org",
                    secret_key="s" * 40, suppression_key="k" * 40)


def stored(conf: Settings) -> list[str]:
    folder = media.media_dir(conf)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _words(tokens: list[Token]) -> str:
    return " ".join(" ".join(c.content if c.type != "softbreak" else " "
                             for t in tokens for c in t.children or []).split())


def content(edition: Edition) -> dict[str, object]:
    """Everything a reader gets from an edition, with the layout it is given: per section its
    kind, its sub-headings, paragraphs, list items and tables (as words), and every link."""
    def blocks(items: list[list[Token] | Table]) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        for block in items:
            if isinstance(block, Table):
                out.append(("table", [[c.content for c in row]
                                      for row in [block.header, *block.rows]]))
                continue
            for index, token in enumerate(block):
                if token.type != "inline" or any(c.type == "image" for c in token.children or []):
                    continue
                kind = block[index - 1].type
                kind = {"heading_open": "heading", "paragraph_open": "text"}[kind]
                if any(t.type == "bullet_list_open" for t in block[:index]):
                    kind = "item"
                out.append((kind, _words([token])))
        return out

    links = [(text, href) for text, href, _ in edition.links]
    links = [(CONTACT, f"mailto:{CONTACT}") if href == "contact:" else (t, href)
             for t, href in links]
    intro = [(k, w.replace("contact:", CONTACT) if isinstance(w, str) else w)
             for k, w in blocks(edition.intro)]
    return {"intro": intro, "links": links,
            "sections": [(s.title, s.kind, blocks(s.blocks)) for s in edition.sections]}


def test_the_sample_newsletter_from_word_is_the_sample_edition(conf: Settings) -> None:
    result = import_docx(sample_docx(), conf, name="summer-2020.docx")
    assert result.problems == []
    edition = parse_edition(result.source, "imported.md")
    sample = sample_edition()
    assert (edition.meta.title, edition.meta.issue, edition.meta.date) == (
        sample.meta.title, sample.meta.issue, sample.meta.date)
    # Every heading (with its layout), paragraph, list item, figure and link of the sample.
    assert content(edition) == content(sample)
    # The photograph: in the media store, shown in its section with Word's alt text.
    [image] = result.media
    assert stored(conf) == [image.name] and image.alt == PHOTO_ALT
    assert (image.width, image.height) == (1200, 675)
    section = next(s for s in edition.sections if s.title == PHOTO_SECTION)
    assert f"![{PHOTO_ALT}]({image.url})" in result.source
    assert any(c.type == "image" for b in section.blocks if not isinstance(b, Table)
               for t in b for c in t.children or [])


def test_the_imported_dates_render_with_each_date_in_its_cell(conf: Settings) -> None:
    result = import_docx(sample_docx(), conf, name="summer-2020.docx")
    assert "- **14 September**: Operation Aidant, focus on labour exploitation" in result.source
    compiled = compile_edition(parse_edition(result.source, "imported.md"), conf)
    rows = re.findall(r'<th scope="row"[^>]*>(.*?)</th>\s*<td[^>]*>(.*?)</td>', compiled.html,
                      re.DOTALL)
    dates = [(th.strip(), td.strip()) for th, td in rows if "September" in th or "ber" in th]
    assert dates == [("14 September", "Operation Aidant, focus on labour exploitation"),
                     ("18 October", "World Anti-Slavery Day"),
                     ("2 December", "The International Day for the Abolition of Slavery")]
    assert f'alt="{PHOTO_ALT}"' in compiled.html and f"[image: {PHOTO_ALT}]" in compiled.text


def word(build) -> bytes:  # type: ignore[no-untyped-def]
    document = docx.Document()
    document.add_heading("MSHT newsletter", 0)
    document.add_paragraph("Issue 4 · 1 March 2021", style="Subtitle")
    build(document)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def test_placeholder_insecure_and_empty_links_are_named_by_heading_and_opening_words(
        conf: Settings) -> None:
    def build(document: docx.document.Document) -> None:
        document.add_heading("Useful Links", 1)
        for text, url in (("NRM guidance", "#"), ("Unseen", "http://unseen.example.org"),
                          ("Home Office", "https://example.org/home-office")):
            add_link(document.add_paragraph(style="List Bullet"), text, url)
        document.add_heading("Consultation", 1)
        paragraph = document.add_paragraph("A link to the survey can be found ")
        add_link(paragraph, "here", "#")
    result = import_docx(word(build), conf, name="links.docx")
    assert result.problems == [
        Problem("under the heading “Useful Links”, at “NRM guidance”",
                "placeholder link '#': link to the real page (https://...)"),
        Problem("under the heading “Useful Links”, at “Unseen”",
                "insecure link 'http://unseen.example.org': use https://"),
        Problem("under the heading “Consultation”, at “A link to the survey can…”",
                "placeholder link '#': link to the real page (https://...)"),
    ]
    assert "## Useful Links {.links}" in result.source and not result.ok


def test_a_picture_without_alt_text_is_stored_and_flagged_where_it_is(conf: Settings) -> None:
    def build(document: docx.document.Document) -> None:
        document.add_heading("Kent picture", 1)
        document.add_paragraph("The map shows the three divisions.")
        add_picture(document, photo((800, 600)), None)
    result = import_docx(word(build), conf, name="map.docx")
    [image] = result.media
    assert stored(conf) == [image.name]
    [problem] = result.problems
    assert problem.where == "under the heading “Kent picture”"
    assert "without alt text" in problem.message and "View Alt Text" in problem.message


def test_title_issue_and_date_come_from_the_document_or_are_asked_for(conf: Settings) -> None:
    data = sample_docx(subtitle=False)  # no 'Issue 2 · 1 September 2020' line
    with pytest.raises(WordImportError) as refused:
        import_docx(data, conf, name="summer.docx")
    # The issue is found in the text ("the second issue"), the date nowhere.
    assert refused.value.missing == ["the date (--date YYYY-MM-DD)"]
    assert "summer.docx does not say the date (--date YYYY-MM-DD)" in str(refused.value)
    assert stored(conf) == [], "nothing is stored while details are missing"
    import datetime as dt

    result = import_docx(data, conf, name="summer.docx",
                         details=Details(date=dt.date(2020, 9, 1), subject="Summer 2020"))
    edition = parse_edition(result.source, "x.md")
    assert (edition.meta.issue, edition.meta.date, edition.meta.subject) == (
        2, dt.date(2020, 9, 1), "Summer 2020")


def test_word_text_that_looks_like_markup_stays_text(conf: Settings) -> None:
    lines = ["<script>alert(1)</script> and <b>tags</b>", "1. not a list", "# not a heading",
             "*stars* and _underscores_ and [brackets](x) | pipes", "&amp; stays &amp;"]

    def build(document: docx.document.Document) -> None:
        document.add_heading("Text", 1)
        for line in lines:
            document.add_paragraph(line)
    result = import_docx(word(build), conf, name="text.docx")
    assert result.problems == []
    edition = parse_edition(result.source, "x.md")
    [section] = edition.sections
    assert [_words([t]) for b in section.blocks if not isinstance(b, Table)
            for t in b if t.type == "inline"] == lines
    assert edition.links == []


# ---- hostile files ----

def _rezip(data: bytes, change: dict[str, bytes | None]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if info.filename in change:
                replaced = change[info.filename]
                if replaced is not None:
                    target.writestr(info.filename, replaced)
            else:
                target.writestr(info, source.read(info))
        for name, value in change.items():
            if name not in source.namelist() and value is not None:
                target.writestr(name, value)
    return out.getvalue()


def _docm(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        types = source.read("[Content_Types].xml")
    types = types.replace(b"wordprocessingml.document.main+xml",
                          b"ms-word.document.macroEnabled.main+xml".replace(
                              b"ms-word", b"ms-word"))
    types = types.replace(b"application/vnd.openxmlformats-officedocument.ms-word.document."
                          b"macroEnabled.main+xml",
                          b"application/vnd.ms-word.document.macroEnabled.main+xml")
    return _rezip(data, {"[Content_Types].xml": types, "word/vbaProject.bin": b"\0" * 512})


def _encrypted(data: bytes) -> bytes:
    out = io.BytesIO()
    OOXMLFile(io.BytesIO(data)).encrypt("Kent2020!", out)
    return out.getvalue()


def _zip_bomb(data: bytes) -> bytes:
    out = io.BytesIO(data)
    with zipfile.ZipFile(out, "a", zipfile.ZIP_DEFLATED) as target, \
            target.open("word/media/padding.bin", "w", force_zip64=True) as member:
        zeros = b"\0" * (1 << 20)
        for _ in range(MAX_UNPACKED_BYTES // len(zeros) + 2):
            member.write(zeros)
    return out.getvalue()


def _xxe(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        document = source.read("word/document.xml")
    declaration, _, rest = document.partition(b"?>")
    evil = (declaration + b'?>\n<!DOCTYPE w:document [<!ENTITY xxe SYSTEM '
            b'"file:///etc/passwd">]>' + rest.replace(b"<w:t>", b"<w:t>&xxe;", 1))
    return _rezip(data, {"word/document.xml": evil})


HOSTILE = {
    "old .doc": ("report.doc", lambda d: OLE_SIGNATURE + b"\0" * 4096,
                 "is an old-style Word document (.doc, Word 97-2003)"),
    ".docm by name": ("report.docm", lambda d: d, "is a macro-enabled document (.docm)"),
    ".docm inside a .docx name": ("report.docx", _docm, "contains macros"),
    "password": ("report.docx", _encrypted, "is protected with a password"),
    "corrupt zip": ("report.docx", lambda d: d[: len(d) // 2],
                    "is damaged: the file is cut short or broken"),
    "not a document": ("report.docx", lambda d: b"%PDF-1.7\n" + b"x" * 100,
                       "is not a Word document (.docx)"),
    "zip without document.xml": ("report.docx",
                                 lambda d: _rezip(d, {"word/document.xml": None}),
                                 "it has no word/document.xml"),
    "oversize": ("report.docx", lambda d: d + b"\0" * (21 * 1024 * 1024),
                 "the limit is 20 MB"),
    "zip bomb": ("report.docx", _zip_bomb, "refused as a possible zip bomb"),
    "xml external entity": ("report.docx", _xxe, "DOCTYPE or ENTITY declaration in "
                                                  "word/document.xml"),
}


@pytest.fixture(scope="module")
def good_docx() -> bytes:
    return sample_docx()


@pytest.mark.parametrize("case", list(HOSTILE))
def test_each_hostile_file_is_refused_with_its_own_message_and_nothing_stored(
        conf: Settings, good_docx: bytes, case: str) -> None:
    name, make, message = HOSTILE[case]
    with pytest.raises(WordImportError) as refused:
        import_docx(make(good_docx), conf, name=name)
    assert message in str(refused.value)
    assert str(refused.value).startswith(name)
    assert stored(conf) == []


def test_the_messages_of_the_hostile_files_differ() -> None:
    assert len({message for _, _, message in HOSTILE.values()}) == len(HOSTILE)


# ---- the command line ----

@pytest.fixture
def https(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> Settings:
    monkeypatch.setenv("MAILER_BASE_URL", "https://news.example.org")
    return Settings()

def test_cli_imports_to_a_file_that_validates(https: Settings, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "summer.docx"
    source.write_bytes(sample_docx())
    out = tmp_path / "summer.md"
    assert run(["edition", "import", str(source), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "stored picture" in printed
    assert run(["edition", "validate", str(out)]) == 0
    assert "ok:" in capsys.readouterr().out


def test_cli_refuses_a_hostile_file_and_writes_nothing(https: Settings, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       good_docx: bytes) -> None:
    source = tmp_path / "bad.docx"
    source.write_bytes(_xxe(good_docx))
    out = tmp_path / "bad.md"
    assert run(["edition", "import", str(source), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "DOCTYPE or ENTITY" in err and "Traceback" not in err
    assert not out.exists() and stored(https) == []


def test_cli_lists_problems_and_asks_for_missing_details(https: Settings, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    source = tmp_path / "summer.docx"
    source.write_bytes(sample_docx(subtitle=False, photo_alt=None))
    assert run(["edition", "import", str(source)]) == 1
    assert "--date YYYY-MM-DD" in capsys.readouterr().err
    assert run(["edition", "import", str(source), "--date", "2020-09-01"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("---\ntitle: Modern Slavery & Human Trafficking newsletter\n")
    assert f"to fix: under the heading “{PHOTO_SECTION}”" in err
    assert "1 problem(s) to fix" in err


def test_pictures_on_a_site_without_https_are_one_clear_problem(settings: Settings) -> None:
    result = import_docx(sample_docx(), settings, name="summer.docx")  # base URL http://
    [problem] = result.problems
    assert problem.where == f"under the heading “{PHOTO_SECTION}”"
    assert problem.message.startswith(f"the picture's address {settings.base_url}/media/")
    assert "MAILER_BASE_URL" in problem.message


def test_slimming_styles_xml_changes_nothing_mammoth_makes_of_it(
        good_docx: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailer import wordimport

    members = wordimport.open_package(good_docx, "sample.docx")
    slim = wordimport._to_html(members, "sample.docx")
    assert len(wordimport._slim_styles(members["word/styles.xml"])) < len(
        members["word/styles.xml"]) / 10
    monkeypatch.setattr(wordimport, "_slim_styles", lambda xml: xml)
    full = wordimport._to_html(members, "sample.docx")
    assert slim[0] == full[0] and "<h1 class=\"title\">" in slim[0] and "<ul><li>" in slim[0]


def test_a_run_of_dated_paragraphs_opening_a_section_becomes_its_dates(conf: Settings) -> None:
    def build(document: docx.document.Document) -> None:
        document.add_heading("Events", 1)
        document.add_paragraph("18th October World Anti-Slavery Day")
        document.add_paragraph("Dec 2nd: The International Day for the Abolition of Slavery")
        document.add_paragraph("Write to us with your own events.")
        document.add_heading("Meeting", 1)
        document.add_paragraph("3 May we met the partners.")  # one dated line is just text
        document.add_heading("Steps", 1)
        document.add_paragraph("First step", style="List Number")
        document.add_paragraph("Second step", style="List Number")
    result = import_docx(word(build), conf, name="events.docx")
    assert result.problems == []
    assert ("## Events {.dates}\n\n- **18 October**: World Anti-Slavery Day\n"
            "- **2 December**: The International Day for the Abolition of Slavery\n\n"
            "Write to us with your own events.\n") in result.source
    assert "## Meeting\n\n3 May we met the partners.\n" in result.source
    assert "## Steps\n\n1. First step\n1. Second step\n" in result.source
    kinds = [s.kind for s in parse_edition(result.source, "x.md").sections]
    assert kinds == ["dates", "prose", "prose"]
