"""The structured editor's model: the sample edition goes source -> form -> source and renders
the same; typed dates, links and grids become the edition's markers; and the editor's pages
save through the same validation as the raw source."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from mailer import edition_form as ef
from mailer import revisions
from mailer.config import Settings
from mailer.edition import parse_edition
from mailer.models import Edition
from mailer.render import compile_edition
from mailer.web.app import create_app
from tests.test_admin_routes import login, make_user
from tests.web_fixtures import (  # noqa: F401
    SAMPLE,
    csrf_of,
    fault_server,
    make_fault_server,
    sink,
    web_settings,
)


def _html(source: str, settings: Settings) -> str:
    compiled = compile_edition(parse_edition(source, "x.md"), settings)
    html = compiled.html
    for name, marker in compiled.markers.items():  # random per compile: named instead
        html = html.replace(marker, f"[{name}]")
    return html


def test_the_sample_edition_round_trips_through_the_form(settings: Settings) -> None:
    source = SAMPLE.read_text(encoding="utf-8")
    form = ef.from_source(source)
    assert [(s.heading, s.layout) for s in form.sections][:4] == [
        ("Who are Protect & Prevent?", "text"),
        ("Modern Slavery & Human Trafficking", "text"),
        ("MSHT dates of interest", "dates"), ("Kent picture", "figures")]
    dates, figures, links = form.sections[2], form.sections[3], form.sections[6]
    assert dates.body.splitlines()[0] == \
        "14 September: Operation Aidant, focus on labour exploitation"
    assert figures.tables[0] == [["Division", "No."], ["Kent North", "74"],
                                 ["Kent East", "63"], ["Kent West", "22"]]
    assert figures.body.startswith("Criminal exploitation is showing")
    assert links.body.splitlines()[0] == \
        "NRM guidance | https://example.org/home-office/national-referral-mechanism-guidance"
    again = ef.to_source(form)
    assert ef.from_source(again) == form
    assert _html(again, settings) == _html(source, settings)


def test_typed_dates_links_and_grids_become_the_edition_markers() -> None:
    section = ef.FormSection("Figures", "figures", "Up on last year.",
                             [[["Division", "No.", ""], ["North", "1,204", ""],
                               ["", "", ""], ["East | coast", "63", ""]]])
    assert ef.section_markdown(section) == (
        "## Figures {.figures}\n\n| Division | No. |\n|---|--:|\n| North | 1,204 |\n"
        "| East \\| coast | 63 |\n\nUp on last year.")
    dates = ef.FormSection("Dates", "dates", "14 September: Operation Aidant\n\nno date here")
    assert ef.section_markdown(dates) == \
        "## Dates {.dates}\n\n- **14 September**: Operation Aidant\n\nno date here"
    links = ef.FormSection("Links", "links", "NRM guidance | https://example.org/nrm")
    assert ef.section_markdown(links) == "## Links {.links}\n\n- [NRM guidance](https://example.org/nrm)"


def test_the_next_issue_keeps_the_recurring_sections() -> None:
    last = ef.from_source(SAMPLE.read_text(encoding="utf-8"))
    nxt = ef.next_issue(last)
    assert (nxt.issue, nxt.regions, nxt.date, nxt.intro) == ("3", ["kent", "essex"], "", "")
    assert [(s.heading, s.layout) for s in nxt.sections] == [
        ("MSHT dates of interest", "dates"), ("Kent picture", "figures"),
        ("Useful links", "links")]
    assert nxt.sections[1].tables[0] == [["Division", "No."], ["Kent North", ""],
                                         ["Kent East", ""], ["Kent West", ""]]


@pytest.fixture
def client(web_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(web_settings)) as c:
        yield c


def _fields(page: str) -> dict[str, str]:
    """The editor form's fields as the browser would send them (no button yet)."""
    form = page[page.index('id="editor"'):]
    fields = dict(re.findall(r'<input type="(?:hidden|text|number|date)"[^>]*?name="([^"]+)" '
                             r'value="([^"]*)"', form))
    fields.update(re.findall(r'<input type="(?:hidden|text|number|date)" id="[^"]+" '
                             r'name="([^"]+)" value="([^"]*)"', form))
    fields.update(re.findall(r'<input type="text" name="([^"]+)" value="([^"]*)"', form))
    for name, body in re.findall(r'<textarea id="[^"]+" name="([^"]+)"[^>]*>(.*?)</textarea>',
                                 form, re.S):
        fields[name] = body
    # Each select sends its selected option's value, "" included (the marking's "default").
    for name, options in re.findall(r'<select id="[^"]+" name="([^"]+)"[^>]*>(.*?)</select>',
                                    form, re.S):
        chosen = re.search(r'<option value="([^"]*)" selected', options)
        fields[name] = chosen[1] if chosen else "text"
    import html
    return {k: html.unescape(v) for k, v in fields.items()}


def test_an_edition_written_in_the_editor_without_markdown_is_saved_and_kept(
        client: TestClient, engine: Engine) -> None:
    make_user(engine, "cora", regions=("kent",))
    assert login(client, "cora").status_code == 303
    page = client.get("/admin/editions/compose").text
    fields = _fields(page)
    fields.update({"title": "Kent MSHT newsletter", "issue": "3", "date": "2027-03-01",
                   "subject": "Kent MSHT newsletter, issue 3", "preheader": "Spring figures",
                   "topic": "newsletter", "intro": "Welcome to the third issue.",
                   "s0.heading": "Kent picture", "s0.layout": "figures"})
    page = client.post("/admin/editions/compose", data={**fields, "do": "add-table-0"}).text
    fields = {**_fields(page), "regions": "kent"}
    fields.update({"s0.t0.r0c0": "Division", "s0.t0.r0c1": "No.",
                   "s0.t0.r1c0": "Kent North", "s0.t0.r1c1": "74"})
    page = client.post("/admin/editions/compose", data={**fields, "do": "add-row-0-0"}).text
    assert 'name="s0.t0.r2c1" value=""' in page and 'value="Kent North"' in page
    fields = {**_fields(page), "regions": "kent", "s0.t0.r2c0": "Kent East",
              "s0.t0.r2c1": "63"}
    page = client.post("/admin/editions/compose", data={**fields, "do": "add-section"}).text
    fields = {**_fields(page), "regions": "kent", "s1.heading": "Dates",
              "s1.layout": "dates", "s1.body": "18 October: Anti-Slavery Day"}
    page = client.post("/admin/editions/compose", data={**fields, "do": "up-1"}).text
    assert page.index('value="Dates"') < page.index('value="Kent picture"')
    fields = {**_fields(page), "regions": "kent"}
    saved = client.post("/admin/editions/compose", data={**fields, "do": "save"},
                        follow_redirects=False)
    assert saved.status_code == 303, saved.text
    with Session(engine) as session:
        edition = session.scalar(select(Edition).where(Edition.slug == "2027-03-01-issue-3"))
        assert edition is not None
        assert "## Dates {.dates}\n\n- **18 October**: Anti-Slavery Day" in edition.source
        assert "| Division | No. |\n|---|--:|\n| Kent North | 74 |\n| Kent East | 63 |" \
            in edition.source
        assert [r.number for r in revisions.listing(session, edition)] == [1]


def test_each_save_keeps_a_revision_and_the_approver_sees_an_escaped_diff(
        client: TestClient, engine: Engine, web_settings: Settings) -> None:
    from mailer.operations import Caller
    from mailer.operations import editions as edition_ops
    from subscribers.db import session_factory

    make_user(engine, "alice", regions=("kent", "essex"))
    make_user(engine, "bob", regions=("kent", "essex"))
    source = SAMPLE.read_text(encoding="utf-8")
    with session_factory(engine)() as session:
        from mailer.accounts import actor_of, get_user

        alice, bob = (Caller(actor=actor_of(get_user(session, who)), via="console")
                      for who in ("alice", "bob"))
        edition, _ = edition_ops.save(session, alice, web_settings, SAMPLE.stem, source)
        edition_ops.request_approval(session, alice, edition.id)
        edition_ops.approve(session, bob, edition.id)
        edited = source.replace("| Kent North | 74 |", "| Kent North | 80 (<5 & rising) |")
        edition_ops.save(session, alice, web_settings, SAMPLE.stem, edited)
        assert edition.status == "draft" and edition.approved_by is None  # withdrawn
        edition_ops.request_approval(session, alice, edition.id)
        eid = edition.id
        session.commit()
        assert [(r.number, r.put_forward_by, r.approved_by)
                for r in revisions.listing(session, edition)] == \
            [(2, "alice", None), (1, "alice", "bob")]
    assert login(client, "bob").status_code == 303
    page = client.get(f"/admin/editions/{eid}").text
    assert "Changes since revision 1 (approved by bob)" in page
    row = re.search(r'<tr class="changed">(.*?)</tr>', page, re.S)
    assert row is not None
    assert "| Kent North | 74 |" in row[1]
    assert "| Kent North | 80 (&lt;5 &amp; rising) |" in row[1]
    assert "(<5 & rising)" not in page
    assert page.count('<tr class="changed">') == 1


def test_an_image_needs_its_alt_text_and_goes_into_the_saved_edition(
        web_settings: Settings, engine: Engine) -> None:
    import io

    from PIL import Image

    from mailer import media

    https = web_settings.model_copy(update={"base_url": "https://news.example.org"})
    png = io.BytesIO()
    Image.new("RGB", (90, 60), (20, 90, 200)).save(png, "PNG")
    with TestClient(create_app(https), base_url="https://news.example.org") as client:
        make_user(engine, "cora", regions=("kent",))
        assert login(client, "cora").status_code == 303
        fields = {**_fields(client.get("/admin/editions/compose").text), "regions": "kent",
                  "title": "Kent MSHT newsletter", "issue": "5", "date": "2027-06-01",
                  "subject": "Kent MSHT newsletter, issue 5", "topic": "newsletter",
                  "s0.heading": "A picture", "s0.body": "The new office.",
                  "image_section": "1"}
        upload = {"image": ("office.png", png.getvalue(), "image/png")}
        refused = client.post("/admin/editions/compose", data={**fields, "do": "add-image"},
                              files=upload)
        assert refused.status_code == 400 and "an image needs alt text" in refused.text
        folder = media.media_dir(https)
        assert not folder.exists() or not any(folder.iterdir())
        added = client.post("/admin/editions/compose", files=upload, data={
            **fields, "do": "add-image", "image_alt": "The front of the new office"})
        assert "Image added (90 × 60), with its alt text." in added.text
        fields = {**_fields(added.text), "regions": "kent"}
        assert re.fullmatch(r"The new office\.\n\n!\[The front of the new office\]\("
                            r"https://news\.example\.org/media/[0-9a-f]{64}\.png\)",
                            fields["s0.body"])
        saved = client.post("/admin/editions/compose", data={**fields, "do": "save"},
                            follow_redirects=False)
        assert saved.status_code == 303, saved.text
        url = fields["s0.body"].rsplit("(", 1)[1].rstrip(")")
        served = client.get(url.removeprefix("https://news.example.org"))
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    with Session(engine) as session:
        edition = session.scalar(select(Edition).where(Edition.slug == "2027-06-01-issue-5"))
        assert edition is not None and "![The front of the new office](" in edition.source
        assert 'alt="The front of the new office"' in edition.compiled["html"]


def test_a_word_document_opens_in_the_editor_with_its_problems_and_a_doc_is_refused(
        web_settings: Settings, engine: Engine) -> None:
    from tests.word_documents import sample_docx

    https = web_settings.model_copy(update={"base_url": "https://news.example.org"})
    with TestClient(create_app(https), base_url="https://news.example.org") as client:
        make_user(engine, "cora", regions=("kent",))
        assert login(client, "cora").status_code == 303
        token = csrf_of(client.get("/admin/editions/compose").text)
        page = client.post("/admin/editions/compose/word", data={"csrf_token": token},
                           files={"document": ("issue2.docx", sample_docx(photo_alt=None),
                                               "application/octet-stream")})
        assert page.status_code == 200
        assert "Imported issue2.docx: check each section, then save." in page.text
        fields = _fields(page.text)
        layouts = [fields[f"s{i}.layout"] for i in range(int(fields["sections"]))]
        assert "dates" in layouts and "figures" in layouts and "links" in layouts
        assert 'value="Kent North"' in page.text
        assert "There is a problem" in page.text and "alt text" in page.text  # flagged
        refused = client.post("/admin/editions/compose/word", data={"csrf_token": token},
                              files={"document": ("old.doc", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
                                                  + b"\0" * 600, "application/msword")})
        assert refused.status_code == 400 and "There is a problem" in refused.text
        assert ".doc" in refused.text
